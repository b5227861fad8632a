"""Quality studies over recipe variants, measured side by side in one run: each variant is compiled, its Q/DQ
graph samples in ONNX Runtime from the same noise as the FP graph, and FD-digits / PSNR vs FP are reported with
the calibration time.

Matrices (`--matrix`):

- `timegroups` (ADP-DM timestep groups): `w8a8` (TensorRT profile) on one calibration budget for every row,
  `calib.samples` trajectories of `--pool` DDIM steps of which `--k` steps calibrate, chosen by
  `activations.calib_timesteps`. Rows: A8 with G ∈ `--groups` × rule ∈ `--strategies` (exact DP partition); A8,
  uniform steps, ADP-DM's differentiable search, G ∈ `--search-groups`; A6 and A4 (`--low-bits`, int4 / clipped
  int8 Q/DQ that ORT runs unfused; TensorRT takes 8-bit activations only), uniform, G ∈ `--low-bit-groups`.
- `ptqd`: per sampler and step count of `--samplers`, W8A8 and W4A8 without correction, with PTQD's bias
  correction only, with bias + k (the head), with head + variance schedule calibration, and step-aware mixed
  precision W4A8/W8A8 with the full stack (statistics on that sampler's trajectories); BOPs per image reported.
- `accuquant`: per sampler and step count of `--samplers`, W8A8 and W4A8 with RTN weights, per-step
  reconstruction of the learned quantizers (AdaRound + LSQ) and AccuQuant windows `--windows` with each objective
  of `--objectives` and gradient of `--gradients` (`--iters` iterations each; with `--perstep-iters` k also each
  window fine-tuning after k per-step iterations);
  study.png is the accumulated error ‖x_t^q − x_t^fp‖ / ‖x_t^fp‖ per step of every row.
- `weights` (OBQ / GPTQ): W8A8 RTN and GPTQ per channel; W4A8 and W4A16 with RTN and GPTQ at every group size
  of `--group-sizes` (0 = per output channel), GPTQ per channel in parallel mode (Hessians from the FP model
  only), and OBQ at `--obq-group-sizes`. Also reported: the median over
  layers of each layer's output error relative to RTN on FP inputs, and the weight bytes on disk vs FP32.

Rows run in `--jobs` worker processes with one thread each (calibration times are therefore measured under that
load). Every row is evaluated with the first sampler of `--samplers` (`ddim50:512` = DDIM, 50 steps, η = 0, 512
samples), the rows a matrix marks as main with all of them. Output: the markdown table on stdout, everything in
`OUT/study.json`, PSNR vs the swept parameter in `OUT/study.png`. Samplers are `ddim50:512` (DDIM, 50 steps,
512 samples, η = 0) or `ddim50:512:1` (η = 1).

    OMP_NUM_THREADS=1 python tools/study.py --matrix timegroups --out /tmp/study 2>&1 | tee /tmp/study.log
    OMP_NUM_THREADS=1 python tools/study.py --matrix weights --model /tmp/digits-b --out /tmp/wstudy
    OMP_NUM_THREADS=1 python tools/study.py --matrix ptqd --samplers ddim50:256,ddim50:256:1,ddpm1000:128 --out /tmp/p
    OMP_NUM_THREADS=1 python tools/study.py --matrix accuquant --samplers ddim50:256,ddpm1000:128 --out /tmp/aq
    python tools/study.py --matrix accuquant --samplers ddim50:256 --merge /tmp/aq_a/study.json /tmp/aq_b/study.json \
        --out /tmp/aq_ab   # earlier runs' rows in one table and plot
    OMP_NUM_THREADS=1 python tools/study.py --matrix accuquant --samplers ddpm1000:512 --seed 7 \
        --resample /tmp/aq_a/study.json /tmp/aq_b/study.json --out /tmp/aq_512   # their artifacts on new noise
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


@dataclass(frozen=True)
class Row:
    """One compiled variant: its name, preset and overrides, the table's label columns, the plot's series and x,
    and whether every sampler evaluates it (`main`) or only the first."""

    name: str
    preset: str
    sets: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    series: str
    x: int
    main: bool
    samplers: tuple[str, ...] | None = None  # evaluate with exactly these (None: all if main, else the first)


def parse_sampler(text: str) -> tuple[str, int, int, float]:
    """`ddim50:512` → ("ddim", 50, 512, 0.0); `ddim50:512:1` → DDIM with η = 1."""
    head, _, rest = text.partition(":")
    n, _, eta = rest.partition(":")
    kind = head.rstrip("0123456789")
    try:
        eta_value = float(eta or 0.0)
    except ValueError:
        eta_value = -1.0
    if kind not in ("ddim", "ddpm") or not head[len(kind):].isdigit() or not n.isdigit() or not 0 <= eta_value <= 1:
        raise SystemExit(f"--samplers item {text!r} must look like ddim50:512, ddim50:512:1 (η) or ddpm1000:128")
    return kind, int(head[len(kind):]), int(n), eta_value


def timegroup_rows(args: argparse.Namespace) -> list[Row]:
    budget = (f"calib.steps={args.pool}", f"calib.timesteps={args.k}")
    out = []
    for g in args.groups:
        for strategy in args.strategies:
            out.append(Row(f"a8-{strategy}-g{g}", "w8a8",
                           (*budget, f"activations.calib_timesteps={strategy}", f"activations.timestep_groups={g}"),
                           (("bits", "A8"), ("G", str(g)), ("timesteps", strategy), ("groups", "dp")),
                           f"A8 {strategy}", g, True))
    for g in args.search_groups:
        out.append(Row(f"a8-uniform-g{g}-search", "w8a8",
                       (*budget, f"activations.timestep_groups={g}", "activations.group_search=differentiable"),
                       (("bits", "A8"), ("G", str(g)), ("timesteps", "uniform"), ("groups", "differentiable")),
                       "A8 uniform + search", g, False))
    for bits in args.low_bits:
        for g in args.low_bit_groups:
            out.append(Row(f"a{bits}-uniform-g{g}", "w8a8",
                           (*budget, f"activations.bits={bits}", f"activations.timestep_groups={g}"),
                           (("bits", f"A{bits}"), ("G", str(g)), ("timesteps", "uniform"), ("groups", "dp")),
                           f"A{bits} uniform", g, False))
    return out


def weight_rows(args: argparse.Namespace) -> list[Row]:
    def row(preset: str, method: str, group: int, main: bool, sequential: bool = True) -> Row:
        mode = "" if sequential else " parallel"
        return Row(f"{preset}-{method}{mode.replace(' ', '-')}-g{group}", preset,
                   (f"weights.method={method}", f"weights.group_size={group}", f"weights.sequential={sequential}"),
                   (("recipe", preset.upper()), ("method", method + mode), ("group", str(group or "channel"))),
                   f"{preset.upper()} {method}{mode}", group, main)

    out = [row("w8a8", m, 0, True) for m in ("rtn", "gptq")]
    for preset in ("w4a8", "w4a16"):
        for g in args.group_sizes:
            out += [row(preset, "rtn", g, g == 0), row(preset, "gptq", g, g == 0)]
        out += [row(preset, "gptq", 0, False, sequential=False)]
        out += [row(preset, "obq", g, False) for g in args.obq_group_sizes]
    return out


def samplers_by_schedule(samplers: list[str]) -> dict[tuple[str, int], list[str]]:
    """`--samplers` grouped by (sampler, steps): calibration statistics belong to one such schedule."""
    groups: dict[tuple[str, int], list[str]] = {}
    for s in samplers:
        kind, steps, _, _ = parse_sampler(s)
        groups.setdefault((kind, steps), []).append(s)
    return groups


PTQD_VARIANTS = (("none", ()), ("bias", ("ptqd.enabled=true", "ptqd.correlation=false")),
                 ("bias + k", ("ptqd.enabled=true",)), ("bias + k + vsc", ("ptqd.enabled=true", "ptqd.vsc=true")))


def ptqd_rows(args: argparse.Namespace) -> list[Row]:
    """For each sampler and step count of `--samplers` (PTQD's statistics and the per-step precision belong to
    one): W8A8 and W4A8 without correction, with the bias correction only, with bias + k (the head), with head +
    variance schedule calibration; and step-aware mixed precision W4A8 / W8A8 with the full PTQD stack. Each row
    is evaluated with the samplers of its own sampler and step count (e.g. DDIM 50 at η = 0 and η = 1)."""
    out = []
    for (kind, steps), samplers in samplers_by_schedule(args.samplers).items():
        calib = (f"calib.sampler={kind}", f"calib.steps={steps}", f"calib.timesteps={min(25, steps)}")
        for preset in ("w8a8", "w4a8"):
            for i, (variant, sets) in enumerate(PTQD_VARIANTS):
                out.append(Row(f"{kind}{steps}-{preset}-ptqd-{i}", preset, (*calib, *sets),
                               (("calib", f"{kind}{steps}"), ("recipe", preset.upper()), ("PTQD", variant)),
                               f"{preset.upper()} {kind}{steps}", 2**i, True, tuple(samplers)))
        out.append(Row(f"{kind}{steps}-mixed", "w4a8", (*calib, *PTQD_VARIANTS[-1][1], "precision.mixed=w8a8"),
                       (("calib", f"{kind}{steps}"), ("recipe", "mixed W4A8/W8A8"), ("PTQD", PTQD_VARIANTS[-1][0])),
                       f"mixed {kind}{steps}", 2 ** len(PTQD_VARIANTS), True, tuple(samplers)))
    return out


def accuquant_rows(args: argparse.Namespace) -> list[Row]:
    """Per sampler and step count of `--samplers` and for W8A8 and W4A8: RTN weights, per-step reconstruction of
    the learned quantizers (AdaRound + LSQ, `accuquant.window=0`, the same as n = 1) and AccuQuant windows
    `--windows` (and, with `--perstep-iters` k, windows fine-tuning after k per-step iterations of the same
    budget); every row calibrates on that sampler's trajectories and is evaluated with its samplers."""
    out = []
    for (kind, steps), samplers in samplers_by_schedule(args.samplers).items():
        calib = (f"calib.sampler={kind}", f"calib.steps={steps}", f"calib.timesteps={min(25, steps)}",
                 f"accuquant.iters={args.iters}")
        for preset in ("w8a8", "w4a8"):
            variants = [("rtn", ("weights.method=rtn",)), ("per-step", ("weights.method=adaround",
                                                                       "accuquant.window=0"))]
            tag = {gradient: "" if gradient == "full" else f" {gradient}" for gradient in args.gradients}
            variants += [(f"window {n}" + ("" if objective == "end" else f" {objective}") + tag[gradient],
                          ("weights.method=adaround", f"accuquant.window={n}", f"accuquant.objective={objective}",
                           f"accuquant.gradient={gradient}"))
                         for gradient in args.gradients for objective in args.objectives for n in args.windows]
            if args.perstep_iters:
                variants += [(f"per-step then window {n}" + tag[gradient],
                              ("weights.method=adaround", f"accuquant.window={n}",
                               f"accuquant.perstep_iters={args.perstep_iters}", f"accuquant.gradient={gradient}"))
                             for gradient in args.gradients for n in args.windows]
            for i, (name, sets) in enumerate(variants):
                out.append(Row(f"{kind}{steps}-{preset}-{name.replace(' ', '')}", preset, (*calib, *sets),
                               (("calib", f"{kind}{steps}"), ("recipe", preset.upper()), ("method", name)),
                               f"{preset.upper()} {name}", i, True, tuple(samplers)))
    return out


MATRICES = {"timegroups": timegroup_rows, "weights": weight_rows, "ptqd": ptqd_rows, "accuquant": accuquant_rows}
#: Matrices whose rows also record the trajectory, for the accumulated error per step (`drift_png`).
TRAJECTORY_MATRICES = ("accuquant",)
TRAJECTORY_POINTS = 50
STUDY_LISTS = ("merge", "resample")  # arguments holding earlier study.json paths


def _one_thread() -> None:
    torch.set_num_threads(1)


def compile_row(row: Row, model: str, out: Path) -> dict[str, Any]:
    from denoq.compiler.api import compile_artifact
    from denoq.compiler.mixed import members
    from denoq.compiler.recipe import load_recipe

    art = compile_artifact(model, load_recipe(row.preset, row.sets), out / "artifacts" / row.name, force=True,
                        progress=False, quiet=True)
    if "mixed" in art.manifest:
        mixed = art.manifest["mixed"]
        return {"calib_seconds": sum(m.timings["calibration"]["seconds"] for m in members(art).values())
                + art.timings["mixed"]["seconds"], "bops_per_image": mixed["bops_per_image"]["mixed"],
                "steps_per_member": mixed["steps_per_member"]}
    cal = art.manifest["calibration"]
    weights = cal.get("weights", {})
    timed = art.timings["calibration"]
    return {"calib_seconds": timed["seconds"], "timesteps": cal["timesteps"],
            "bops_per_image": art.manifest["cost"]["bops_per_call"] * art.manifest["recipe"]["values"]["calib.steps"],
            "accuquant": cal.get("accuquant"),
            "selection": cal.get("timestep_selection", {}), "search_terms": cal.get("group_search", {}),
            "weight_error_vs_rtn": weights.get("output_error_vs_rtn_median"),
            "weight_seconds": timed.get("weights", {}).get("seconds"),
            "weight_bytes": art.manifest["weights"]["qdq_bytes"],
            "fp_weight_bytes": art.manifest["weights"]["fp32_bytes"]}


def sample_graph(art_dir: Path, backend: str, sampler: str, seed: int, trajectory: bool = False
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Samples of an artifact's graph (`ort`: the Q/DQ graph, with its PTQD variance calibration when it has one;
    `ort-fp`: the FP graph) in ONNX Runtime, one thread; with `trajectory`, x_t at up to TRAJECTORY_POINTS evenly
    spaced steps, by timestep."""
    from denoq.compiler.artifact import Artifact
    from denoq.compiler.generate import generate

    kind, steps, n, eta = parse_sampler(sampler)
    every = max(1, steps // TRAJECTORY_POINTS)
    states: dict[int, torch.Tensor] = {}

    def keep(step: int, t: torch.Tensor, x_t: torch.Tensor, out: torch.Tensor) -> None:
        if trajectory and step % every == 0:
            states[int(t[0])] = x_t.clone()

    x = generate(Artifact.open(art_dir), backend, sampler=kind, steps=steps, eta=eta, seed=seed, n=n, threads=1,
                 progress=False, callback=keep)
    return x, states


def drift_png(results: list[dict[str, Any]], samplers: list[str], title: str) -> bytes:
    """The accumulated error per step, ‖x_t^q − x_t^fp‖ / ‖x_t^fp‖ from the same noise, one line per row and one
    panel per sampler (x axis: timestep, descending as sampling runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from denoq.figures import figure_png

    fig, axes = plt.subplots(1, len(samplers), figsize=(5.5 * len(samplers), 4.0), squeeze=False)
    for ax, s in zip(axes[0], samplers, strict=True):
        for r in results:
            d = r.get("drift", {}).get(s)
            if d:
                ax.semilogy(d["t"], d["value"], label=r["series"])
        ax.invert_xaxis()
        ax.set_xlabel("timestep t")
        ax.set_ylabel("‖x_t^q − x_t^fp‖ / ‖x_t^fp‖")
        ax.set_title(s, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return figure_png(fig)


def study_png(results: list[dict[str, Any]], sampler: str, xlabel: str, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from denoq.figures import figure_png

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        q = r["quality"].get(sampler)
        if q is not None:
            series.setdefault(r["series"], []).append((r["x"], q["psnr_vs_fp"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([max(x, 1) for x, _ in pts], [p for _, p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("PSNR vs FP (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figure_png(fig)


def main(argv: list[str] | None = None) -> int:
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--matrix", choices=sorted(MATRICES), required=True)
    p.add_argument("--model", default="digits", help="embedded model name or diffusers pipeline folder")
    p.add_argument("--out", type=Path, required=True, help="folder for artifacts, study.json, study.png")
    p.add_argument("--samplers", type=lambda s: s.split(","), default=["ddim50:512", "ddpm1000:128"])
    p.add_argument("--groups", type=ints, default=[1, 2, 4, 8], help="timegroups: G values")
    p.add_argument("--strategies", type=lambda s: s.split(","), default=["uniform", "normal", "srm"])
    p.add_argument("--search-groups", type=ints, default=[2, 4, 8])
    p.add_argument("--low-bits", type=ints, default=[6, 4])
    p.add_argument("--low-bit-groups", type=ints, default=[1, 4, 8])
    p.add_argument("--pool", type=int, default=50, help="timegroups: recorded DDIM steps per trajectory")
    p.add_argument("--k", type=int, default=16, help="timegroups: calibration steps chosen from them")
    p.add_argument("--group-sizes", type=ints, default=[0, 32, 64, 128], help="weights: 0 = per output channel")
    p.add_argument("--obq-group-sizes", type=ints, default=[0, 64])
    p.add_argument("--windows", type=ints, default=[2, 4], help="accuquant: AccuQuant window lengths n ≥ 2")
    p.add_argument("--objectives", type=lambda s: s.split(","), default=["end"],
                   help="accuquant: window objectives (accuquant.objective: end, every, outputs)")
    p.add_argument("--gradients", type=lambda s: s.split(","), default=["full"],
                   help="accuquant: window gradients (accuquant.gradient: full, stop at the model inputs)")
    p.add_argument("--iters", type=int, default=300,
                   help="accuquant: optimizer iterations per row (300 = the README's earlier tables' budget; the "
                        "recipe's default accuquant.iters is 1000)")
    p.add_argument("--perstep-iters", type=int, default=0,
                   help="accuquant: also rows whose window fine-tunes after this many per-step iterations (0 = no)")
    p.add_argument("--only", default="", help="regular expression: run only the rows whose name matches")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe key added to every row (e.g. weights.conv_blocks=true to compare with older runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--merge", type=Path, nargs="+", default=[], metavar="STUDY_JSON",
                   help="run nothing: merge the rows of earlier study.json files of this matrix, measured with "
                        "the same samplers and --seed (e.g. one calibration seed's single-row studies), "
                        "relabelling each by its folder (--only matches FOLDER/ROW), and write the table, study.json "
                        "and study.png into --out")
    p.add_argument("--resample", type=Path, nargs="+", default=[], metavar="STUDY_JSON",
                   help="compile nothing: sample the artifacts of earlier studies' rows again with --samplers and "
                        "--seed (e.g. more samples, other noise), the FP graph once, labelled and picked as by "
                        "--merge; table, study.json and study.png into --out")
    args = p.parse_args(argv)
    if args.merge and args.resample:
        raise SystemExit("--merge and --resample: give one of them")
    if args.merge:
        return merge(args)
    if args.resample:
        return resample(args)
    for s in args.samplers:
        parse_sampler(s)
    todo = [dataclasses.replace(r, sets=(*r.sets, *args.set))
            for r in MATRICES[args.matrix](args) if re.search(args.only, r.name)]
    if not todo:
        raise SystemExit(f"no {args.matrix} row matches --only {args.only!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, initializer=_one_thread) as pool:
        compiled = dict(zip([r.name for r in todo],
                            tqdm(pool.map(compile_row, todo, [args.model] * len(todo), [args.out] * len(todo)),
                                 total=len(todo), desc=f"compiling variants ({args.jobs} jobs)", unit="variant"),
                            strict=True))
        samplers = {r.name: list(r.samplers) if r.samplers else args.samplers if r.main else args.samplers[:1]
                    for r in todo}
        fp, measured = measure(args, [(r.name, args.out / "artifacts" / r.name, samplers[r.name]) for r in todo],
                               pool)
    results = [{**asdict(r), **compiled[r.name], **measured[r.name]} for r in todo]
    write_report(args, fp, results, round(time.perf_counter() - start, 1))
    return 0


def measure(args: argparse.Namespace, rows: list[tuple[str, Path, list[str]]], pool: ProcessPoolExecutor
            ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Sample the FP graph (the first row's artifact's) once per sampler of `--samplers` and each row (key,
    artifact folder, its samplers) with its Q/DQ graph, all from the noise of `--seed`, in `pool`. Returns the FP
    FD-digits per sampler and, per row key, its `quality` per sampler (FD-digits, ×FP, FD to FP samples, PSNR vs
    FP) and, for TRAJECTORY_MATRICES, its `drift` (accumulated error per step)."""
    from denoq.metrics import fd_between, fd_digits, psnr

    tasks = [(None, s) for s in args.samplers] + [(key, s) for key, _, samplers in rows for s in samplers]
    folders = {None: rows[0][1], **{key: folder for key, folder, _ in rows}}
    keep = args.matrix in TRAJECTORY_MATRICES
    outs = dict(zip(tasks, tqdm(pool.map(sample_graph, [folders[key] for key, _ in tasks],
                                         ["ort-fp" if key is None else "ort" for key, _ in tasks],
                                         [s for _, s in tasks], [args.seed] * len(tasks), [keep] * len(tasks)),
                                total=len(tasks), desc="sampling (graph, sampler) pairs", unit="pair"),
                    strict=True))
    samples = {k: v[0] for k, v in outs.items()}
    fp = {s: {"fd_digits": fd_digits(samples[(None, s)])} for s in args.samplers}
    measured = {}
    for key, _, samplers in rows:
        quality = {}
        for s in samplers:
            x = samples[(key, s)]
            fd = fd_digits(x)
            quality[s] = {"fd_digits": fd, "fd_ratio": fd / fp[s]["fd_digits"],
                          "fd_to_fp": fd_between(x, samples[(None, s)]), "psnr_vs_fp": psnr(x, samples[(None, s)])}
        drift = {}
        for s in samplers if keep else ():
            fp_states, q_states = outs[(None, s)][1], outs[(key, s)][1]
            ts = sorted(fp_states, reverse=True)
            drift[s] = {"t": ts, "value": [float((q_states[t] - fp_states[t]).norm() / fp_states[t].norm())
                                           for t in ts]}
        measured[key] = {"quality": quality, "drift": drift}
    return fp, measured


def read_studies(args: argparse.Namespace, paths: list[Path], flag: str) -> list[tuple[Path, dict[str, Any]]]:
    """The earlier study.json files of `paths`, each with its path; refuses a missing file or a study of another
    matrix."""
    studies = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"{flag} {path}: no such study.json; give the study.json files an earlier run wrote")
        study = json.loads(path.read_text())
        if study["settings"]["matrix"] != args.matrix:
            raise SystemExit(f"{flag} {path}: a {study['settings']['matrix']} study; give studies of --matrix "
                             f"{args.matrix}")
        studies.append((path, study))
    return studies


def relabelled(args: argparse.Namespace, studies: list[tuple[Path, dict[str, Any]]], flag: str
               ) -> list[tuple[dict[str, Any], Path]]:
    """The studies' rows whose `FOLDER/ROW` matches `--only`, each labelled with its study's folder (series
    `FOLDER: …`, a leading `study` label), with that folder."""
    rows = []
    for path, study in studies:
        name = path.parent.name
        rows += [({**r, "series": f"{name}: {r['series']}",
                   "labels": [("study", name), *(tuple(label) for label in r["labels"])]}, path.parent)
                 for r in study["rows"] if re.search(args.only, f"{name}/{r['name']}")]
    if not rows:
        raise SystemExit(f"{flag}: no row matches --only {args.only!r}")
    return rows


def merge(args: argparse.Namespace) -> int:
    """`--merge`: the rows of earlier studies in one table and plot; each row's series is labelled with its
    study's folder (e.g. `aq_long_s0: W4A8 per-step`); `--only` picks rows by `folder/name`. Refuses studies of
    another matrix, samplers or seed."""
    studies = read_studies(args, args.merge, "--merge")
    for path, study in studies:
        got = study["settings"]
        if (got["samplers"], got["seed"]) != (args.samplers, args.seed):
            raise SystemExit(f"--merge {path}: measured with --matrix {got['matrix']} --samplers "
                             f"{','.join(got['samplers'])} --seed {got['seed']}; merge only studies run with "
                             f"--matrix {args.matrix} --samplers {','.join(args.samplers)} --seed {args.seed}")
    results = [row for row, _ in relabelled(args, studies, "--merge")]
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args, studies[0][1]["fp"], results, 0.0)
    return 0


def resample(args: argparse.Namespace) -> int:
    """`--resample`: the artifacts of earlier studies' rows, as they are, sampled again with this run's
    `--samplers` and `--seed` (more samples, other noise) beside the FP graph sampled once, so that rows of
    several studies (e.g. calibration seeds) are measured on one evaluation; labelled and picked as by `--merge`.
    Refuses studies of another matrix or model and rows whose artifact is gone."""
    for s in args.samplers:
        parse_sampler(s)
    studies = read_studies(args, args.resample, "--resample")
    models = sorted({study["settings"]["model"] for _, study in studies})
    if len(models) > 1:
        raise SystemExit(f"--resample: the studies are of different models ({', '.join(models)}); resample one "
                         "model's studies at a time")
    args.model = models[0]
    rows = relabelled(args, studies, "--resample")
    keyed = []
    for i, (row, folder) in enumerate(rows):
        art = folder / "artifacts" / row["name"]
        if not (art / "manifest.json").is_file():
            raise SystemExit(f"--resample: the artifact {art} of row {folder.name}/{row['name']} is gone; resample "
                             "studies whose artifacts folder is still there")
        keyed.append((str(i), art, list(args.samplers)))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, initializer=_one_thread) as pool:
        fp, measured = measure(args, keyed, pool)
    results = [{**row, "samplers": list(args.samplers), **measured[key]}
               for (row, _), (key, _, _) in zip(rows, keyed, strict=True)]
    write_report(args, fp, results, round(time.perf_counter() - start, 1))
    return 0


def write_report(args: argparse.Namespace, fp: dict[str, Any], results: list[dict[str, Any]], seconds: float
                 ) -> None:
    """OUT/study.json, OUT/study.png and the markdown table on stdout."""
    report = {"fp": fp, "rows": results, "seconds": seconds,
              "settings": {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k in STUDY_LISTS else v)
                           for k, v in vars(args).items()}}
    (args.out / "study.json").write_text(json.dumps(report, indent=2) + "\n")
    xlabel = {"timegroups": "timestep groups G", "weights": "weight group size (1 = per output channel)",
              "ptqd": "1 none, 2 bias, 4 bias + k, 8 + VSC, 16 mixed precision", "accuquant": ""}[args.matrix]
    title = f"{args.model}: {args.matrix} study in ONNX Runtime, {args.samplers[0]}"
    if args.matrix in TRAJECTORY_MATRICES:
        (args.out / "study.png").write_bytes(drift_png(results, args.samplers, f"{args.model}: accumulated error "
                                                       "per step, quantized vs FP from the same noise (ORT)"))
    else:
        (args.out / "study.png").write_bytes(study_png(results, args.samplers[0], xlabel, title))
    print_table(args.matrix, results, fp, args.samplers)
    print(f"(wrote {args.out / 'study.json'} and {args.out / 'study.png'} in {report['seconds']} s)", file=sys.stderr)


def print_table(matrix: str, results: list[dict[str, Any]], fp: dict[str, Any], samplers: list[str]) -> None:
    print("FP: " + ", ".join(f"{s} FD-digits {fp[s]['fd_digits']:.2f}" for s in samplers))
    labels = [k for k, _ in results[0]["labels"]]
    extra = ["layer error / RTN", "weight bytes / FP32", "calib s"] if matrix == "weights" else ["calib s"]
    if matrix == "ptqd":
        extra = ["GBOPs / image", "calib s"]
    if matrix == "accuquant":
        extra = ["probe ε error before → after", "calib s"]
    head = [*labels, *(f"{s}: FD (×FP) · FD to FP · PSNR" for s in samplers), *extra]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        cells = [v for _, v in r["labels"]]
        for s in samplers:
            q = r["quality"].get(s)
            cells.append("—" if q is None else
                         f"{q['fd_digits']:.2f} (×{q['fd_ratio']:.3f}) · {q['fd_to_fp']:.2f} · "
                         f"{q['psnr_vs_fp']:.2f} dB")
        if matrix == "weights":
            err = r["weight_error_vs_rtn"]
            cells += ["—" if err is None else f"{err:.3f}", f"{r['weight_bytes'] / r['fp_weight_bytes']:.3f}"]
        if matrix == "ptqd":
            cells.append(f"{r['bops_per_image'] / 1e9:.1f}")
        if matrix == "accuquant":
            aq = r.get("accuquant")
            cells.append("—" if aq is None else f"{aq['probe_eps_error_before']:.4f} → "
                         f"{aq['probe_eps_error_after']:.4f}" + (" (stopped)" if aq["stopped"] else ""))
        cells.append(f"{r['calib_seconds']:.1f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
