"""What ONNX Runtime makes of a Q/DQ graph: the integer-kernel fusion of its quantized layers, and latency.

ORT's CPU integer kernels replace `DQ → Conv/Gemm/MatMul [→ Q]` groups when the graph allows it; `fusion_report`
reads the graph ORT actually optimized instead of assuming. `latency` times one forward of a session (`ort.py`) or
of any callable.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from denoq.engines.ort import OrtBackend, create_session
from denoq.errors import DenoqError
from denoq.layermap import read_layer_map
from denoq.onnxio import load_model

# Kernels that compute a quantized layer with integer arithmetic (CPU EP, ONNX and com.microsoft domains), with
# the input index of their (constant, integer) weight.
INTEGER_OPS = {"QLinearConv": 3, "QGemm": 3, "QLinearMatMul": 3, "MatMulIntegerToFloat": 1, "ConvInteger": 1,
               "MatMulInteger": 1, "DynamicQuantizeMatMul": 1, "MatMulNBits": 1}
# Float kernels a quantized layer stays as when ORT does not fuse it (its weight input is a DequantizeLinear).
FLOAT_OPS = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")
LAYER_OPS = ("Conv", "Gemm", "MatMul")


# -- fusion ------------------------------------------------------------------------------------------------

def _float_layers(graph: onnx.GraphProto, ops: Sequence[str]) -> list[onnx.NodeProto]:
    """Nodes of type `ops` whose weight (input 1) is DequantizeLinear(constant): quantized layers left in float.

    Activation × activation MatMuls (attention scores reading dequantized activations) are not layers."""
    inits = {i.name for i in graph.initializer}
    weights = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return [n for n in graph.node if n.op_type in ops and len(n.input) > 1 and n.input[1] in weights]


def _integer_layers(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Integer kernels whose weight input is a constant: quantized layers ORT fused."""
    inits = {i.name for i in graph.initializer}
    return [n for n in graph.node if n.op_type in INTEGER_OPS and len(n.input) > INTEGER_OPS[n.op_type]
            and n.input[INTEGER_OPS[n.op_type]] in inits]


def fusion_report(onnx_path: str | Path, threads: int | None = 1, exact_integers: bool = True) -> dict[str, Any]:
    """What ORT's CPU EP made of the quantized layers of a Q/DQ model, read from the graph it optimized.

    ORT writes its optimized graph at the `extended` level (QDQ fusions done, no hardware-specific NCHWc
    layout yet). A quantized layer is a Conv/Gemm/MatMul whose weight is DequantizeLinear(constant) in the
    input model. Returns:
    `layers` (their number), `integer_ops` (integer kernels with a constant weight in the optimized graph, by
    op type: QLinearConv, QGemm, QLinearMatMul, MatMulIntegerToFloat, ...), `float_ops` (Conv/Gemm/MatMul and
    ORT's Fused* variants whose weight is still a DequantizeLinear), `fused` / `unfused` (their totals),
    `fraction_fused` (= fused / layers), `by_layer` (module name, or node name without a layer map → the op
    it runs as; ORT keeps the node name or extends it with `/<fusion>`), `quantize_nodes` /
    `dequantize_nodes` left standing. `exact_integers`: as `ort.session_options`.
    """
    path = Path(onnx_path)
    src = load_model(path)
    layers = _float_layers(src.graph, LAYER_OPS)
    try:
        lmap = {ref.node: module for module, ref in read_layer_map(src).items()}
    except DenoqError:  # a graph quantized by another tool: report node names
        lmap = {}
    with tempfile.TemporaryDirectory() as tmp:
        opt_path = Path(tmp) / "optimized.onnx"
        create_session(path, threads, ["CPUExecutionProvider"], level="extended", optimized_model_path=opt_path,
                       exact_integers=exact_integers)
        opt = onnx.load(str(opt_path))
    integer = Counter(n.op_type for n in _integer_layers(opt.graph))
    floating = Counter(n.op_type for n in _float_layers(opt.graph, FLOAT_OPS))
    by_layer = {}
    for layer in layers:
        found = [n.op_type for n in opt.graph.node
                 if n.name == layer.name or n.name.startswith(layer.name + "/")]
        ops = [o for o in found if o in INTEGER_OPS or o in FLOAT_OPS]
        by_layer[lmap.get(layer.name, layer.name)] = ops[0] if ops else "?"
    fused, unfused = sum(integer.values()), sum(floating.values())
    return {
        "layers": len(layers),
        "integer_ops": dict(sorted(integer.items())),
        "float_ops": dict(sorted(floating.items())),
        "fused": fused,
        "unfused": unfused,
        "fraction_fused": fused / len(layers) if layers else 0.0,
        "by_layer": dict(sorted(by_layer.items())),
        "quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in opt.graph.node),
        "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in opt.graph.node),
    }


# -- timing ------------------------------------------------------------------------------------------------

def latency(backend_or_session: OrtBackend | ort.InferenceSession | Callable[..., Any],
            feeds: Mapping[str, np.ndarray] | Sequence[Any], warmup: int = 3,
            iters: int = 20) -> dict[str, float | int]:
    """Wall-clock latency of one forward: `median_ms`, `mean_ms`, `min_ms`, `p90_ms`, `stdev_ms`, `iters`.

    A session or OrtBackend runs `feeds` (graph input name → array) through `session.run`; any other callable
    is called as `fn(*feeds)` (e.g. a torch module or an OrtBackend with `(x, t)`).
    """
    if iters < 1:
        raise DenoqError(f"latency needs iters >= 1, got {iters}")
    session = backend_or_session.session if isinstance(backend_or_session, OrtBackend) else backend_or_session
    if isinstance(session, ort.InferenceSession) and isinstance(feeds, Mapping):
        def run() -> Any:
            return session.run(None, dict(feeds))
    elif callable(backend_or_session) and not isinstance(feeds, Mapping):
        def run() -> Any:
            return backend_or_session(*feeds)
    else:
        raise DenoqError("latency: pass a session/OrtBackend with a feeds dict, or a callable with a tuple of args")
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "min_ms": times[0],
        "p90_ms": times[min(len(times) - 1, round(0.9 * (len(times) - 1)))],
        "stdev_ms": statistics.stdev(times) if len(times) > 1 else 0.0,
        "iters": iters,
    }
