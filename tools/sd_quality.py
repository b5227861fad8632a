"""Quality of a quantized embedded text-to-image model in diffusers' own pipeline: `digits-sd` (latent, laid out
like Stable Diffusion 1.x) or `digits-flow` (flow matching, laid out like SD3).

For each recipe the model is compiled with `denoq.quantize(MODEL, recipe, calib__guidance=G)` (prompt calibration
on its own captions, guided at the scale it is sampled with), then the model's pipeline (StableDiffusionPipeline /
StableDiffusion3Pipeline) samples `--n` images per prompt "a handwritten digit <zero … nine>" with the FP denoiser
and with `pipe.unet` / `pipe.transformer = denoq.load(ART, backend)` from the same seeded generator: digits-sd with
DDIM 50 and DPM-Solver++ 20 steps, digits-flow with its flow-matching Euler scheduler at 20 and 50 steps. Scores
(`denoq.metrics`, images in [−1, 1]): prompt accuracy (the shipped digits classifier reads the asked digit),
FD-digits (vs the real digits), FD to FP (between the quantized and the FP samples) and PSNR vs FP (same noise).

    python tools/sd_quality.py --recipes w8a8,w4a8 --guidance 1.5 --n 26 --work sd-quality-work --json sdq.json
    python tools/sd_quality.py --model digits-flow --recipes w8a8,w4a8 --guidance 3 --work flow-work --json fq.json

FP samples are kept in the work folder and reused by later runs with the same model, sampler, guidance, `--n` and
seed. The markdown table goes to stdout, progress to stderr, every number to `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from latent_digits import load_pipeline, sample_digits, use_scheduler  # noqa: E402
from toolkit.common import log, records_table  # noqa: E402

from denoq.models import EMBEDDED  # noqa: E402

#: per model: (scheduler key for `use_scheduler`, its name in the table, steps)
SAMPLERS = {"digits-sd": (("ddim", "DDIM", 50), ("dpm", "DPM-Solver++", 20)),
            "digits-flow": (("own", "flow-matching Euler", 20), ("own", "flow-matching Euler", 50))}


def scores(images: torch.Tensor, labels: torch.Tensor, fp: torch.Tensor | None) -> dict[str, Any]:
    from denoq.metrics import class_accuracy, fd_between, fd_digits, psnr

    row = {"prompt_accuracy": round(100 * class_accuracy(images, labels), 1), "fd_digits": round(fd_digits(images), 1)}
    if fp is not None:
        row.update({"fd_to_fp": round(fd_between(images, fp), 2), "psnr_vs_fp_db": round(psnr(images, fp), 2)})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits-sd", choices=sorted(SAMPLERS))
    ap.add_argument("--recipes", default="w8a8,w4a8", help="comma-separated recipe presets")
    ap.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (FP's best FD)")
    ap.add_argument("--n", type=int, default=26, help="images per digit")
    ap.add_argument("--backend", default="ort", help="denoq.load backend of the quantized UNet")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    ap.add_argument("--keep-fp", help="';'-separated layers.keep_fp values, each compiled as a variant of every "
                    "recipe (e.g. '@in,@out;@in,@out,@cond;' — the last one empty: every layer quantized)")
    ap.add_argument("--steps", type=int, nargs="+", help="only the samplers with these step counts")
    ap.add_argument("--work", type=Path, default=Path("sd-quality-work"), help="folder for the artifacts")
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args()
    import denoq

    torch.set_num_threads(1)
    pipe = load_pipeline(EMBEDDED[args.model])
    slot = "unet" if hasattr(pipe, "unet") else "transformer"
    fp_model, rows, fp_images = getattr(pipe, slot), [], {}
    samplers = [s for s in SAMPLERS[args.model] if not args.steps or s[2] in args.steps]
    for key, name, steps in samplers:
        use_scheduler(pipe, key)
        start = time.perf_counter()
        cache = args.work / f"fp-{args.model}-{key}{steps}-g{args.guidance:g}-n{args.n}-seed{args.seed}.pt"
        if cache.is_file():  # the FP samples of the same settings, from an earlier run in this work folder
            images, labels = torch.load(cache)
        else:
            images, labels = sample_digits(pipe, args.n, args.guidance, steps, args.seed)
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save((images, labels), cache)
        fp_images[key, steps] = (images, labels)
        rows.append({"recipe": "FP", "scheduler": name, "steps": steps, **scores(images, labels, None),
                     "sample_s": round(time.perf_counter() - start, 1)})
        log(str(rows[-1]))
    sets = dict(item.split("=", 1) for item in args.set)
    variants = [None] if args.keep_fp is None else args.keep_fp.split(";")
    for recipe, (v, keep) in ((r, k) for r in args.recipes.split(",") for k in enumerate(variants)):
        start = time.perf_counter()
        keys = {"calib__guidance": str(args.guidance), **{k.replace(".", "__"): v for k, v in sets.items()},
                **({} if keep is None else {"layers__keep_fp": keep})}
        out = args.work / (recipe if keep is None else f"{recipe}-keep{v}")
        art = denoq.quantize(args.model, recipe, out=out, force=True, **keys)
        compile_s = round(time.perf_counter() - start, 1)
        label = recipe if keep is None else f"{recipe}, keep_fp={keep or '(none)'}"
        for key, name, steps in samplers:
            use_scheduler(pipe, key)
            setattr(pipe, slot, denoq.load(art, backend=args.backend))
            start = time.perf_counter()
            images, labels = sample_digits(pipe, args.n, args.guidance, steps, args.seed)
            setattr(pipe, slot, fp_model)
            rows.append({"recipe": label, "scheduler": name, "steps": steps,
                         **scores(images, labels, fp_images[key, steps][0]),
                         "sample_s": round(time.perf_counter() - start, 1), "compile_s": compile_s})
            log(str(rows[-1]))
    print(records_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "guidance": args.guidance, "n_per_digit": args.n,
                                         "backend": args.backend, "sets": args.set, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
