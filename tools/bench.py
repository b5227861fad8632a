"""Benchmark denoq's quantized graphs against FP32 and against ONNX Runtime's own `quantize_static`, side by side.

Everything is measured in one run on this machine, so the numbers to read are the *ratios* (docs/architecture.md,
Measuring quality: targets are ratios to the FP model measured in the same run).

1. **Latency** (ONNX Runtime CPU, per model call, `--threads` intra-op threads, spinning off): for every model of
   `--models` and every batch of `--batches`, five graphs of the same model:
   - `FP32`: the artifact's `model.fp.onnx`;
   - `denoq trt`: `model.qdq.onnx` of a `w8a8` compile (symmetric int8, inputs only: TensorRT's rules);
   - `denoq ort-cpu`: `model.qdq.onnx` of a `w8a8-ort` compile (uint8 activations, quantized outputs);
   - `ORT quantize_static`: what a user would pick today: `onnxruntime.quantization.quantize_static` on our
     `model.fp.onnx`, QDQ format, int8 activations and weights, per channel, symmetric both, MinMax calibration
     (ORT's default) over exactly the calibration inputs our compile used (the same FP DDIM trajectories,
     recomputed with the recipe's settings and seed; checked against the manifest's record). `quant_pre_process`
     is skipped unless `--peer-preprocess`: it makes slower graphs here (see `quantize_peer`).
   - `ORT quantize_static, t-emb. + keep_fp FP`: the same, with the fix a user would find, `nodes_to_exclude` = the
     ops between the `timestep` input and the first layer (the sinusoidal timestep embedding), plus the layers our
     recipe keeps in float (`layers.keep_fp`, default conv_in/conv_out) so that both quantize the same layers.
     With ORT's default op
     types the peer quantizes `t·freq` (up to ~1000) to int8 before Sin/Cos (a step of ~7), which destroys the
     time embedding; the quality section shows what that costs.
   The variants are interleaved: `--rounds` rounds, each timing every variant once (`--iters` calls after one
   warm-up call, in a rotated order), after a warm-up of every session. A variant's latency is the median of its
   round medians; its speed-up is the median over rounds of FP32 / variant within the round (the machine is
   shared: load that changes between rounds cancels), printed with its range over the rounds. Feeds are
   prepared numpy arrays (`session.run` only).
   Each quantized graph's integer-kernel fusion is read from the graph ORT optimized (`fusion_report`).
   **Timestep selector overhead** (`--groups G`, default 4; 1 = off): two more graphs, `denoq trt G=4` and
   `denoq ort-cpu G=4`, compiled from the same profiles with `activations.timestep_groups=G` added to the recipe
   (layers whose input scales differ between timestep groups get the selector `x → Mul(Gather(r, t)) → Q → DQ →
   layer → Div → Add(bias)`, `denoq.passes.selector`), timed in the same interleaved rounds. Their overhead is
   the median over rounds of G-graph ms / G=1-graph ms of the same profile within the round (goal: ≤ 1.05), in
   a separate table with the G graphs' fusion fraction. G must not exceed the calibrated timesteps
   (`calib.steps`). The quality section does not sample these graphs.
2. **Quality** on the default model `digits`: the FP model (PyTorch), the FP32 ONNX graph, both denoq graphs and
   both peer graphs sample from the same noise with the same sampler (DDIM, `--steps` steps, η = 0, `--n` samples,
   `--seed`); every ONNX graph runs in ONNX Runtime. Reported: FD-digits (and its ratio to FP), FD to the FP
   samples and PSNR vs the FP samples.

Models: `digits` (the embedded default), `big` (a conv-heavy random-weight UNet2DModel, seeded, 4×32×32, calibrated
with few trajectories since only its speed matters) or the path of any diffusers pipeline folder.

    OMP_NUM_THREADS=1 python tools/bench.py --json /tmp/bench.json 2>&1 | tee /tmp/bench.log

Progress goes to stderr, the markdown tables (ready for the README) to stdout, all numbers to `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))  # the toolkit package and gptq_bench beside this script

from gptq_bench import add_options, bench_gptq, gptq_table, parse_cols  # noqa: E402
from toolkit.bench.prepare import Prepared, prepare  # noqa: E402
from toolkit.bench.quality import bench_quality  # noqa: E402
from toolkit.bench.tables import TABLES, Settings, render_table  # noqa: E402
from toolkit.bench.timing import bench_fusion, bench_latency  # noqa: E402
from toolkit.common import elapsed, log  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options (see `--help`), with `--models`, `--batches` and `--gptq-cols` split into lists."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits,big",
                   help="comma-separated: digits, big, or diffusers pipeline folders (default: digits,big)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes for latency (default: 1,8)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default: 7)")
    p.add_argument("--iters", type=int, default=0,
                   help="calls per variant per round; 0 = about --round-seconds for the slowest (default: 0)")
    p.add_argument("--round-seconds", type=float, default=0.5, help="target seconds per measurement (default: 0.5)")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default: 2)")
    p.add_argument("--n", type=int, default=512, help="samples for the quality section (default: 512)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps for the quality section (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling noise seed and the big model's seed (default: 0)")
    p.add_argument("--quality-model", default="digits", help="model for the quality section (default: digits)")
    p.add_argument("--skip-quality", action="store_true", help="latency and fusion only")
    p.add_argument("--skip-latency", action="store_true", help="quality only")
    p.add_argument("--groups", type=int, default=4,
                   help="timestep groups of the selector variants (denoq trt/ort-cpu G=N, timed against G=1); "
                        "1 = no selector variants (default: 4)")
    p.add_argument("--ptqd-head", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the trt graph with PTQD's correction head appended (default: on)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every compile (after the per-model defaults), repeatable")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where models, artifacts and the peer's graphs go (kept); default: a temp dir, removed")
    p.add_argument("--reuse", action="store_true",
                   help="reuse artifacts of the same recipe found in --out-dir (and the peer's graph as found)")
    p.add_argument("--peer-preprocess", action="store_true",
                   help="run onnxruntime's quant_pre_process before quantize_static (slower graphs here; off)")
    add_options(p, prefix="gptq-")
    p.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    args = p.parse_args(argv)
    args.gptq_cols = parse_cols(args.gptq_cols)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.groups < 1:
        p.error("--groups must be ≥ 1")
    if args.reuse and args.out_dir is None:
        p.error("--reuse needs --out-dir")
    return args


def environment() -> dict[str, Any]:
    """The machine and library versions the numbers were measured with (load average at the start)."""
    from denoq.compiler.artifact import library_versions
    from denoq.cpu import cpu_record

    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "versions": library_versions(), "loadavg_start": list(os.getloadavg()), "cpu": cpu_record()}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Prepare every model in `work`, time it, and sample the quality model; returns the JSON report."""
    report: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "environment": environment(), "models": {}}
    names = list(args.models)
    if not args.skip_quality and args.quality_model not in names:
        names.append(args.quality_model)
    prepared: dict[str, Prepared] = {}
    for name in names:
        start = time.perf_counter()
        prep = prepare(name, work, args.sets, args.seed, args.reuse, args.peer_preprocess,
                       args.groups if name in args.models else 1, args.ptqd_head and name in args.models)
        prepared[name] = prep
        entry: dict[str, Any] = {"info": prep.info, "paths": {k: str(p) for k, p in prep.paths.items()}}
        entry["info"]["prepare_seconds"] = round(time.perf_counter() - start, 1)
        if name in args.models:
            entry["fusion"] = bench_fusion(prep)
            if not args.skip_latency:
                entry["latency"] = bench_latency(prep, args.batches, args.rounds, args.iters, args.threads,
                                                 args.round_seconds, args.groups)
        report["models"][prep.name] = entry
    if not args.skip_quality:
        prep = prepared[args.quality_model]
        report["quality"] = {"model": prep.name, **bench_quality(prep, steps=args.steps, seed=args.seed, n=args.n,
                                                                 threads=args.threads)}
    if args.gptq_cols:
        report["gptq"] = bench_gptq(args.gptq_cols, args.gptq_rows, args.obq_max_cols, args.seed)
    report["environment"]["loadavg_end"] = list(os.getloadavg())
    report["seconds"] = round(elapsed(), 1)
    return report


def render(report: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown printed to stdout: every table the report has rows for, the GPTQ timing, the CPU and the run."""
    settings = Settings(groups=args.groups, threads=args.threads, rounds=args.rounds)
    parts = [text for table in TABLES if (text := render_table(table, report, settings)) is not None]
    if "gptq" in report:
        parts.append("## GPTQ / OBQ time vs layer width\n\n" + gptq_table(report["gptq"]))
    env = report["environment"]
    cpu = env["cpu"]
    parts.append(f"CPU: {cpu['model']}, instruction set seen by ONNX Runtime: {cpu['isa']} (u8×s8 kernels "
                 f"{'saturate' if cpu['u8s8_saturates'] else 'exact'} without session.x64quantprecision).")
    parts.append(f"Run: {report['seconds']:.0f} s on {env['cpu_count']} CPUs (load average "
                 f"{env['loadavg_start'][0]:.1f} → {env['loadavg_end'][0]:.1f}), onnxruntime "
                 f"{env['versions']['onnxruntime']}, torch {env['versions']['torch']}.")
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench with `argv`'s options: tables to stdout, progress to stderr, the report to `--json`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "accelerate not found" on every model load
    args = parse_args(argv)
    work = args.out_dir or Path(tempfile.mkdtemp(prefix="denoq-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"working in {work}")
    try:
        report = run(args, work)
    finally:
        if args.out_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(render(report, args), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
