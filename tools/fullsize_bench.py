"""Compile W8A8 on random-init full-size denoisers: what real-size graphs cost on this machine.

For each model — the UNets of SD 1.5 (860 M parameters, 64×64 latents) and SDXL (2.6 B, 128×128), the transformers
of PixArt-Σ (0.6 B, 128×128 latents, 300 T5 tokens), SD3-medium (2.0 B, 128×128, 333 tokens) and Flux-dev at full
width with one double- and one single-stream block (`flux1x1`; 4096 image and 512 text tokens) — a bare pipeline
folder (model_index.json, unet/ or transformer/, scheduler/) is saved with the released architecture's config and
random weights, then compiled in a child process with `denoq.quantize(..., "w8a8")` — observers + RTN (`--gptq`
for GPTQ), random text conditioning (`calib.conditioning=random`: the numbers here are about size and time, not
quality), one calibration trajectory of two steps. The child then opens an ORT session on the Q/DQ graph and times
one model call at batch 1. Reported per model: parameters, compile seconds (with the calibration and pass seconds
from the manifest), peak RSS of the child, graph sizes on disk (FP ONNX, Q/DQ, FP16/TensorRT), ORT
session-creation and call seconds — or the error that stopped it: a child whose resident set passes `--max-rss-gb`
(default 21 of this machine's 24 GB) stops itself and names the stage it had reached.

    python tools/fullsize_bench.py --models sd15,sdxl --work fullsize-work --json fullsize.json
    python tools/fullsize_bench.py --models pixart,flux1x1,sd3 --size 64 --work fullsize-work --json transformers.json

The markdown table goes to stdout, progress to stderr, every number to `--json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from toolkit.common import log, records_table, run_child  # noqa: E402

#: the UNet configs of the released checkpoints (runwayml SD 1.5, stabilityai SDXL base 1.0)
CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
#: the transformer configs of the released checkpoints (PixArt-Sigma-XL-2-1024-MS, stable-diffusion-3-medium,
#: FLUX.1-dev with num_layers = num_single_layers = 1 instead of 19 and 38)
TRANSFORMERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "pixart": ("PixArtTransformer2DModel", "PixArtSigmaPipeline", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2, norm_type="ada_norm_single",
        use_additional_conditions=False, interpolation_scale=2, norm_elementwise_affine=False, norm_eps=1e-6,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000)),
    "sd3": ("SD3Transformer2DModel", "StableDiffusion3Pipeline", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192)),
    "flux1x1": ("FluxTransformer2DModel", "FluxPipeline", dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
}
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
             "timestep_spacing": "leading", "prediction_type": "epsilon"}
SCHEDULERS = {"PixArtSigmaPipeline": {"_class_name": "DPMSolverMultistepScheduler", "beta_start": 0.0001,
                                      "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000},
              "StableDiffusion3Pipeline": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                                           "num_train_timesteps": 1000},
              "FluxPipeline": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                               "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                               "base_image_seq_len": 256, "max_image_seq_len": 4096, "num_train_timesteps": 1000}}


def make_folder(name: str, folder: Path, num_layers: int | None = None) -> int:
    """Save the random-init denoiser `name` as a bare pipeline folder (a transformer with `num_layers` blocks
    instead of its own number, where given); returns its parameter count."""
    import diffusers
    import torch

    torch.manual_seed(0)
    if name in TRANSFORMERS:
        cls, pipeline, config = TRANSFORMERS[name]
        config = config if num_layers is None else {**config, "num_layers": num_layers}
        component, scheduler = "transformer", SCHEDULERS[pipeline]
    else:
        cls, pipeline, config = "UNet2DConditionModel", "StableDiffusionPipeline", CONFIGS[name]
        component, scheduler = "unet", SCHEDULER
    model = getattr(diffusers, cls)(**config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder / component)
    del model
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": pipeline, component: ["diffusers", cls],
             "scheduler": ["diffusers", scheduler["_class_name"]]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return params


def _size(path: Path) -> int:
    """Bytes of an ONNX file with its external data (files beside it named after it)."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def rss_gb() -> float:
    """This process's resident set, GB (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def guard_memory(limit_gb: float) -> None:
    """Stop this process (exit 3, the row's error naming the stage the compile had logged last) once its resident
    set passes `limit_gb`: the machine's memory runs out before the kernel's OOM killer says where."""
    stage = ["start"]

    class LastMessage(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            stage[0] = record.getMessage()[:120]

    logging.getLogger("denoq").addHandler(LastMessage(logging.INFO))

    def watch() -> None:
        while True:
            if rss_gb() > limit_gb:
                print(json.dumps({"error": f"resident set passed {limit_gb} GB after: {stage[0]}"}), flush=True)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def random_feeds(ort: Any, model: dict[str, Any]) -> dict[str, Any]:
    """Batch-1 inputs for every graph input (timing only): the sample at the manifest's shape, the text at its
    token length, Flux's ids at the sample's token count, masks of ones."""
    import numpy as np

    rng = np.random.default_rng(0)
    sizes = {"batch": 1, "tokens": model["text"]["tokens"], "seq": model["sample_shape"][0]}
    feeds = {}
    for inp in ort.session.get_inputs():
        shape = [1, *model["sample_shape"]] if inp.name == "sample" else \
            [d if isinstance(d, int) else sizes[d] for d in inp.shape]
        dtype = np.int64 if "int64" in inp.type else np.float32
        value = np.ones(shape) if inp.name == "encoder_attention_mask" else rng.standard_normal(shape)
        feeds[inp.name] = (np.full(shape, 500.0) if inp.name == "timestep" else value).astype(dtype)
    return feeds


def child(folder: Path, out: Path, gptq: bool, limit_gb: float, size: int) -> dict[str, Any]:
    """Compile and run one model (in this process): the numbers of one table row."""

    guard_memory(limit_gb)

    import denoq
    from denoq.engines.ort import OrtBackend

    start = time.perf_counter()
    keys = {"calib__conditioning": "random", "calib__samples": 1, "calib__steps": 2,
            "weights__method": "gptq" if gptq else "rtn", "calib__size": size}
    art = denoq.quantize(str(folder), "w8a8", out=out, force=True, **keys)
    row: dict[str, Any] = {"compile_s": round(time.perf_counter() - start, 1)}
    m, timings = art.manifest, art.timings
    row["calibrate_s"] = timings["calibration"]["seconds"]
    row["passes_s"] = round(sum(timings["pass_seconds"]), 1)
    for label, name in (("fp_onnx_mb", "model.fp.onnx"), ("qdq_mb", "model.qdq.onnx"), ("trt_mb", "model.trt.onnx")):
        if art.file(name).exists():
            row[label] = round(_size(art.file(name)) / 1e6, 1)
    start = time.perf_counter()
    ort = OrtBackend(art.file("model.qdq.onnx"), threads=2)
    row["ort_session_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    ort.session.run(None, random_feeds(ort, m["model"]))
    row["ort_call_s"] = round(time.perf_counter() - start, 1)
    row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="sd15,sdxl", help=f"comma-separated: {', '.join([*CONFIGS, *TRANSFORMERS])}")
    ap.add_argument("--work", type=Path, default=Path("fullsize-work"), help="folder for the models and artifacts")
    ap.add_argument("--gptq", action="store_true", help="GPTQ weights instead of RTN")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--max-rss-gb", type=float, default=21.0, help="stop a compile whose resident set passes this")
    ap.add_argument("--size", type=int, default=0, help="calib.size: latent side (0 = the model's own; 64 = 512 px)")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.gptq, args.max_rss_gb, args.size)))
        return
    rows = []
    for name in args.models.split(","):
        folder, out = args.work / f"{name}-model", args.work / f"{name}-w8a8"
        shutil.rmtree(folder, ignore_errors=True)
        log(f"{name}: saving the random-init model")
        row: dict[str, Any] = {"model": name, "parameters_m": round(make_folder(name, folder) / 1e6, 1),
                               "latent": args.size or "own"}
        log(f"{name}: compiling (child process)")
        cmd = [sys.executable, __file__, "--child", str(folder), str(out), "--max-rss-gb", str(args.max_rss_gb),
               "--size", str(args.size), *(["--gptq"] if args.gptq else [])]
        row.update(run_child(cmd, ok=(0, 3)))
        log(f"{name}: {row}")
        rows.append(row)
    print(records_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
