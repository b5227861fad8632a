"""Peak memory of one AccuQuant iteration vs the window length n: the O(1) `recompute` gradients against the naive
back-propagation through the whole window.

Each (variant, n) runs in a fresh process (`--child`): it loads the model and a W4A8 plan, builds the learnable
quantizers, runs one warm-up iteration (n = 1, batch 1), then resets the kernel's peak-RSS counter
(`/proc/self/clear_refs`, Linux; glibc told to return freed memory, `MALLOC_ENV`) and runs one iteration at n: the
FP window (target), the quantized window and the backward pass, as
`denoq.calibrators.accuquant.reconstruct` does. Reported: peak RSS during that iteration minus the RSS before it
(MB), the seconds it took, and per variant the ratio to its n = 1 (goal for `recompute`: n = 8 ≤ 1.2× n = 1). On a
CUDA machine (`--device cuda`) the peak is torch's `max_memory_allocated` instead. `--block NAME` measures block
granularity (`accuquant.granularity=block`): that top-level block's layers learn, every other one is hard-rounded.

    OMP_NUM_THREADS=1 python tools/accuquant_memory.py --windows 1,2,4,8 --batch 32
    OMP_NUM_THREADS=1 python tools/accuquant_memory.py --windows 1,2,4,8 --batch 32 --block mid_block
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOAL = 1.2
#: glibc: serve every allocation ≥ 64 KiB by mmap and return it on free (a fixed threshold also turns off glibc's
#: dynamic one), so RSS follows the live tensors instead of what the heap kept from earlier frees.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement (runs in its own process)."""
    import torch

    from denoq.calibrators.accuquant_window import Window, sampler_step, window_backward
    from denoq.calibrators.learnable import LearnableModel
    from denoq.calibrators.weights import top_block
    from denoq.compiler.artifact import Artifact
    from denoq.compiler.backends import artifact_model, artifact_plan
    from denoq.memory import PeakMemory
    from denoq.sampling import NoiseSchedule, module_eps

    torch.set_num_threads(1)
    device = torch.device(args.device)
    art = Artifact.open(args.art)
    spec = artifact_model(art)
    model = spec.module.to(device)
    plan = artifact_plan(art)
    q = LearnableModel(model, plan).to(device).train()
    if args.block:  # block granularity: that block learns, every other one holds its hard rounding
        learning = [name for name in plan.layers if top_block(name) == args.block]
        if not learning:
            raise SystemExit(f"--block {args.block} holds no planned layer")
        q.stage([name for name in plan.layers if name not in learning], learning)
    schedule = NoiseSchedule.from_config(spec.scheduler_config)
    step = sampler_step(schedule, "ddim")
    ts = schedule.timesteps(50, "ddim").tolist()
    prev = schedule.prev_timesteps(50, "ddim").tolist()
    g = torch.Generator().manual_seed(0)

    def iteration(n: int, batch: int = args.batch) -> float:
        shape = (batch, *spec.sample_shape)
        window = Window(torch.randn(shape, generator=g).to(device), [(ts[20 + k], prev[20 + k]) for k in range(n)],
                        [torch.randn(shape, generator=g).to(device) for _ in range(n)])
        for p in q.parameters():
            p.grad = None
        return window_backward(module_eps(q), module_eps(model), window, step, args.objective, args.variant,
                               args.gradient)

    iteration(1, batch=1)  # one-time allocations (autograd engine, thread pools) out of the measurement
    start = time.perf_counter()
    with PeakMemory(device) as peak:
        iteration(args.n)
    if peak.mb is None or peak.base_mb is None:
        raise SystemExit("no peak memory on this system: needs Linux's /proc/self/clear_refs or a CUDA device")
    return {"variant": args.variant, "n": args.n, "peak_mb": peak.mb - peak.base_mb,
            "seconds": time.perf_counter() - start, "device": str(device), "batch": args.batch}


def compile_plan(model: str, out: Path) -> Path:
    from denoq.compiler.pipeline import compile_model
    from denoq.compiler.recipe import load_recipe

    recipe = load_recipe("w4a8", ["weights.method=rtn", "calib.samples=8", "calib.steps=10"])
    compile_model(model, recipe, out, force=True)
    return out


def main(argv: list[str] | None = None) -> int:
    from denoq.calibrators.accuquant import AccuQuantSettings
    from denoq.calibrators.choices import GRADIENTS, OBJECTIVES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits")
    p.add_argument("--windows", default="1,2,4,8", help="comma-separated window lengths n")
    p.add_argument("--variants", default="recompute,naive")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--objective", default=AccuQuantSettings.objective, choices=OBJECTIVES,
                   help="the window's loss (accuquant.objective): its end state, every state, or the model outputs")
    p.add_argument("--gradient", default=AccuQuantSettings.gradient, choices=GRADIENTS,
                   help="accuquant.gradient: stop at the model inputs, or full (through them); default: the "
                        "calibrator's")
    p.add_argument("--device", default="cpu", help="cpu, or cuda where torch has it")
    p.add_argument("--block", default="", help="block granularity (accuquant.granularity=block): the top-level "
                   "block that learns, e.g. mid_block, the others hard-rounded; default: every layer learns")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--art", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="recompute", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    windows = [int(v) for v in args.windows.split(",") if v]
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory(prefix="denoq-aqmem-") as tmp:
        art = compile_plan(args.model, Path(tmp) / "art")
        rows = []
        for variant in variants:
            for n in windows:
                cmd = [sys.executable, __file__, "--child", "--art", str(art), "--variant", variant, "--n", str(n),
                       "--batch", str(args.batch), "--device", args.device, "--objective", args.objective,
                       "--gradient", args.gradient, "--block", args.block]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True, env={
                    **os.environ, "OMP_NUM_THREADS": "1", **MALLOC_ENV})
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(f"{variant} n={n}: {rows[-1]['peak_mb']:.1f} MB, {rows[-1]['seconds']:.2f} s", file=sys.stderr)
    base = {r["variant"]: r["peak_mb"] for r in rows if r["n"] == windows[0]}
    print(f"Peak memory of one iteration ({args.model}, batch {args.batch}, objective {args.objective}, "
          f"gradient {args.gradient}, {'block ' + args.block if args.block else 'every layer learning'}, "
          f"{rows[0]['device']}; "
          f"ratio to n = {windows[0]} of the same variant)\n")
    print("| variant | " + " | ".join(f"n = {n}" for n in windows) + " |")
    print("|---|" + "---|" * len(windows))
    for variant in variants:
        cells = [f"{r['peak_mb']:.1f} MB (×{r['peak_mb'] / base[variant]:.2f}), {r['seconds']:.2f} s"
                 for r in rows if r["variant"] == variant]
        print(f"| {variant} | " + " | ".join(cells) + " |")
    worst = max((r for r in rows if r["variant"] == "recompute"), key=lambda r: r["n"], default=None)
    if worst is not None:
        ratio = worst["peak_mb"] / base["recompute"]
        print(f"\nrecompute n = {worst['n']} / n = {windows[0]}: ×{ratio:.2f} (goal ≤ {GOAL}): "
              + ("met" if ratio <= GOAL else "not met"))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
