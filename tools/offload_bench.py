"""Block-wise offloading (`calib.offload=disk`) against whole-model calibration: peak memory and time, side by side.

For each case (a random-init full-size denoiser with a released architecture's config, `fullsize_bench.py`'s, and a
recipe), the calibrate stage runs twice in child processes, with the model in memory and with `calib.offload=disk`:
random text conditioning, one trajectory of two steps at latent side `--size`. Reported per run: the model's float32
MB, the calibration's peak resident set (`calibration.memory_peak_mb`: measured after the model is loaded, and for
offloading after its units are written out), the process's peak (`ru_maxrss`: loading the model included),
calibration and weight-rounding seconds, the offloaded units, the largest one and the unit loads; and whether the
two plans are identical (every integer and scale, and PTQD's statistics where the recipe has them).

    python tools/offload_bench.py --cases sd3:w8a8,sdxl:w8a8,pixart@4:w4a8-fast --size 32 --work offload-work \\
        --json offload.json
    python tools/offload_bench.py --cases sdxl:w8a8+ptqd.enabled=true --json offload-ptqd.json

The markdown table goes to stdout, progress to stderr, every number (with the CPU model) to `--json`.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from fullsize_bench import make_folder  # noqa: E402
from toolkit.common import log, records_table, run_child  # noqa: E402


def child(folder: Path, recipe: str, offload: str, size: int, plan_out: Path) -> dict[str, Any]:
    """Calibrate (in this process) and write the plan's tensors and PTQD's to `plan_out`: the numbers of one run.
    `recipe`: a preset, then `+KEY=VALUE` settings."""
    from safetensors.torch import save_file

    from denoq.compiler.calibrate import calibrate
    from denoq.compiler.load import load_model
    from denoq.compiler.recipe import load_recipe

    spec = load_model(str(folder), size=size)
    model_mb = sum(p.numel() * p.element_size() for p in spec.module.parameters()) / 2**20
    preset, *extra = recipe.split("+")
    sets = ["calib.conditioning=random", "calib.samples=1", "calib.steps=2", f"calib.offload={offload}", *extra]
    start = time.perf_counter()
    cal = calibrate(spec, load_recipe(preset, sets))
    row: dict[str, Any] = {"model_mb": round(model_mb), "calibrate_s": round(time.perf_counter() - start, 1),
                           "weights_s": cal.info["weights"].get("seconds"),
                           "calibration_peak_mb": cal.info.get("memory_peak_mb"),
                           "process_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if "offload" in cal.info:
        o = cal.info["offload"]
        row.update(units=o["units"], largest_unit=f"{o['largest_unit']} ({o['largest_unit_mb']:.0f} MB)",
                   loads=o["loads"])
    save_file({**cal.plan.tensors(), **({} if cal.ptqd is None else cal.ptqd.to_tensors())}, str(plan_out))
    return row


def same_plan(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="sd3:w8a8,sdxl:w8a8,pixart@4:w4a8-fast",
                    help="comma-separated MODEL:RECIPE[+KEY=VALUE...]; MODEL@N: a transformer with N blocks")
    ap.add_argument("--size", type=int, default=32, help="calib.size: the latent side of the calibration samples")
    ap.add_argument("--work", type=Path, default=Path("offload-work"), help="folder for the models and plans")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--child", nargs=4, metavar=("FOLDER", "RECIPE", "OFFLOAD", "PLAN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        folder, recipe, offload, plan = args.child
        print(json.dumps(child(Path(folder), recipe, offload, args.size, Path(plan))))
        return
    from denoq.cpu import cpu_record

    rows = []
    for case in args.cases.split(","):
        name, recipe = case.split(":")
        base, _, blocks = name.partition("@")
        folder = args.work / f"{name}-model"
        if not (folder / "model_index.json").exists():
            log(f"{name}: saving the random-init model")
            make_folder(base, folder, int(blocks) if blocks else None)
        plans = {}
        for offload in ("none", "disk"):
            plans[offload] = args.work / f"{name}-{recipe}-{offload}.safetensors"
            log(f"{case}: calibrating, calib.offload={offload} (child process)")
            cmd = [sys.executable, __file__, "--child", str(folder), recipe, offload, str(plans[offload]),
                   "--size", str(args.size)]
            row: dict[str, Any] = {"model": name, "recipe": recipe, "offload": offload, **run_child(cmd)}
            log(f"{case}: {row}")
            rows.append(row)
        if all(p.exists() for p in plans.values()):
            rows[-1]["same_plan"] = same_plan(plans["none"], plans["disk"])
    print(records_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_record(), "size": args.size, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
