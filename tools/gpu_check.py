"""The GPU check: TensorRT engines of denoq's graphs built and measured on the machine that runs them.

Needs an NVIDIA GPU, a CUDA build of torch and `pip install 'denoq[gpu]'` (tensorrt, polygraphy); without them
it stops at once saying what is missing. For every model of `--models`:

- `digits`: the embedded default model;
- `sd`: a UNet2DConditionModel with Stable Diffusion 1.5's UNet config (4×64×64 latents, 77×768 text states,
  block widths 320/640/1280/1280) and seeded random weights, saved as a pipeline folder under OUT.

three engines are built (strongly typed, one profile over the batches of `--batches`, a shared timing cache):

- `fp16`: the FP graph in float16 with the float32 islands of `denoq.passes.fp16` (no Q/DQ);
- `w8a8`: `denoq compile --recipe w8a8` (TensorRT profile, float16 graph), then `denoq build`;
- `w8a8-selector`: the same with `activations.timestep_groups=4` (the timestep selector's Mul/Div around Q/DQ).

Reported per engine: build seconds and bytes; latency per UNet call at each batch (CUDA events around one
`execute_async_v3`, median of `--iters` after warm-up, CUDA graphs off so the enqueue is counted) and the
FP16 / INT8 latency ratio; from TensorRT's engine inspector: the fraction of quantized convolutions whose engine
layer runs INT8, and the selector multiplies / divides that remain layers of their own (want 0: fused into the
neighbouring convolution or Q/DQ). Everything goes to OUT/gpu_check.json; exit status 1 if an engine is missing
or a check fails.

    python tools/gpu_check.py --out /tmp/gpu_check
    python tools/gpu_check.py --out /tmp/gpu_check --models digits --batches 1,4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}
CALIB = ["calib.samples=4", "calib.steps=8"]


def sd_pipeline(folder: Path, seed: int) -> Path:
    """A pipeline folder with SD 1.5's UNet config and seeded random weights (no download)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                  beta_end=0.012).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "_diffusers_version": "0.32.0",
        "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"]}))
    return folder


def call_latency(backend: Any, batch: int, sample_shape: list[int], cond_shape: list[int] | None,
                 iters: int) -> float:
    """Median milliseconds of one engine call at `batch`, timed with CUDA events."""
    import torch

    x = torch.randn((batch, *sample_shape), device="cuda")
    t = torch.full((batch,), 500, dtype=torch.int64, device="cuda")
    cond = None if cond_shape is None else torch.randn((batch, *cond_shape), device="cuda")
    for _ in range(3):
        backend(x, t, cond)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        backend(x, t, cond)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def inspect_engine(engine_bytes: bytes, qdq_graph: Path, trt_graph: Path) -> dict[str, Any]:
    """INT8 fraction of the quantized convolutions and the selector ops left as layers, from the inspector."""
    import onnx

    from denoq.engines.trt import engine_layers, layer_precisions, load_engine
    from denoq.layermap import read_layer_map

    layers = engine_layers(load_engine(engine_bytes))
    qdq = onnx.load(str(qdq_graph), load_external_data=False)
    inits = {i.name for i in qdq.graph.initializer}
    weight_dq = {n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    convs = [ref.node for ref in read_layer_map(qdq).values()
             if ref.op_type == "Conv" and any(n.name == ref.node and n.input[1] in weight_dq for n in qdq.graph.node)]
    graph = onnx.load(str(trt_graph), load_external_data=False)
    selector = [n.name for n in graph.node if "/timestep_ratio/" in n.name and n.op_type in ("Mul", "Div")]
    conv_info = layer_precisions(layers, convs)
    sel_info = layer_precisions(layers, selector)
    return {"engine_layers": len(layers), "quantized_convs": len(convs),
            "int8_convs": sum(v["int8"] for v in conv_info.values()),
            "convs_not_int8": sorted(k for k, v in conv_info.items() if not v["int8"]),
            "selector_ops": len(selector),
            "selector_ops_own_layer": sorted(k for k, v in sel_info.items() if v["own_layer"])}


def check_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import onnx

    from denoq.compiler.build import ENGINE_FILE, build, engine_bytes
    from denoq.compiler.pipeline import compile_model
    from denoq.compiler.recipe import load_recipe
    from denoq.engines.trt import ShapeRange, TrtBackend, build_engine, profile_shapes
    from denoq.onnxio import save_model
    from denoq.passes.fp16 import ConvertFp16

    model = "digits" if name == "digits" else str(sd_pipeline(args.out / "models" / "sd", args.seed))
    batches = ShapeRange(min(args.batches), max(args.batches), max(args.batches))
    out: dict[str, Any] = {}
    arts = {}
    for variant, sets in (("w8a8", []), ("w8a8-selector", ["activations.timestep_groups=4"])):
        path = args.out / name / variant
        start = time.perf_counter()
        compile_model(model, load_recipe("w8a8", [*CALIB, *sets]), path, force=True)
        arts[variant] = build(path, f"batch={batches}")
        out[variant] = {"compile_and_build_seconds": round(time.perf_counter() - start, 1),
                        "build_seconds": arts[variant].manifest["engine"]["seconds"],
                        "engine_bytes": arts[variant].manifest["engine"]["bytes"]}
    art = arts["w8a8"]
    meta = art.manifest["model"]
    fp16_path = args.out / name / "fp16.onnx"
    save_model(ConvertFp16()(onnx.load(str(art.file("model.fp.onnx")))), fp16_path)
    height, width = meta["sample_shape"][1:]
    shapes = profile_shapes(meta["sample_shape"], batches, ShapeRange(height, height, height),
                            ShapeRange(width, width, width),
                            {"encoder_hidden_states": meta["cond_shape"]} if meta["cond_shape"] else None)
    start = time.perf_counter()
    fp16_engine = build_engine(fp16_path, shapes, args.out / "timing.cache")
    out["fp16"] = {"build_seconds": round(time.perf_counter() - start, 1), "engine_bytes": len(fp16_engine)}
    engines = {"fp16": fp16_engine, **{v: engine_bytes(a) for v, a in arts.items()}}
    for variant, data in engines.items():
        backend = TrtBackend(data, cuda_graph=False)
        out[variant]["latency_ms"] = {f"batch{b}": round(call_latency(backend, b, meta["sample_shape"],
                                                                      meta["cond_shape"], args.iters), 4)
                                      for b in args.batches}
    for variant, a in arts.items():
        out[variant]["inspector"] = inspect_engine(a.file(ENGINE_FILE).read_bytes(), a.file("model.qdq.onnx"),
                                                   a.file(a.manifest["trt"]["graph"]))
    out["fp16_over_int8"] = {k: round(out["fp16"]["latency_ms"][k] / out["w8a8"]["latency_ms"][k], 3)
                             for k in out["fp16"]["latency_ms"]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for models, artifacts and gpu_check.json")
    p.add_argument("--models", type=lambda s: s.split(","), default=["digits", "sd"], help="digits and/or sd")
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4])
    p.add_argument("--iters", type=int, default=50, help="timed calls per batch (median reported)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from denoq.engines.trt import device_info, require
    from denoq.errors import DenoqError

    try:
        require("polygraphy", "tools/gpu_check.py")
        info = device_info()
    except DenoqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bad = sorted(set(args.models) - {"digits", "sd"})
    if bad:
        print(f"error: unknown model(s) {', '.join(bad)}; choose from digits, sd", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": info, "batches": args.batches, "models": {}}
    failed = False
    for name in args.models:
        try:
            report["models"][name] = check_model(name, args)
        except DenoqError as exc:
            report["models"][name] = {"error": str(exc)}
            failed = True
            print(f"{name}: {exc}", file=sys.stderr)
            continue
        r = report["models"][name]
        for variant in ("w8a8", "w8a8-selector"):
            ins = r[variant]["inspector"]
            failed |= ins["int8_convs"] < ins["quantized_convs"] or bool(ins["selector_ops_own_layer"])
        print(f"{name}: FP16/INT8 latency {r['fp16_over_int8']}, INT8 convs {r['w8a8']['inspector']['int8_convs']}/"
              f"{r['w8a8']['inspector']['quantized_convs']}, selector ops left as layers "
              f"{len(r['w8a8-selector']['inspector']['selector_ops_own_layer'])}/"
              f"{r['w8a8-selector']['inspector']['selector_ops']}")
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
