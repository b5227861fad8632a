"""`denoq eval`: quality, latency and pictures of an artifact, written into it (report.json, report.html, PNGs).

Quality (docs/architecture.md, Measuring quality): the FP model and the quantized backend sample from the same noise
with the same sampler. FD-digits is the Fréchet distance in the shipped digits classifier's features to all real digits;
PSNR vs FP compares each quantized sample with its FP twin; FD-to-FP is the Fréchet distance between the two sets.
Also measured: the relative ε error of the quantized backend on the FP trajectory per timestep, how far the
quantized trajectory drifts from the FP one, each layer's output SQNR (simulation vs FP), ORT latency per model
call FP32 vs the Q/DQ graph, and which quantized layers ORT fused into integer kernels.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from denoq.calibrators.ptqd import PtqdStats
from denoq.calibrators.ptqd_plot import ptqd_pictures
from denoq.compiler.artifact import Artifact
from denoq.compiler.backends import (
    artifact_model,
    artifact_ptqd,
)
from denoq.compiler.generate import check_own_sampling, eval_cond, sample_artifact, sampling_backend
from denoq.compiler.load import ModelSpec, check_label
from denoq.compiler.mixed import is_mixed
from denoq.compiler.pictures import (
    layer_error_png,
    side_by_side_png,
    timestep_error_png,
)
from denoq.compiler.probes import RANGE_PROBE, layer_sqnr, timestep_groups_picture
from denoq.compiler.report_html import render_html
from denoq.engines.ort import OrtBackend
from denoq.engines.ort_report import fusion_report, latency
from denoq.metrics import class_accuracy, fd_between, fd_digits, psnr

DIGITS_SHAPE = (1, 16, 16)
LATENCY_BATCHES = (1, 8)
EPS_PROBE = 64  # samples whose ε error on the FP trajectory is measured each step (an extra backend call)


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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


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


def evaluate(art: Artifact, settings: EvalSettings) -> dict[str, Any]:
    """Run the evaluation, write report.json / report.html / pictures into `art`, and return the report."""
    check_own_sampling(art)
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
    run = f"{settings.sampler} {settings.steps}"
    x_fp = sample_artifact(fp, art, shape, callback=on_fp, desc=f"FP ({settings.fp_backend}) {run}", **kw)
    x_q = sample_artifact(q, art, shape, callback=lambda s, t, x_t, e: q_traj.append(x_t), residual_var=variance,
                          desc=f"quantized ({settings.backend}) {run}", **kw)
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
        "samples_fp_vs_quant.png": side_by_side_png(x_fp[:64], x_q[:64], (f"FP ({settings.fp_backend})",
                                                                       f"quantized ({settings.backend})")),
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
    steps = meta["steps_per_member"]
    return {"members": meta["members"], "steps_per_member": meta["steps_per_member"],
            "t": [row["t"] for row in meta["steps"]], "member": [row["member"] for row in meta["steps"]],
            "bops_per_image": per_image,
            "bops_vs_all": {n: per_image["mixed"] / per_image[n] for n in meta["members"]},
            "text": (", ".join(f"{n} runs {steps[n]} step{'' if steps[n] == 1 else 's'}" for n in meta["members"])
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
        pictures["ptqd.png"] = ptqd_pictures(stats)  # its title names the sampler and steps
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


