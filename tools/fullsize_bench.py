"""Compile W8A8 on random-init full-size Stable Diffusion UNets: what real-size graphs cost on this machine.

For each model (SD 1.5: 860 M parameters, 64×64 latents; SDXL: 2.6 B, 128×128 latents) a bare UNet pipeline
folder (model_index.json, unet/, scheduler/) is saved with the real architecture's config and random weights, then
compiled in a child process with `denoq.quantize(..., "w8a8")` — observers + RTN (`--gptq` for GPTQ), random text
conditioning (`calib.conditioning=random`: the numbers here are about size and time, not quality), one
calibration trajectory of two steps. The child then opens an ORT session on the Q/DQ graph and times one model
call at batch 1. Reported per model: parameters, compile seconds (with the calibration and pass seconds from the
manifest), peak RSS of the child, graph sizes on disk (FP ONNX, Q/DQ, FP16/TensorRT), ORT
session-creation and call seconds — or the error that stopped it: a child whose resident set passes `--max-rss-gb`
(default 21 of this machine's 24 GB) stops itself and names the stage it had reached.

    python tools/fullsize_bench.py --models sd15,sdxl --work fullsize-work --json fullsize.json

The markdown table goes to stdout, progress to stderr, every number to `--json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from toolkit.common import log, records_table  # noqa: E402

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
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
             "timestep_spacing": "leading", "prediction_type": "epsilon"}


def make_folder(name: str, folder: Path) -> int:
    """Save the random-init UNet `name` as a bare pipeline folder; returns its parameter count."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[name])
    params = sum(p.numel() for p in unet.parameters())
    unet.save_pretrained(folder / "unet")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
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


def child(folder: Path, out: Path, gptq: bool, limit_gb: float) -> dict[str, Any]:
    """Compile and run one model (in this process): the numbers of one table row."""
    import torch

    guard_memory(limit_gb)

    import denoq
    from denoq.engines.ort import OrtBackend

    start = time.perf_counter()
    keys = {"calib__conditioning": "random", "calib__samples": 1, "calib__steps": 2,
            "weights__method": "gptq" if gptq else "rtn"}
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
    c, h, w = m["model"]["sample_shape"]
    x = torch.randn(1, c, h, w)
    cond = torch.randn(1, 77, m["model"]["cond_shape"][-1])
    if "text" in m["model"] and m["model"]["text"]["pooled"]:
        from denoq.sampling.cond import Conditioning

        pooled = torch.randn(1, m["model"]["text"]["pooled"])
        ids = torch.tensor([[8.0 * h, 8.0 * w, 0, 0, 8.0 * h, 8.0 * w]])
        cond = Conditioning({"encoder_hidden_states": cond, "text_embeds": pooled, "time_ids": ids})
    start = time.perf_counter()
    ort(x, torch.tensor([500.0]), cond)
    row["ort_call_s"] = round(time.perf_counter() - start, 1)
    row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    ap.add_argument("--work", type=Path, default=Path("fullsize-work"), help="folder for the models and artifacts")
    ap.add_argument("--gptq", action="store_true", help="GPTQ weights instead of RTN")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--max-rss-gb", type=float, default=21.0, help="stop a compile whose resident set passes this")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.gptq, args.max_rss_gb)))
        return
    rows = []
    for name in args.models.split(","):
        folder, out = args.work / f"{name}-unet", args.work / f"{name}-w8a8"
        shutil.rmtree(folder, ignore_errors=True)
        log(f"{name}: saving the random-init UNet")
        row: dict[str, Any] = {"model": name, "parameters_m": round(make_folder(name, folder) / 1e6, 1)}
        log(f"{name}: compiling (child process)")
        cmd = [sys.executable, __file__, "--child", str(folder), str(out), "--max-rss-gb", str(args.max_rss_gb),
               *(["--gptq"] if args.gptq else [])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode in (0, 3):
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            row["error"] = f"exit {done.returncode}: {tail[:200]}"
        log(f"{name}: {row}")
        rows.append(row)
    print(records_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
