"""Quality of a class-conditional model under classifier-free guidance, quantized with and without PTQD.

For each preset of `--presets` (default W8A8 and W4A8, TensorRT profile): one artifact calibrated on trajectories
guided at every scale of `--guidance` (`calib.guidance`), evaluated at each scale; and one artifact per scale with
PTQD (`ptqd.enabled`, `ptqd.vsc`) calibrated on trajectories guided at that scale, its head after the guidance
combination. Every row samples the Q/DQ graph in ONNX Runtime and the FP graph from the same noise and labels
(`denoq eval --guidance S`: labels cycle through the classes), DDIM `--steps` steps, `--n` samples. Reported:
FD-digits of FP and quantized samples, FD between them (FD to FP), PSNR vs FP, and the shipped classifier's
accuracy on the requested labels for FP and quantized samples.

    OMP_NUM_THREADS=1 python tools/guidance_study.py --out /tmp/gstudy 2>&1 | tee /tmp/gstudy.log

Output: the markdown table on stdout; `OUT/study.json`; `OUT/study.png` (FD to FP and class accuracy vs the
guidance scale per configuration); the artifacts (with their evaluation reports and pictures) under `OUT/art/`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from denoq.compiler.artifact import Artifact
from denoq.compiler.evaluate import EvalSettings, evaluate
from denoq.compiler.pipeline import compile_model
from denoq.compiler.recipe import load_recipe
from denoq.figures import figure_png

KEYS = ("fd_digits_fp", "fd_digits", "fd_to_fp", "psnr_vs_fp", "class_accuracy_fp", "class_accuracy")


def compile_once(model: str, preset: str, sets: list[str], out: Path) -> tuple[Artifact, float]:
    """The artifact at `out` (compiled now, or reused when a previous run left it), and its compile seconds."""
    if (out / "manifest.json").exists():
        art = Artifact.open(out)
        return art, float(art.timings["calibration"]["seconds"])
    start = time.perf_counter()
    art = compile_model(model, load_recipe(preset, sets), out)
    return art, round(time.perf_counter() - start, 1)


def study_png(rows: list[dict[str, Any]]) -> bytes:
    """FD to FP (left) and class accuracy (right, FP dashed) against the guidance scale, one line per
    configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    configs = sorted({(r["preset"], r["ptqd"]) for r in rows})
    for preset, ptqd in configs:
        mine = sorted((r for r in rows if (r["preset"], r["ptqd"]) == (preset, ptqd)), key=lambda r: r["guidance"])
        g = [r["guidance"] for r in mine]
        label = f"{preset}{' + PTQD' if ptqd else ''}"
        a.plot(g, [r["fd_to_fp"] for r in mine], marker="o", label=label)
        b.plot(g, [100 * r["class_accuracy"] for r in mine], marker="o", label=label)
    fp = sorted({(r["guidance"], r["class_accuracy_fp"]) for r in rows})
    b.plot([g for g, _ in fp], [100 * acc for _, acc in fp], "k--", label="FP")
    a.set(xlabel="guidance scale", ylabel="FD to FP samples (lower is better)", title="distance to FP")
    b.set(xlabel="guidance scale", ylabel="class accuracy %", title="requested digit read by the classifier")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-cond")
    p.add_argument("--presets", default="w8a8,w4a8")
    p.add_argument("--guidance", default="1,2,4")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of calibration and evaluation")
    p.add_argument("--n", type=int, default=200, help="samples per evaluation")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for every row")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    scales = [float(s) for s in args.guidance.split(",")]
    base = [f"calib.steps={args.steps}", "calib.sampler=ddim", *args.sets]
    rows: list[dict[str, Any]] = []
    for preset in args.presets.split(","):
        plain, seconds = compile_once(args.model, preset, [*base, f"calib.guidance={args.guidance}"],
                                      args.out / "art" / preset)
        for g in scales:
            ptqd, ptqd_seconds = compile_once(
                args.model, preset, [*base, f"calib.guidance={g:g}", "ptqd.enabled=true", "ptqd.vsc=true"],
                args.out / "art" / f"{preset}-ptqd-g{g:g}")
            for art, with_ptqd, secs in ((plain, False, seconds), (ptqd, True, ptqd_seconds)):
                report = evaluate(art, EvalSettings(sampler="ddim", steps=args.steps, n=args.n, threads=1,
                                                    guidance=g))
                row = {"preset": preset, "ptqd": with_ptqd, "guidance": g, "calib_seconds": secs,
                       **{k: report[k] for k in KEYS}}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    (args.out / "study.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows},
                                                    indent=2, sort_keys=True) + "\n")
    (args.out / "study.png").write_bytes(study_png(rows))
    print(f"| {args.model} | PTQD | guidance | FD-digits FP | FD-digits | FD to FP | PSNR vs FP (dB) | class acc. FP | "
          "class acc. |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["preset"], r["guidance"], r["ptqd"])):
        print(f"| {r['preset']} | {'yes' if r['ptqd'] else 'no'} | {r['guidance']:g} | {r['fd_digits_fp']:.1f} | "
              f"{r['fd_digits']:.1f} | {r['fd_to_fp']:.2f} | {r['psnr_vs_fp']:.2f} | "
              f"{100 * r['class_accuracy_fp']:.1f}% | {100 * r['class_accuracy']:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
