"""Data-parallel calibration (docs/distributed.md): the same compile in one process and under
`torchrun --standalone --nproc-per-node N`, side by side.

Each case is one `denoq compile` of the embedded model with a recipe (W4A8 GPTQ + PTQD, W4A8 with its block
reconstruction, W8A8 with 3 timestep groups), run once with 1 process and once with N ranks (gloo on the CPU, NCCL
where CUDA is). Reported per run: the calibration seconds, the weight rounding's part of them and the calibration
peak memory that rank 0 writes to the artifact's `timings.json` (`calibration.seconds`,
`calibration.weights.seconds`, `calibration.memory_peak_mb`: RSS on the CPU, CUDA allocation on a GPU); every rank's
CPU seconds in calibration (what a rank computes, whatever else the machine runs) and process peak RSS (`ru_maxrss`,
the export included on rank 0); the whole command's wall seconds; then the ratios N ranks / 1 process. Every process
runs `--threads` CPU threads (default 1: one core plays one device). The 1-minute load average before and after says
how busy the machine was.

    python tools/distributed_bench.py --samples 64 --steps 10 --json distributed.json

`--samples` / `--steps` default to the recipes' own calib.samples / calib.steps. The markdown table goes to stdout,
progress to stderr, every number (with the CPU model, `lscpu`'s) to `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))  # the toolkit package beside this script

from toolkit.common import fmt, log, md_table  # noqa: E402

from denoq.cpu import cpu_model  # noqa: E402

CASES = {
    "w4a8 gptq + ptqd": ["--recipe", "w4a8-fast", "--set", "ptqd.enabled=true"],
    "w4a8 (gptq + block reconstruction)": ["--recipe", "w4a8"],
    "w8a8 timestep_groups=3": ["--recipe", "w8a8", "--set", "activations.timestep_groups=3"],
}

#: Each process runs the command line and writes FOLDER/rank<RANK>.json: its peak RSS (MB) and the CPU and wall
#: seconds of its calibration (`denoq.compiler.calibrate._calibrate`, timed around). No `$` in it: torchrun
#: substitutes its macros in the arguments.
WRAP = """import json, os, resource, sys, time
import denoq.compiler.calibrate as stage
from denoq.compiler.cli import main
folder = sys.argv.pop(1)
spent = {}
inner = stage._calibrate
def timed(*args, **kwargs):
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        return inner(*args, **kwargs)
    finally:
        spent.update(calibration_cpu_s=time.process_time() - cpu, calibration_wall_s=time.perf_counter() - wall)
stage._calibrate = timed
try:
    code = main(sys.argv[1:])
finally:
    spent['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(os.path.join(folder, 'rank' + os.environ.get('RANK', '0') + '.json'), 'w') as f:
        json.dump(spent, f)
sys.exit(code)
"""


def run_compile(args: list[str], ranks: int, folder: Path, threads: int) -> dict[str, Any]:
    """`denoq compile ARGS --out folder/art` with `ranks` processes: its wall seconds, rank 0's timings.json
    numbers and every rank's peak RSS (MB)."""
    folder.mkdir(parents=True)
    program = [sys.executable, "-c", WRAP, str(folder), "compile", *args, "--out", str(folder / "art"), "--quiet"]
    if ranks > 1:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        program = [torchrun, "--standalone", "--nproc-per-node", str(ranks), "--no-python", *program]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(program, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(program[:6])} … failed ({done.returncode}):\n{done.stderr[-3000:]}")
    calibration = json.loads((folder / "art" / "timings.json").read_text())["calibration"]
    per_rank = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(ranks)]
    return {"ranks": ranks, "wall_s": round(wall, 2), "calibration_s": calibration["seconds"],
            "weights_s": calibration.get("weights", {}).get("seconds"),
            "calibration_peak_mb": calibration.get("memory_peak_mb"),
            "rank_calibration_cpu_s": [round(r["calibration_cpu_s"], 2) for r in per_rank],
            "rank_peak_rss_mb": [round(r["peak_rss_mb"], 1) for r in per_rank]}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is under 0.1 (too small to compare)."""
    return None if a is None or b is None or b < 0.1 else round(a / b, 3)


def _cell(one: float | None, many: float | None, spec: str = ".1f") -> str:
    """`one / many (many/one)`."""
    return f"{fmt(one, spec)} / {fmt(many, spec)} ({fmt(ratio(many, one))})"


def _each(one: list[float], many: list[float]) -> str:
    """`one / rank 0, rank 1, … (largest rank / one)`."""
    return f"{one[0]:.1f} / {', '.join(f'{m:.1f}' for m in many)} ({fmt(ratio(max(many), one[0]))})"


def table(results: dict[str, list[dict[str, Any]]], n: int) -> str:
    """One row per case: 1 process, n ranks and n / 1 for calibration seconds (wall, rank 0; CPU, each rank; the
    weight rounding's part), the command's wall seconds and peak memory."""
    rows = [[case, _cell(one["calibration_s"], many["calibration_s"]),
             _each(one["rank_calibration_cpu_s"], many["rank_calibration_cpu_s"]),
             _cell(one["weights_s"], many["weights_s"]), _cell(one["wall_s"], many["wall_s"]),
             _cell(one["calibration_peak_mb"], many["calibration_peak_mb"], ".0f"),
             _each(one["rank_peak_rss_mb"], many["rank_peak_rss_mb"])]
            for case, (one, many) in results.items()]
    return md_table(["case", f"calibration wall s: 1 / {n} ranks", "calibration CPU s: 1 / each rank",
                     "of which weights s: 1 / rank 0", "command wall s", "calibration peak MB: 1 / rank 0",
                     "process peak RSS MB: 1 / each rank"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits", help="an embedded model's name or a diffusers pipeline folder")
    ap.add_argument("--ranks", type=int, default=2, help="torchrun --nproc-per-node")
    ap.add_argument("--samples", type=int, help="calib.samples (default: the recipe's)")
    ap.add_argument("--steps", type=int, help="calib.steps (default: the recipe's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    ap.add_argument("--work", type=Path, help="keep the artifacts here (default: a temporary folder, removed)")
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args()

    sets = ["--set", f"seed={args.seed}"]
    sets += [] if args.samples is None else ["--set", f"calib.samples={args.samples}"]
    sets += [] if args.steps is None else ["--set", f"calib.steps={args.steps}"]
    work = args.work or Path(tempfile.mkdtemp(prefix="distributed-bench-"))
    results: dict[str, list[dict[str, Any]]] = {}
    load = [os.getloadavg()[0]]
    try:
        for i, case in enumerate(args.cases.split(",")):
            compile_args = [args.model, *CASES[case], *sets]
            results[case] = []
            for ranks in (1, args.ranks):
                log(f"{case}: {ranks} process(es)")
                results[case].append(run_compile(compile_args, ranks, work / f"case{i}-ranks{ranks}", args.threads))
                log(f"  {results[case][-1]}")
        load.append(os.getloadavg()[0])
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
              "cuda": torch.cuda.is_available(), "threads_per_process": args.threads, "model": args.model,
              "load_average_1min": [round(v, 2) for v in load], "sets": sets, "results": results}
    print(table(results, args.ranks))
    print(f"\n{report['cpu']}, {report['cores']} cores, {args.threads} thread(s) per process, torch "
          f"{report['torch']}; 1-minute load average before / after: {load[0]:.1f} / {load[-1]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
