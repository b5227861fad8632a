"""`denoq eval`: quality, latency and pictures of an artifact, written into it (report.json, report.html, PNGs).

Quality (DESIGN.md, Measuring quality): the FP model and the quantized backend sample from the same noise with the
same sampler. FD-digits is the Fréchet distance in the shipped digits classifier's features to all real digits;
PSNR vs FP compares each quantized sample with its FP twin; FD-to-FP is the Fréchet distance between the two sets.
Also measured: the relative ε error of the quantized backend on the FP trajectory per timestep, how far the
quantized trajectory drifts from the FP one, each layer's output SQNR (simulation vs FP), ORT latency per model
call FP32 vs the Q/DQ graph, and which quantized layers ORT fused into integer kernels.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from denoq.calibrators.ptqd import PtqdStats, ptqd_pictures
from denoq.calibrators.simulate import SimulatedLayer, simulate
from denoq.compiler.artifact import Artifact
from denoq.compiler.backends import (
    EpsFn,
    artifact_model,
    artifact_plan,
    artifact_ptqd,
    guide,
    guided_backend,
    sampling_variance,
    torch_eps,
)
from denoq.compiler.load import ModelSpec, check_label
from denoq.compiler.mixed import is_mixed, mixed_backend, mixed_variance
from denoq.compiler.pictures import (
    GroupPanel,
    layer_error_png,
    side_by_side_png,
    timestep_error_png,
    timestep_groups_png,
)
from denoq.engines.ort import OrtBackend, fusion_report, latency
from denoq.layers import quantizable_layers
from denoq.metrics import class_accuracy, fd_between, fd_digits, psnr
from denoq.plan import ActQuant
from denoq.sampling import NoiseSchedule, sample

DIGITS_SHAPE = (1, 16, 16)
LATENCY_BATCHES = (1, 8)
EPS_PROBE = 64  # samples whose ε error on the FP trajectory is measured each step (an extra backend call)
RANGE_PROBE = 64  # samples of the FP trajectory whose activation ranges timestep_groups.png plots
GROUP_PLOT_LAYERS = 4  # layers in timestep_groups.png


@dataclass(frozen=True)
class EvalSettings:
    """What `denoq eval` runs. `fp_backend` is the FP reference: `ort-fp` (the exported FP graph, checked against
    PyTorch to ~1e-6 at compile time, and several times faster on the CPU) or `torch-fp`. `guidance`: the
    classifier-free guidance scale of a class-conditional model (None = the conditional model, no guidance)."""

    backend: str = "ort"
    fp_backend: str = "ort-fp"
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    seed: int = 0
    n: int = 512
    threads: int | None = None
    guidance: float | None = None

    @property
    def run_name(self) -> str:
        cfg = "" if self.guidance is None else f"-cfg{self.guidance:g}"
        return f"{self.sampler}{self.steps}-eta{self.eta:g}-{self.backend}-n{self.n}-seed{self.seed}{cfg}"


def eval_cond(spec: ModelSpec, n: int, seed: int) -> torch.Tensor | None:
    """The conditioning of evaluation samples: a stream apart from calibration's (10 000 + seed); for a
    class-conditional model every class in turn (0, 1, …, 0, 1, …), so that the samples cover the digits."""
    if spec.cond_input == "class_labels":
        return torch.arange(n) % int(spec.num_classes)
    return spec.random_cond(n, 10_000 + seed)


def _sample(eps: EpsFn, art: Artifact, spec_shape: tuple[int, ...], *, sampler: str, steps: int, eta: float,
            seed: int, n: int, cond: torch.Tensor | None, callback=None,
            residual_var: torch.Tensor | None = None, progress: bool = True) -> torch.Tensor:
    schedule = NoiseSchedule.from_config(art.manifest["scheduler"])
    return sample(eps, schedule, sampler=sampler, steps=steps, eta=eta, shape=(n, *spec_shape),
                  generator=torch.Generator().manual_seed(seed), cond=cond, callback=callback,
                  residual_var=residual_var, progress=progress)


def sampling_backend(art: Artifact, backend: str, sampler: str, steps: int, *, threads: int | None = None,
                     spec: ModelSpec | None = None, guidance: float | None = None
                     ) -> tuple[EpsFn, torch.Tensor | None]:
    """The eps callable of `backend` (guided at `guidance` when given, `guided_backend`) and the VSC variance table
    for sampling `art` with `sampler` / `steps`; both refuse a sampler other than the one PTQD statistics or a
    mixed artifact's per-step choice were made for."""
    if is_mixed(art):
        return (guide(art, backend, mixed_backend(art, backend, sampler, steps, threads=threads, spec=spec),
                      guidance), mixed_variance(art, backend, sampler, steps))
    variance = sampling_variance(art, backend, sampler, steps)  # PTQD: refuses other samplers; VSC table
    return guided_backend(art, backend, guidance, threads=threads, spec=spec), variance


def generate(art: Artifact, backend: str, *, sampler: str, steps: int, eta: float, seed: int, n: int,
             threads: int | None = None, progress: bool = True, callback=None, label: int | None = None,
             guidance: float | None = None) -> torch.Tensor:
    """`n` samples from `backend` of `art` (model range, [N, C, H, W]); same seed → same noise on every backend.
    `callback(step, t, x_t, out)` sees every step (`denoq.sampling.sample`). A class-conditional model samples
    `label` (every class in turn when None), with classifier-free guidance of scale `guidance` when given."""
    meta = art.manifest["model"]
    if label is not None or guidance is not None:
        check_label(meta, label, guidance)
    spec = artifact_model(art) if backend.startswith("torch") or meta["cond_shape"] is not None else None
    eps, variance = sampling_backend(art, backend, sampler, steps, threads=threads, spec=spec, guidance=guidance)
    cond = eval_cond(spec, n, seed) if spec is not None else None
    if label is not None:
        cond = torch.full((n,), label, dtype=torch.int64)
    return _sample(eps, art, tuple(art.manifest["model"]["sample_shape"]), sampler=sampler, steps=steps, eta=eta,
                   seed=seed, n=n, cond=cond, residual_var=variance, progress=progress, callback=callback)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def layer_sqnr(spec: ModelSpec, art: Artifact, x: torch.Tensor, t: torch.Tensor,
               cond: torch.Tensor | None) -> dict[str, float]:
    """Output SQNR (dB) of every quantized layer, simulation vs FP, on the same model inputs (errors accumulate
    through the network as they do in deployment)."""
    fp_out: dict[str, torch.Tensor] = {}
    q_out: dict[str, torch.Tensor] = {}
    sim = simulate(spec.module, artifact_plan(art))
    handles = [m.register_forward_hook(lambda mod, a, o, n=name: fp_out.__setitem__(n, o.detach()))
               for name, m in quantizable_layers(spec.module).items()]
    handles += [m.register_forward_hook(lambda mod, a, o: q_out.__setitem__(mod.plan.name, o))
                for m in sim.modules() if isinstance(m, SimulatedLayer)]
    try:
        torch_eps(spec.module)(x, t, cond)
        torch_eps(sim)(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name in (n for n in fp_out if n in q_out):  # network order; layers kept in FP have no error
        err = (q_out[name] - fp_out[name]).pow(2).sum()
        out[name] = float(10 * torch.log10(fp_out[name].pow(2).sum() / err.clamp_min(1e-30)))
    return out


def activation_ranges(spec: ModelSpec, layer_names: list[str], traj: list[torch.Tensor], ts: list[int],
                      cond: torch.Tensor | None, limit: int = RANGE_PROBE) -> dict[str, list[float]]:
    """max|x| of each named layer's input per step of a recorded trajectory (`traj[i]` at timestep `ts[i]`), from
    the FP torch model with forward pre-hooks on its first `limit` samples; lists aligned with `ts`."""
    layers = quantizable_layers(spec.module)
    ranges: dict[str, list[float]] = {name: [] for name in layer_names}
    handles = [layers[name].register_forward_pre_hook(
        lambda mod, args, n=name: ranges[n].append(float(args[0].detach().abs().max())))
        for name in layer_names]
    eps = torch_eps(spec.module)
    try:
        for x_t, t in zip(traj, ts, strict=True):
            x = x_t[:limit]
            eps(x, torch.full((x.shape[0],), t, dtype=torch.int64), None if cond is None else cond[:x.shape[0]])
    finally:
        for h in handles:
            h.remove()
    return ranges


def clip_level(q: ActQuant) -> torch.Tensor:
    """The largest representable input of an activation quantizer per timestep: (qmax − zero point)·scale[t]
    (= 127·scale[t] for signed int8)."""
    return (q.qrange[1] - q.zero_point) * q.scale.to(torch.float32)


def timestep_groups_picture(spec: ModelSpec, art: Artifact, traj: list[torch.Tensor], ts: list[int],
                            cond: torch.Tensor | None, title: str) -> tuple[bytes | None, dict[str, Any]]:
    """`timestep_groups.png` and its summary for the report; no picture when no layer has more than one group.

    Plots the (up to) GROUP_PLOT_LAYERS grouped layers whose input range varies most over the trajectory (ratio of
    largest to smallest per-timestep max|x|; ties by name), each with its quantizer's clipping level and the group
    boundaries of the manifest's `calibration.timestep_groups`.
    """
    groups: dict[str, list[list[int]]] = art.manifest.get("calibration", {}).get("timestep_groups") or {}
    plan = artifact_plan(art) if groups else None
    grouped = sorted(name for name, segs in groups.items() if len(segs) > 1 and plan is not None
                     and name in plan.layers and plan.layers[name].input is not None)
    summary: dict[str, Any] = {"layers_with_groups": len(grouped),
                               "max_groups": max((len(groups[n]) for n in grouped), default=1), "plotted": []}
    if not grouped:
        return None, summary
    ranges = activation_ranges(spec, grouped, traj, ts, cond)

    def spread(name: str) -> float:
        r = ranges[name]
        return max(r) / max(min(r), 1e-12)

    picked = sorted(grouped, key=lambda n: (-spread(n), n))[:GROUP_PLOT_LAYERS]
    summary["plotted"] = picked
    panels = []
    for name in picked:
        segs = groups[name]
        lo, hi = min(min(ts), segs[0][0]), max(max(ts), segs[-1][1])
        grid = list(range(lo, hi + 1))
        level = clip_level(plan.layers[name].input)
        # the table switches after ⌊(a + b) / 2⌋ between groups ending at a and starting at b (segment_of_timestep)
        bounds = [(segs[g][1] + segs[g + 1][0]) // 2 + 0.5 for g in range(len(segs) - 1)]
        panels.append(GroupPanel(name=name, observed=ranges[name], clip_t=grid, clip=level[lo:hi + 1].tolist(),
                                 boundaries=bounds))
    return timestep_groups_png(ts, panels, title), summary


def ptqd_summary(stats: PtqdStats, vsc: bool) -> dict[str, Any]:
    """The per-step PTQD statistics for the report: k_t, mean |bias|, residual std and the normality p-value at
    every measured step, and how many steps' residuals fail the D'Agostino–Pearson test at 1%."""
    steps = torch.tensor(stats.steps)
    p = stats.normality_p.tolist()
    return {"sampler": stats.sampler, "num_steps": stats.num_steps, "vsc": vsc, "t": stats.steps,
            "k": stats.k[steps].tolist(), "mean_abs_bias": stats.bias[steps].abs().mean(dim=1).tolist(),
            "residual_std": stats.residual_std.tolist(), "normality_p": p,
            "non_gaussian_steps": sum(1 for v in p if v == v and v < 0.01)}


def _calibration_summary(art: Artifact) -> dict[str, Any]:
    """How the artifact was calibrated: which steps (and by which rule, with its terms) and how groups were found."""
    cal = art.manifest["calibration"]
    selection = cal.get("timestep_selection", {"strategy": "uniform"})
    search = cal.get("group_search", {"method": "dp"})
    words = (f"{len(cal['timesteps'])} calibration timesteps ({selection['strategy']}"
             + "".join(f", {k} {v:.4g}" for k, v in sorted(selection.items()) if k != "strategy")
             + f"); groups by {search['method']}"
             + "".join(f", {k} {v:.4g}" for k, v in sorted(search.items()) if k != "method"))
    weights = cal.get("weights", {"method": "rtn"})
    words += f"; weights by {weights['method']}"
    if weights.get("fallbacks"):
        words += " (" + "; ".join(f"{k}: {v}" for k, v in sorted(weights["fallbacks"].items())) + ")"
    learned = cal.get("accuquant")
    if learned is not None:
        words += (f"; then learned (AdaRound + LSQ, {learned['objective']}, {learned['iters']} iterations): probe ε "
                  f"error {learned['probe_eps_error_before']:.4g} → {learned['probe_eps_error_after']:.4g}"
                  + (f" ({learned['stopped']})" if learned["stopped"] else ""))
    return {"timesteps": cal["timesteps"], "selection": selection, "group_search": search, "weights": weights,
            "accuquant": learned, "text": words}


def _groups_text(summary: dict[str, Any]) -> str:
    """One line for the report: "1 group" or how many layers have how many groups."""
    if not summary["layers_with_groups"]:
        return "1 group (every layer uses one activation scale at all timesteps)"
    return (f"up to {summary['max_groups']} groups on {summary['layers_with_groups']} layers; "
            f"plotted: {', '.join(summary['plotted'])}")


def _latency_table(art: Artifact, spec: ModelSpec, threads: int) -> dict[str, Any]:
    rows = {}
    for batch in LATENCY_BATCHES:
        x = torch.randn((batch, *spec.sample_shape), generator=torch.Generator().manual_seed(0))
        t = torch.full((batch,), 500, dtype=torch.int64)
        cond = spec.random_cond(batch, 0)
        res = {}
        for label, fname in (("fp32", "model.fp.onnx"), ("qdq", "model.qdq.onnx")):
            res[label] = latency(OrtBackend(art.file(fname), threads=threads), (x, t, cond))["median_ms"]
        res["speedup"] = res["fp32"] / res["qdq"]
        rows[f"batch{batch}"] = res
    return {"threads": threads, **rows}


def evaluate(art: Artifact, settings: EvalSettings, progress: bool = True) -> dict[str, Any]:
    """Run the evaluation, write report.json / report.html / pictures into `art`, and return the report."""
    spec = artifact_model(art)
    shape = spec.sample_shape
    if settings.guidance is not None:
        check_label(art.manifest["model"], 0, settings.guidance)  # class-conditional (labels cycle the classes)
    q, variance = sampling_backend(art, settings.backend, settings.sampler, settings.steps, threads=settings.threads,
                                   spec=spec, guidance=settings.guidance)
    fp, _ = sampling_backend(art, settings.fp_backend, settings.sampler, settings.steps, threads=settings.threads,
                             spec=spec, guidance=settings.guidance)
    cond = eval_cond(spec, settings.n, settings.seed)
    kw = dict(sampler=settings.sampler, steps=settings.steps, eta=settings.eta, seed=settings.seed, n=settings.n,
              cond=cond)

    ts: list[int] = []
    eps_err: list[float] = []
    fp_traj: list[torch.Tensor] = []

    k = min(settings.n, EPS_PROBE)
    cond_k = None if cond is None else cond[:k]

    def on_fp(step: int, t: torch.Tensor, x_t: torch.Tensor, eps_fp: torch.Tensor) -> None:
        ts.append(int(t[0]))
        fp_traj.append(x_t)
        eps_err.append(_rel(q(x_t[:k], t[:k], cond_k), eps_fp[:k]))

    q_traj: list[torch.Tensor] = []
    x_fp = _sample(fp, art, shape, callback=on_fp, **kw)
    x_q = _sample(q, art, shape, callback=lambda s, t, x_t, e: q_traj.append(x_t), residual_var=variance, **kw)
    drift = [_rel(a, b) for a, b in zip(q_traj, fp_traj, strict=True)]

    digits = tuple(shape) == DIGITS_SHAPE
    report: dict[str, Any] = {
        "sampler": asdict(settings),
        "fd_digits_fp": fd_digits(x_fp) if digits else None,
        "fd_digits": fd_digits(x_q) if digits else None,
        "fd_to_fp": fd_between(x_q, x_fp) if digits else None,
        "psnr_vs_fp": psnr(x_q, x_fp),
        "eps_rel_error_per_step": {"t": ts, "value": eps_err},
        "trajectory_drift_per_step": {"t": ts, "value": drift},
    }
    if report["fd_digits"] is not None:
        report["fd_ratio"] = report["fd_digits"] / report["fd_digits_fp"]
    if digits and spec.cond_input == "class_labels":  # did each sample come out as the digit it was asked for?
        report["class_accuracy"] = class_accuracy(x_q, cond)
        report["class_accuracy_fp"] = class_accuracy(x_fp, cond)
    if not digits:
        report["fd_note"] = f"FD-digits needs {DIGITS_SHAPE} samples; this model makes {tuple(shape)}"

    runs = dict(art.manifest.get("eval_runs", {}))
    runs[settings.run_name] = {k: report[k] for k in ("fd_digits_fp", "fd_digits", "fd_to_fp", "psnr_vs_fp",
                                                      "class_accuracy", "class_accuracy_fp") if k in report}
    pictures = {
        "samples_fp_vs_quant.png": side_by_side_png(x_fp[:64], x_q[:64], ("FP32", f"quantized ({settings.backend})")),
        "timestep_error.png": timestep_error_png(ts, {"‖ε_q − ε_fp‖ / ‖ε_fp‖ on the FP trajectory": eps_err,
                                                      "‖x_t^q − x_t^fp‖ / ‖x_t^fp‖ (trajectory drift)": drift},
                                                 "relative error", f"quantized vs FP per timestep "
                                                 f"({settings.sampler} {settings.steps})"),
    }
    if is_mixed(art):
        report["mixed"] = mixed_summary(art)
        report["bops_per_image"] = report["mixed"]["bops_per_image"]["mixed"]
        pictures["precision.png"] = art.file("precision.png").read_bytes()
    else:
        cost = art.manifest.get("cost")
        report["bops_per_image"] = None if cost is None else cost["bops_per_call"] * settings.steps
        report.update(_single_artifact_report(art, spec, settings, fp_traj, ts, cond, pictures))
    report["pictures"] = sorted(pictures)
    report["runs"] = runs
    files = {"report.json": (json.dumps(_finite(report), indent=2, sort_keys=True) + "\n").encode(),
             "report.html": render_html(art, report, pictures).encode(), **pictures}
    art.add_files(files, {"eval_runs": runs})
    return report


def mixed_summary(art: Artifact) -> dict[str, Any]:
    """A mixed artifact's per-step choice and cost for the report: members, steps each runs, BOPs per image."""
    meta = art.manifest["mixed"]
    per_image = meta["bops_per_image"]
    top = max(meta["members"], key=lambda n: (meta["bops_per_call"][n], n))
    return {"members": meta["members"], "steps_per_member": meta["steps_per_member"],
            "t": [row["t"] for row in meta["steps"]], "member": [row["member"] for row in meta["steps"]],
            "bops_per_image": per_image,
            "bops_vs_all": {n: per_image["mixed"] / per_image[n] for n in meta["members"]},
            "text": (", ".join(f"{n} runs {meta['steps_per_member'][n]} steps" for n in meta["members"])
                     + f"; BOPs per image ×{per_image['mixed'] / per_image[top]:.3f} of all-{top}")}


def _single_artifact_report(art: Artifact, spec: ModelSpec, settings: EvalSettings, fp_traj: list[torch.Tensor],
                            ts: list[int], cond: torch.Tensor | None, pictures: dict[str, bytes]) -> dict[str, Any]:
    """What only a single (non-mixed) artifact reports: layer SQNR, ORT latency and fusion, timestep groups,
    calibration and PTQD statistics; adds its pictures to `pictures`."""
    report: dict[str, Any] = {}
    # probe at 10%, 50% and 90% of the trajectory: at the very last step ε is nearly unpredictable (σ ≈ 0.01) and
    # its relative error, which the sampler scales by σ, would dominate the picture without mattering
    steps_at = sorted({min(len(ts) - 1, round(f * (len(ts) - 1))) for f in (0.1, 0.5, 0.9)})
    probe = torch.cat([fp_traj[i][:8] for i in steps_at])
    probe_t = torch.tensor([ts[i] for i in steps_at for _ in range(min(8, settings.n))])
    probe_c = None if cond is None else torch.cat([cond[:8]] * len(steps_at))
    sqnr = layer_sqnr(spec, art, probe, probe_t, probe_c)
    report["layer_sqnr_db"] = sqnr
    threads = settings.threads or 2
    report["latency_ms"] = _latency_table(art, spec, threads)
    report["fusion"] = fusion_report(art.file("model.qdq.onnx"), threads=threads)
    pictures["layer_error.png"] = layer_error_png(
        list(sqnr), list(sqnr.values()), "per-layer output SQNR, simulation vs FP (at 10/50/90% of the trajectory)")
    groups_png, report["timestep_groups"] = timestep_groups_picture(
        spec, art, fp_traj, ts, cond, f"input range per timestep vs timestep-group clipping ({settings.sampler} "
        f"{settings.steps}, {min(settings.n, RANGE_PROBE)} samples)")
    report["timestep_groups"]["text"] = _groups_text(report["timestep_groups"])
    report["calibration"] = _calibration_summary(art)
    if groups_png is not None:
        pictures["timestep_groups.png"] = groups_png
    stats = artifact_ptqd(art)
    if stats is not None:
        report["ptqd"] = ptqd_summary(stats, art.manifest["ptqd"].get("vsc", False))
        pictures["ptqd.png"] = ptqd_pictures(stats, f"PTQD statistics per step ({stats.sampler} {stats.num_steps})")
    return report


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _details_html(report: dict[str, Any]) -> str:
    """The report's sections after quality: the per-step precision of a mixed artifact, or a single artifact's
    latency, timestep groups, calibration and fusion."""
    if "mixed" in report:
        mixed = report["mixed"]
        steps = " ".join(f"{t}:{m}" for t, m in zip(mixed["t"], mixed["member"], strict=True))
        return (f"<h2>Step-aware mixed precision</h2><p>{html.escape(mixed['text'])}</p>"
                f"<p>member per step (timestep:member, in sampling order): {html.escape(steps)}</p>"
                "<p>Latency, layers and calibration: see each member's own report "
                "(<code>denoq eval ART/members/NAME</code>).</p>")
    lat = report["latency_ms"]
    lat_rows = "".join(f"<tr><td>{k}</td><td>{v['fp32']:.2f}</td><td>{v['qdq']:.2f}</td><td>{v['speedup']:.2f}×</td>"
                       "</tr>" for k, v in lat.items() if k.startswith("batch"))
    fusion = html.escape(json.dumps(report["fusion"], sort_keys=True))
    return f"""<h2>ONNX Runtime latency per model call ({lat['threads']} threads)</h2><table><tr><th></th>
<th>FP32 ms</th><th>Q/DQ ms</th><th>speed-up</th></tr>{lat_rows}</table>
<h2>Timestep groups</h2><p>{html.escape(report.get("timestep_groups", {}).get("text", "1 group"))}</p>
<p>{html.escape(report["calibration"]["text"])}: {html.escape(str(report["calibration"]["timesteps"]))}</p>
<h2>Integer-kernel fusion in ORT</h2><pre>{fusion}</pre>"""


def render_html(art: Artifact, report: dict[str, Any], pictures: dict[str, bytes]) -> str:
    """A self-contained page (pictures inlined as base64) a person can read instead of the JSON."""
    m = art.manifest
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(report.get(k))}</td></tr>"
                   for k in ("fd_digits_fp", "fd_digits", "fd_ratio", "fd_to_fp", "psnr_vs_fp", "bops_per_image"))
    runs = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{_fmt(r[k])}</td>" for k in
                   ("fd_digits_fp", "fd_digits", "fd_to_fp", "psnr_vs_fp")) + "</tr>"
                   for name, r in sorted(report["runs"].items()))
    imgs = "".join(f"<h3>{html.escape(name)}</h3><img src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
                   for name, data in pictures.items())
    title = html.escape(str(art.path))
    target = m["plan"]["target"] if "plan" in m else m["recipe"]["values"]["target"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>denoq report: {title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:3px 8px}}
table{{border-collapse:collapse;margin:1em 0}}img{{max-width:100%}}</style></head><body>
<h1>denoq report</h1><p>model <b>{html.escape(m['model']['name'])}</b> ({m['model']['class']}), recipe
<b>{html.escape(m['recipe']['name'])}</b>, target <b>{target}</b>, backend {report['sampler']['backend']},
sampler {report['sampler']['sampler']} {report['sampler']['steps']} steps, η={report['sampler']['eta']},
{report['sampler']['n']} samples, seed {report['sampler']['seed']}.</p>
<h2>Quality (this run)</h2><table>{rows}</table>
<h2>All evaluation runs of this artifact</h2><table><tr><th>run</th><th>FD-digits FP</th><th>FD-digits quant</th>
<th>FD to FP</th><th>PSNR vs FP (dB)</th></tr>{runs}</table>
{_details_html(report)}
<h2>Pictures</h2>{imgs}</body></html>
"""
