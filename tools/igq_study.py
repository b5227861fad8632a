"""IGQ-ViT on the DiT: per-tensor activations against instance-aware groups, at several precisions, side by side.

Rows: for each precision of `--precisions` (W8A8, W6A6, W4A8, W4A4; TensorRT profile, attention in float), the
per-tensor baseline and IGQ-ViT's dynamic groups at every G of `--groups` (`activations.igq_groups`), static
groups (`activations.igq_mode=static`, TensorRT-deployable) at the same G where `--static` is given, and for the
4-bit-weight precisions the BOP-budget allocation (`activations.igq_budget`, `--budget`, up to the largest G).
Every row's Q/DQ graph samples in ONNX Runtime from the same noise and labels as the FP graph (`denoq eval
--guidance`, labels cycling through the digits, DDIM `--steps`, `--n` samples): FD-digits, PSNR vs FP, FD to FP,
class accuracy, BOPs per call (`denoq.bops`, the group overhead included) and the ORT latency of the Q/DQ graph
against the FP graph (batch 1 and 8, `denoq eval`'s latency table).

    OMP_NUM_THREADS=1 python tools/igq_study.py --static --out /tmp/igq 2>&1 | tee /tmp/igq.log

Output: the markdown table on stdout; `OUT/study.json`; `OUT/study.png` (PSNR vs FP and FD to FP against G per
precision); artifacts and their evaluation pictures under `OUT/art/`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from denoq.compiler.artifact import Artifact
from denoq.compiler.evaluate import EvalSettings, evaluate
from denoq.compiler.pipeline import compile_model
from denoq.compiler.recipe import load_recipe
from denoq.figures import figure_png

PRECISIONS = {"W8A8": ("w8a8", []), "W6A6": ("w8a8", ["weights.bits=6", "activations.bits=6"]),
              "W4A8": ("w4a8", []), "W4A4": ("w4a8", ["activations.bits=4"])}
KEYS = ("fd_digits_fp", "fd_digits", "fd_to_fp", "psnr_vs_fp", "class_accuracy_fp", "class_accuracy")


def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(name, precision, mode, G, recipe overrides) of every row."""
    out = []
    for prec in args.precisions.split(","):
        out.append({"name": f"{prec}-tensor", "precision": prec, "mode": "per-tensor", "groups": 0, "sets": []})
        for g in args.groups:
            out.append({"name": f"{prec}-igq{g}", "precision": prec, "mode": "dynamic", "groups": g,
                        "sets": [f"activations.igq_groups={g}"]})
            if args.static:
                out.append({"name": f"{prec}-static{g}", "precision": prec, "mode": "static", "groups": g,
                            "sets": [f"activations.igq_groups={g}", "activations.igq_mode=static"]})
        if prec.startswith("W4"):
            g = max(args.groups)
            out.append({"name": f"{prec}-alloc{g}", "precision": prec, "mode": f"dynamic, BOPs ≤ {args.budget:g}×",
                        "groups": g, "sets": [f"activations.igq_groups={g}", f"activations.igq_budget={args.budget}"]})
    return [r for r in out if re.search(args.only, r["name"])]


def run_row(row: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    preset, sets = PRECISIONS[row["precision"]]
    out = args.out / "art" / row["name"]
    start = time.perf_counter()
    if (out / "manifest.json").exists():
        art = Artifact.open(out)
    else:
        art = compile_model(args.model, load_recipe(preset, [*sets, *row["sets"], *args.sets]), out)
    seconds = round(time.perf_counter() - start, 1)
    report = evaluate(art, EvalSettings(sampler="ddim", steps=args.steps, n=args.n, threads=1,
                                        guidance=args.guidance))
    lat = report["latency_ms"]
    return {**{k: v for k, v in row.items() if k != "sets"}, "compile_seconds": seconds,
            "bops_per_call": art.manifest["cost"]["bops_per_call"], **{k: report[k] for k in KEYS},
            "latency_ms_b1": lat["batch1"]["qdq"], "latency_fp_ms_b1": lat["batch1"]["fp32"],
            "latency_ms_b8": lat["batch8"]["qdq"], "latency_fp_ms_b8": lat["batch8"]["fp32"],
            "igq_layers": (art.manifest["calibration"].get("igq") or {}).get("layers")}


def study_png(results: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for prec in dict.fromkeys(r["precision"] for r in results):
        for mode, style in (("dynamic", "-o"), ("static", "--s")):
            mine = sorted((r for r in results if r["precision"] == prec and r["mode"] == mode),
                          key=lambda r: r["groups"])
            if mine:
                g = [r["groups"] for r in mine]
                a.plot(g, [r["psnr_vs_fp"] for r in mine], style, label=f"{prec} {mode}")
                b.plot(g, [r["fd_to_fp"] for r in mine], style, label=f"{prec} {mode}")
        tensor = [r for r in results if r["precision"] == prec and r["mode"] == "per-tensor"]
        if tensor:
            a.axhline(tensor[0]["psnr_vs_fp"], ls=":", lw=0.8, color="grey")
    a.set(xlabel="groups G", ylabel="PSNR vs FP (dB)", title="higher is better (dotted: per-tensor)", xscale="log")
    b.set(xlabel="groups G", ylabel="FD to FP samples", title="lower is better", xscale="log", yscale="log")
    ticks = sorted({r["groups"] for r in results if r["groups"]})
    for ax in (a, b):
        ax.set_xticks(ticks, labels=[str(g) for g in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-dit")
    p.add_argument("--precisions", default="W8A8,W6A6,W4A8,W4A4")
    p.add_argument("--groups", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--static", action="store_true", help="also the static (TensorRT) groups")
    p.add_argument("--budget", type=float, default=1.05, help="BOP budget of the allocation rows")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=20,
                   help="DDIM steps (20: the shipped DiT's FP samples read as the requested digit 93% of the time at "
                        "guidance 2 with 20 steps, 50% with 50)")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--only", default="", help="regex on the row names")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    results = []
    for row in rows(args):
        res = run_row(row, args)
        results.append(res)
        print(json.dumps(res), file=sys.stderr, flush=True)
    (args.out / "study.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": results},
                                                    indent=2, sort_keys=True, default=str) + "\n")
    (args.out / "study.png").write_bytes(study_png(results))
    print("| row | groups | FD-digits (FP) | PSNR vs FP (dB) | FD to FP | class acc. (FP) | MBOPs/call | "
          "ORT ms b1 (FP) | ORT ms b8 (FP) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        b8 = f"{r['latency_ms_b8']:.1f} ({r['latency_fp_ms_b8']:.1f})"
        print(f"| {r['name']} | {r['mode']} {r['groups'] or ''} | {r['fd_digits']:.1f} ({r['fd_digits_fp']:.1f}) | "
              f"{r['psnr_vs_fp']:.2f} | {r['fd_to_fp']:.2f} | {100 * r['class_accuracy']:.0f}% "
              f"({100 * r['class_accuracy_fp']:.0f}%) | {r['bops_per_call'] / 1e6:.0f} | "
              f"{r['latency_ms_b1']:.2f} ({r['latency_fp_ms_b1']:.2f}) | {b8} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
