"""TensorRT: the strongly typed engine build through polygraphy's loaders, its build info, and the sampler backend.

Nothing on our CI machines can run TensorRT: the code is written against the documented APIs (TensorRT 10+'s
`execute_async_v3` tensor-address API, polygraphy's `network_from_onnx_path` / `CreateConfig` /
`engine_from_network` / `save_engine` loaders) and its tests skip with the reason when `tensorrt`, `polygraphy`
or a CUDA GPU is missing. What does not need them (profiles, build-info checks, the engine-inspector analysis,
every "what is missing" message) is plain Python and tested everywhere.

- `build_engine`: ONNX → serialized engine with `strongly_typed=True` (the graph's dtypes are the engine's: the
  float16 graph of `passes.fp16` gives an FP16 + INT8/INT4 engine; TensorRT 10.x's FP16/INT8 builder flags are
  not used, TensorRT 11 removes them), one optimization profile over batch and resolution, a timing cache that
  is loaded when present and saved after the build, `builder_optimization_level`, and detailed profiling
  verbosity so that the engine inspector can name each layer's kernel and precision.
- `build_info` / `check_build_info`: an engine is only valid for the TensorRT version, GPU (name and compute
  capability) and ONNX bytes it was built from; a stale or foreign engine is refused in one line.
- `TrtBackend`: `eps(x, t, cond)` over an engine; torch CUDA tensors are the I/O buffers (no host copies inside
  the loop), one `execute_async_v3` on torch's current stream, optional CUDA-graph capture per input shape.
- `engine_layers` / `layer_precisions`: the engine inspector's JSON (one entry per fused layer) and which ONNX
  nodes ran inside an INT8 layer or were left as separate layers.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from denoq.engines.ort import cond_feeds, timestep_feed
from denoq.errors import DenoqError, install_hint
from denoq.sampling.cond import COND_INPUTS, Cond


def require(module: str, what: str) -> ModuleType:
    """Import `module` or raise a DenoqError saying what needs it and which install provides it here."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DenoqError(f"{what} needs the Python package {module!r}, which is not installed ({exc}); "
                         f"{install_hint(module)}") from None


def require_cuda(what: str) -> torch.device:
    """The current CUDA device, or a DenoqError saying that `what` needs one."""
    if not torch.cuda.is_available():
        raise DenoqError(f"{what} needs an NVIDIA GPU, but PyTorch sees no CUDA device (torch.cuda.is_available() "
                         "is False); run it on a GPU machine with a CUDA build of torch")
    return torch.device("cuda", torch.cuda.current_device())


# -- optimization profile ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max of one dimension of an optimization profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise DenoqError(f"profile range {self.min}:{self.opt}:{self.max} must satisfy 1 ≤ min ≤ opt ≤ max")

    @classmethod
    def parse(cls, text: str, what: str) -> ShapeRange:
        """`N` (fixed) or `MIN:OPT:MAX`."""
        parts = text.split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (1, 3):
            raise DenoqError(f"{what} {text!r} is not N or MIN:OPT:MAX (e.g. 1:4:8)")
        return cls(values[0], values[0], values[0]) if len(values) == 1 else cls(*values)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


def profile_shapes(sample: Sequence[int], batch: ShapeRange, height: ShapeRange, width: ShapeRange,
                   cond: Mapping[str, Sequence[int]] | None = None,
                   tokens: ShapeRange | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Input name → (min, opt, max) shapes: `sample` [B, C, H, W] (C from `sample` = [C, H, W]), `timestep` [B],
    and each conditioning input with its per-sample shape after the batch dimension (`encoder_hidden_states`
    with the token range `tokens` when given)."""
    channels = int(sample[0])
    out = {"sample": tuple((b, channels, h, w) for b, h, w in zip(
               (batch.min, batch.opt, batch.max), (height.min, height.opt, height.max),
               (width.min, width.opt, width.max), strict=True)),
           "timestep": ((batch.min,), (batch.opt,), (batch.max,))}
    for name, rest in sorted((cond or {}).items()):
        if name == "encoder_hidden_states" and tokens is not None:
            out[name] = tuple((b, L, *rest[1:]) for b, L in zip((batch.min, batch.opt, batch.max),
                                                                 (tokens.min, tokens.opt, tokens.max), strict=True))
        else:
            out[name] = tuple((b, *rest) for b in (batch.min, batch.opt, batch.max))
    return out


# -- build info --------------------------------------------------------------------------------------------

def device_info() -> dict[str, str]:
    """TensorRT's version and the current GPU's name and compute capability (needs both)."""
    trt = require("tensorrt", "reading the TensorRT version")
    device = require_cuda("a TensorRT engine")
    major, minor = torch.cuda.get_device_capability(device)
    return {"tensorrt": str(trt.__version__), "gpu": torch.cuda.get_device_name(device),
            "compute_capability": f"{major}.{minor}"}


def check_build_info(recorded: Mapping[str, Any] | None, onnx_sha256: str, current: Mapping[str, str]) -> None:
    """Refuse an engine whose build info does not match this machine and this artifact's ONNX graph.

    TensorRT engines are specific to the TensorRT version and the GPU model (compute capability) they were built
    on, and an engine built from other ONNX bytes computes another graph. `recorded` is the manifest's `engine`
    section, `current` = `device_info()`."""
    if not recorded:
        raise DenoqError("the artifact has no engine build info (manifest 'engine'); run denoq build on it first")
    if recorded.get("onnx_sha256") != onnx_sha256:
        raise DenoqError(f"engine.plan is stale: built from ONNX sha256 {str(recorded.get('onnx_sha256'))[:12]}… but "
                         f"the artifact's graph is now {onnx_sha256[:12]}…; rebuild with denoq build")
    for key, what in (("tensorrt", "TensorRT"), ("compute_capability", "compute capability"), ("gpu", "GPU")):
        if str(recorded.get(key)) != str(current.get(key)):
            raise DenoqError(f"engine.plan was built with {what} {recorded.get(key)} but this machine has "
                             f"{current.get(key)} (an engine runs only where it was built); rebuild with "
                             "denoq build on this machine")


# -- build -------------------------------------------------------------------------------------------------

def build_engine(onnx_path: Path, shapes: Mapping[str, tuple[tuple[int, ...], ...]], timing_cache: Path,
                 optimization_level: int = 3, workspace_bytes: int | None = None) -> bytes:
    """The serialized engine of the strongly typed network of `onnx_path` with one optimization profile `shapes`
    (input → (min, opt, max)); the timing cache at `timing_cache` is read when it exists and written back."""
    trt = require("tensorrt", "denoq build")
    pg = require("polygraphy.backend.trt", "denoq build")
    require_cuda("denoq build")
    if not 0 <= optimization_level <= 5:
        raise DenoqError(f"builder optimization level {optimization_level} is outside TensorRT's 0–5")
    profile = pg.Profile()
    for name, (lo, opt, hi) in sorted(shapes.items()):
        profile.add(name, min=lo, opt=opt, max=hi)
    network = pg.network_from_onnx_path(str(onnx_path), strongly_typed=True)
    config = pg.CreateConfig(
        profiles=[profile],
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
        builder_optimization_level=optimization_level,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
        memory_pool_limits=None if workspace_bytes is None else {trt.MemoryPoolType.WORKSPACE: workspace_bytes},
    )
    engine = pg.engine_from_network(network, config=config, save_timing_cache=str(timing_cache))
    if engine is None:
        raise DenoqError(f"TensorRT could not build {onnx_path} (see TensorRT's log above); check denoq inspect's "
                         "trt_rules section")
    return bytes(engine.serialize())


def load_engine(data: bytes) -> Any:
    """Deserialize an engine (ICudaEngine)."""
    trt = require("tensorrt", "the TensorRT backend")
    require_cuda("the TensorRT backend")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise DenoqError("TensorRT could not deserialize engine.plan (another TensorRT version or GPU?); rebuild it "
                         "with denoq build")
    return engine


# -- engine inspector ---------------------------------------------------------------------------------------

def engine_layers(engine: Any) -> list[dict[str, Any]]:
    """The engine inspector's per-layer JSON (needs an engine built with detailed profiling verbosity)."""
    trt = require("tensorrt", "the engine inspector")
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = info.get("Layers", [])
    return [layer if isinstance(layer, dict) else {"Name": str(layer)} for layer in layers]


def _is_int8(layer: Mapping[str, Any]) -> bool:
    """A layer computing in INT8: an INT8 input format on its data input, or a TensorRT int8 tactic name."""
    inputs = layer.get("Inputs", [])
    first = inputs[0] if inputs and isinstance(inputs[0], Mapping) else {}
    fmt = " ".join(str(first.get(k, "")) for k in ("Format/Datatype", "Datatype", "Format"))
    return "int8" in fmt.lower() or "int8" in str(layer.get("TacticName", "")).lower()


def _mentions(layer_name: str, node: str) -> bool:
    """Whether an engine layer's name names the ONNX node `node` as a whole token (TensorRT joins fused nodes with
    " + " and wraps fused pointwise ops as `PWN(a, b)`)."""
    return re.search(rf"(?<![\w./-]){re.escape(node)}(?![\w./-])", layer_name) is not None


def layer_precisions(layers: Sequence[Mapping[str, Any]], nodes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """For each ONNX node name: the engine layer that contains it, whether that layer runs INT8, and whether the
    node is a layer of its own (not fused into anything)."""
    out = {}
    for node in nodes:
        layer = next((x for x in layers if _mentions(str(x.get("Name", "")), node)), None)
        name = None if layer is None else str(layer.get("Name"))
        out[node] = {"layer": name, "int8": bool(layer is not None and _is_int8(layer)),
                     "own_layer": name == node, "found": layer is not None}
    return out


# -- the sampler backend ------------------------------------------------------------------------------------

_TORCH_TYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32,
                "BF16": torch.bfloat16}


class TrtBackend:
    """A TensorRT engine as the sampler's `eps(x, t, cond)` (docs/architecture.md, Sampler).

    I/O buffers are torch CUDA tensors; inputs are cast to the engine's dtypes on the GPU, the output is returned
    on x's device in x's dtype. With `cuda_graph`, the first call per input shape runs normally and captures a
    CUDA graph of `execute_async_v3` over static buffers; later calls of that shape copy into the buffers and
    replay it (the enqueue cost, large for small models, disappears).
    """

    def __init__(self, engine_bytes: bytes, cuda_graph: bool = False) -> None:
        self.device = require_cuda("the TensorRT backend")
        self.engine = load_engine(engine_bytes)
        self.context = self.engine.create_execution_context()
        trt = require("tensorrt", "the TensorRT backend")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in self.inputs]
        self.output = "out_sample" if "out_sample" in outputs else outputs[0]
        self.dtypes = {n: _TORCH_TYPES[str(self.engine.get_tensor_dtype(n)).split(".")[-1]] for n in names}
        self.cond_inputs = [n for n in COND_INPUTS if n in self.inputs]
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, tuple[Any, dict[str, torch.Tensor], torch.Tensor]] = {}

    def _feeds(self, x: torch.Tensor, t: torch.Tensor | float, cond: Cond) -> dict[str, torch.Tensor]:
        integral = self.dtypes["timestep"] in (torch.int64, torch.int32)
        feeds = {"sample": x, "timestep": timestep_feed(torch.as_tensor(t, device=self.device), x.shape[0], integral)}
        feeds.update(cond_feeds(self.cond_inputs, cond, "the engine"))
        return {n: v.to(self.device, self.dtypes[n]).contiguous() for n, v in feeds.items()}

    def _run(self, feeds: Mapping[str, torch.Tensor], out: torch.Tensor, stream: torch.cuda.Stream) -> None:
        for name, value in feeds.items():
            self.context.set_input_shape(name, tuple(value.shape))
            self.context.set_tensor_address(name, value.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise DenoqError("TensorRT's execute_async_v3 failed (see TensorRT's log above)")

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, cond: Cond = None) -> torch.Tensor:
        feeds = self._feeds(x, t, cond)
        key = tuple((n, tuple(v.shape)) for n, v in sorted(feeds.items()))
        stream = torch.cuda.current_stream(self.device)
        if key in self._graphs:
            graph, static, out = self._graphs[key]
            for name, value in feeds.items():
                static[name].copy_(value)
            graph.replay()
        else:
            for name, value in feeds.items():
                self.context.set_input_shape(name, tuple(value.shape))
            shape = tuple(self.context.get_tensor_shape(self.output))
            out = torch.empty(shape, dtype=self.dtypes[self.output], device=self.device)
            self._run(feeds, out, stream)
            if self.cuda_graph:
                static = {n: v.clone() for n, v in feeds.items()}
                side = torch.cuda.Stream(self.device)
                side.wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.stream(side):
                    self._run(static, out, side)  # TensorRT wants one run on the capture stream first
                    with torch.cuda.graph(graph, stream=side):
                        self._run(static, out, side)
                stream.wait_stream(side)
                self._graphs[key] = (graph, static, out)
        result = out.to(device=x.device, dtype=x.dtype)
        return result.clone() if result.data_ptr() == out.data_ptr() else result  # the graph reuses `out`
