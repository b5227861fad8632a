"""Time GPTQ and OBQ (`denoq.calibrators.gptq`) on random layers of growing width.

Each layer is `[rows, cols]` with a Hessian from correlated random inputs (rank cols/4 + noise, 2·cols samples),
float64, 4-bit weights per channel, block 128, on CUDA when torch has it. GPTQ is O(rows·cols² + cols³) and OBQ
O(rows·cols³): the fitted log-log slope of time vs columns shows the growth. `tools/bench.py` runs the same
timing as its last section (`--gptq-cols`).

    python tools/gptq_bench.py --cols 256,512,1024,2048,4096 --json gptq.json

The markdown table goes to stdout, progress to stderr, every number to `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))  # the toolkit package beside this script

from toolkit.common import log, md_table  # noqa: E402

DEFAULT_COLS = "256,512,1024,2048"


def bench_gptq(cols_list: Sequence[int], rows: int, obq_max_cols: int, seed: int) -> dict[str, Any]:
    """Seconds of GPTQ and OBQ per layer width (see module docstring; OBQ only up to `obq_max_cols` columns),
    with the log-log slope of each over ≥ 2 widths (`gptq_slope`, `obq_slope`). Deterministic inputs for `seed`."""
    from denoq.calibrators.gptq import GptqSettings, gptq, obq

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    settings = GptqSettings(bits=4)
    out: dict[str, Any] = {"device": device, "rows": rows, "threads": torch.get_num_threads(), "layers": []}
    warm = torch.eye(32, dtype=torch.float64, device=device)
    gptq(torch.randn(8, 32, generator=g).to(device), warm, settings)  # first-call overheads out of the timings
    obq(torch.randn(8, 32, generator=g).to(device), warm, settings)
    for cols in cols_list:
        basis = torch.randn(cols, cols // 4, generator=g, dtype=torch.float64)
        x = basis @ torch.randn(cols // 4, 2 * cols, generator=g, dtype=torch.float64)
        x += 0.1 * torch.randn(cols, 2 * cols, generator=g, dtype=torch.float64)
        h = (2 * x @ x.T / x.shape[1]).to(device)
        w = torch.randn(rows, cols, generator=g).to(device)
        entry: dict[str, Any] = {"cols": cols}
        for name, fn in (("gptq", gptq), ("obq", obq)):
            if name == "obq" and cols > obq_max_cols:
                continue
            start = time.perf_counter()
            fn(w, h, settings)
            if device == "cuda":
                torch.cuda.synchronize()
            entry[f"{name}_s"] = time.perf_counter() - start
        log(f"gptq timing: {rows}×{cols}: " + ", ".join(f"{k} {v:.2f}" for k, v in entry.items() if k != "cols"))
        out["layers"].append(entry)
    for name in ("gptq", "obq"):
        pts = [(e["cols"], e[f"{name}_s"]) for e in out["layers"] if f"{name}_s" in e]
        if len(pts) >= 2:
            lx = np.log([c for c, _ in pts])
            ly = np.log([max(t, 1e-9) for _, t in pts])
            out[f"{name}_slope"] = float(np.polyfit(lx, ly, 1)[0])
    return out


def gptq_table(r: dict[str, Any]) -> str:
    """A line naming the setting and the slopes, then one table row per width (`—` where OBQ did not run)."""
    summary = (f"{r['rows']} rows, 4-bit, per channel, on {r['device']} ({r['threads']} torch threads); "
               f"log-log slope of time vs columns: GPTQ {r.get('gptq_slope', float('nan')):.2f}"
               + (f", OBQ {r['obq_slope']:.2f}" if "obq_slope" in r else ""))
    rows = [[str(e["cols"]), f"{e['gptq_s']:.2f}", f"{e['obq_s']:.2f}" if "obq_s" in e else "—"] for e in r["layers"]]
    return summary + "\n\n" + md_table(["columns", "GPTQ s", "OBQ s"], rows)


def add_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The timing's options (`--{prefix}cols`, `--{prefix}rows`, `--obq-max-cols`) on `p`; `--{prefix}cols` is a
    comma-separated string (`parse_cols`)."""
    p.add_argument(f"--{prefix}cols", default=DEFAULT_COLS,
                   help=f"GPTQ timing: comma-separated column counts of random layers; empty = skip (default: "
                        f"{DEFAULT_COLS})")
    p.add_argument(f"--{prefix}rows", type=int, default=512,
                   help="GPTQ timing: rows of each random layer (default: 512)")
    p.add_argument("--obq-max-cols", type=int, default=512, help="GPTQ timing: also time OBQ up to this many columns")


def parse_cols(text: str) -> list[int]:
    """`256,512` → [256, 512]; empty → []."""
    return [int(c) for c in text.split(",") if c.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(p)
    p.add_argument("--seed", type=int, default=0, help="the random layers' seed (default: 0)")
    p.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    args = p.parse_args(argv)
    report = bench_gptq(parse_cols(args.cols), args.rows, args.obq_max_cols, args.seed)
    print(gptq_table(report), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
