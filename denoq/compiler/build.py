"""`denoq build ART`: the TensorRT engine of an artifact, added to it with its build info (docs/architecture.md,
Targets).

The graph built is the one compile prepared for TensorRT (manifest `trt.graph`: the float16 `model.trt.onnx`, or
the float32 Q/DQ graph with `trt.fp16=false`); an artifact compiled for `ort-cpu`, or whose graph breaks the
`trt-rules` check, is refused before TensorRT is asked (it would refuse the graph or run it unfused). The
optimization profile covers `--profile batch=MIN:OPT:MAX[,height=…,width=…]` (resolution defaults to the model's
sample size, fixed); the timing cache lives beside the artifact (`ART.timing.cache`, reused by later builds on
the same machine). The manifest's `engine` section records the TensorRT version, the GPU and its compute
capability, the ONNX graph's sha256, the profile and the build time; `engine_bytes` refuses an engine whose
record does not match the machine or the graph.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from denoq.compiler.artifact import Artifact
from denoq.engines.trt import ShapeRange, build_engine, check_build_info, device_info, profile_shapes
from denoq.errors import DenoqError

ENGINE_FILE = "engine.plan"
TRT_GRAPH = "model.trt.onnx"  # compile's float16 graph for TensorRT (`passes.fp16`)
DEFAULT_BATCH = "1:4:16"
PROFILE_KEYS = ("batch", "height", "width", "tokens")


def parse_profile(text: str, sample_shape: list[int]) -> dict[str, ShapeRange]:
    """`batch=1:4:16,height=64,width=32:64:64,tokens=77` → ranges; unnamed dimensions default to `DEFAULT_BATCH`
    and the model's own height / width (`tokens`, for text models: their tokenizer's length when absent)."""
    _, height, width = sample_shape
    ranges = {"batch": ShapeRange.parse(DEFAULT_BATCH, "batch"), "height": ShapeRange(height, height, height),
              "width": ShapeRange(width, width, width)}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in PROFILE_KEYS:
            raise DenoqError(f"--profile item {item!r} is not KEY=N or KEY=MIN:OPT:MAX with KEY one of "
                             f"{', '.join(PROFILE_KEYS)}")
        ranges[key] = ShapeRange.parse(value, f"--profile {key}")
    return ranges


def cond_shapes(model: dict[str, Any]) -> dict[str, list[int]] | None:
    """Per-sample shapes of the conditioning inputs of the manifest's `model` section (SDXL's added conditions
    included)."""
    cond = model.get("cond_shape")
    if cond is None:
        return None
    shapes = {model.get("cond_input") or "encoder_hidden_states": list(cond)}
    text = model.get("text") or {}
    if text.get("pooled"):
        shapes.update({"text_embeds": [int(text["pooled"])], "time_ids": [6]})
    return shapes


def beside(art: Artifact, suffix: str) -> Path:
    """A cache kept next to the artifact folder (`ART.<suffix>`): TensorRT's timing cache, ORT's engine cache."""
    return art.path.parent / f"{art.path.name}.{suffix}"


def trt_graph(art: Artifact) -> str:
    """The artifact's graph for TensorRT; DenoqError when it has none or the graph breaks the trt-rules check."""
    if "mixed" in art.manifest:
        raise DenoqError(f"{art.path} is a step-aware mixed-precision artifact; build each member: denoq build "
                         f"{art.path}/members/NAME")
    trt = art.manifest.get("trt")
    if trt is None:
        raise DenoqError(f"{art.path} was compiled for target {art.manifest['plan'].get('target')}, not trt; "
                         "recompile with --set target=trt (or a trt preset such as w8a8)")
    rules = art.manifest.get("trt_rules", {})
    if rules.get("count"):
        first = "; ".join(rules["violations"][:2])
        raise DenoqError(f"{art.path}: {rules['count']} TensorRT rule violation(s) in {trt['graph']} (first: {first}); "
                         "TensorRT would refuse or mis-run this graph: change the recipe (see denoq inspect)")
    return str(trt["graph"])


def build(path: Path, profile: str = "", optimization_level: int = 3) -> Artifact:
    """Build the engine of the artifact at `path` and add it (`engine.plan`, manifest `engine`)."""
    art = Artifact.open(path)
    graph = trt_graph(art)
    ranges = parse_profile(profile, art.manifest["model"]["sample_shape"])
    model = art.manifest["model"]
    shapes = profile_shapes(model["sample_shape"], ranges["batch"], ranges["height"], ranges["width"],
                            cond_shapes(model), ranges.get("tokens"))
    cache = beside(art, "timing.cache")
    start = time.perf_counter()
    engine = build_engine(art.file(graph), shapes, cache, optimization_level)
    info: dict[str, Any] = {**device_info(), "onnx": graph, "onnx_sha256": art.files[graph],
                            "profile": {k: str(v) for k, v in ranges.items()},
                            "optimization_level": optimization_level, "timing_cache": cache.name,
                            "seconds": round(time.perf_counter() - start, 2), "bytes": len(engine)}
    art.add_files({ENGINE_FILE: engine}, {"engine": info})
    return art


def engine_bytes(art: Artifact) -> bytes:
    """The artifact's engine after checking its build info against this machine and the artifact's graph."""
    if not art.has(ENGINE_FILE):
        raise DenoqError(f"{art.path} has no {ENGINE_FILE}; run denoq build {art.path} on the GPU machine first")
    recorded = art.manifest.get("engine")
    graph = (recorded or {}).get("onnx", "")
    check_build_info(recorded, art.files.get(graph, ""), device_info())
    return art.file(ENGINE_FILE).read_bytes()
