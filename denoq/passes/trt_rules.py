"""The `trt-rules` check: reject a Q/DQ graph TensorRT would refuse or run unfused, before any engine build.

TensorRT's explicit quantization (its "Working with Quantized Types" guide; strongly typed networks in TensorRT 10+)
reads Q/DQ nodes as follows, and this check enforces each point on the ONNX graph, with no TensorRT needed:

- `scale-not-constant`: every Q/DQ scale (and zero point) is a build-time constant (an initializer or a Constant
  node), never a computed tensor.
- `scale-not-positive`: every scale is finite and > 0.
- `zero-point`: zero points are 0 and of a signed type (int8 symmetric activations and weights, or FP8 E4M3;
  uint8 / non-zero zero points are the `ort-cpu` profile's, not TensorRT's).
- `fp4-form`: NVFP4 is `float4e2m1` in blocks of 16 whose scale is `DequantizeLinear(FP8 E4M3 block scales,
  constant per-tensor scale)`: constant block scales for weights, the second output of
  `trt::TRT_FP4DynamicQuantize` for activations (the one computed scale TensorRT takes; Model Optimizer's form).
- `fp4-placement`: NVFP4 values feed MatMul / Gemm only (TensorRT's FP4 path runs GEMMs).
- `int4-placement`: INT4 appears only as blocked weight-only quantization: a DequantizeLinear of an int4
  initializer, with `block_size`, feeding the weight input of a MatMul / Gemm; never on activations or Conv.
- `blocked-int8`: 8-bit weights are per tensor or per output channel, not blocked.
- `channel-axis`: a per-channel weight DequantizeLinear uses the output-channel axis of its consumer (Conv: 0,
  Gemm with transB=1: 0, Gemm: 1, MatMul's [in, out] weight: 1); activation quantizers are per tensor.
- `dtype`: under strong typing a QuantizeLinear's input has its scale's float type, and the float inputs of each
  Conv / MatMul / Gemm share one type (a DequantizeLinear produces its scale's type). ONNX's own type constraints
  say the same (QuantizeLinear: x and y_scale are one T1; Conv: X and W one T), so strict type inference, which
  runs first, reports such a graph (`DenoqError` "type inference fails") before any other rule.
- `stray-qdq`: an activation QuantizeLinear feeds only DequantizeLinear nodes, each activation DequantizeLinear
  reads a QuantizeLinear, and every activation Q/DQ pair feeds a Conv / ConvTranspose / MatMul / Gemm directly
  (a pair in front of anything else is not fused and only costs time).

`trt_violations(model)` lists what breaks the rules; `CheckTrtRules` is the pass form: an onnx-ir pass that changes
nothing and whose `requires` refuses a graph breaking a rule (in a pipeline, a one-line DenoqError naming the
rules broken and the first offending nodes). The rules read ONNX's type inference, so the pass checks a protobuf
snapshot of the `ir.Model`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, numpy_helper
from onnx_ir.passes import PassResult, PreconditionError

from denoq.errors import DenoqError
from denoq.onnxio import check_and_infer
from denoq.passes.infra import DenoqPass

QDQ = ("QuantizeLinear", "DequantizeLinear")
COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm")
INT4 = (TensorProto.INT4, TensorProto.UINT4)
SIGNED = (TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN)
FP4_QUANTIZE = "TRT_FP4DynamicQuantize"
FP4_BLOCK = 16
SHOWN = 5


@dataclass(frozen=True, order=True)
class Violation:
    """One broken rule: the rule's name, the node, and what is wrong."""

    rule: str
    node: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.node}: {self.detail}"


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


class _Graph:
    """Lookups over one (type-checked) graph: constants, producers, consumers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        try:
            g = check_and_infer(model, strict=True, check_type=False).graph
        except onnx.shape_inference.InferenceError as exc:
            raise DenoqError(f"trt-rules: ONNX type inference fails on this graph ({' '.join(str(exc).split())}); "
                             "the graph is invalid before any TensorRT rule, fix it first") from None
        self.nodes = list(g.node)
        self.consts: dict[str, onnx.TensorProto] = {i.name: i for i in g.initializer}
        for n in self.nodes:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = a.t
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for n in self.nodes:
            for i, name in enumerate(n.input):
                if name:
                    self.consumers[name].append((n, i))

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def value(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.consts[name])


def _name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({', '.join(node.output)})"


def _check_scale_and_zero_point(g: _Graph, node: onnx.NodeProto) -> list[Violation]:
    out: list[Violation] = []
    scale = node.input[1]
    if not g.is_const(scale):
        return [Violation("scale-not-constant", _name(node), f"scale {scale!r} is computed, not a constant")]
    s = g.value(scale).astype(np.float64)
    if not np.all(np.isfinite(s)) or not np.all(s > 0):
        out.append(Violation("scale-not-positive", _name(node), f"scale {scale!r} has values ≤ 0 or not finite"))
    zp = node.input[2] if len(node.input) > 2 else ""
    if not zp and node.op_type == "QuantizeLinear" and _attr(node, "output_dtype", 0) not in SIGNED:
        out.append(Violation("zero-point", _name(node), "no zero point and no signed output_dtype: ONNX's default "
                             "is uint8; TensorRT takes signed int8"))
    if zp:
        if not g.is_const(zp):
            out.append(Violation("scale-not-constant", _name(node), f"zero point {zp!r} is not a constant"))
        else:
            z = g.consts[zp]
            if z.data_type not in SIGNED:
                out.append(Violation("zero-point", _name(node), f"zero point {zp!r} is of type "
                                     f"{TensorProto.DataType.Name(z.data_type)}; TensorRT takes int8/int4 or FP8"))
            elif np.any(numpy_helper.to_array(z) != 0):
                out.append(Violation("zero-point", _name(node), f"zero point {zp!r} is not 0"))
    return out


def _weight_axis(consumer: onnx.NodeProto) -> int:
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    return 1  # MatMul's [in, out] weight


def _check_weight_dq(g: _Graph, node: onnx.NodeProto) -> list[Violation]:
    qtype = g.consts[node.input[0]].data_type
    users = g.consumers.get(node.output[0], [])
    block = _attr(node, "block_size", 0)
    out = []
    if qtype in INT4:
        if block <= 0 or not users or any(n.op_type not in ("MatMul", "Gemm") or i != 1 for n, i in users):
            where = ", ".join(f"{n.op_type} input {i}" for n, i in users) or "nothing"
            out.append(Violation("int4-placement", _name(node), f"int4 weights feed {where}"
                                 + ("" if block > 0 else " without block_size")
                                 + "; TensorRT takes INT4 only as blocked MatMul/Gemm weights"))
        return out
    if block > 0:
        out.append(Violation("blocked-int8", _name(node), f"8-bit weights blocked by {block}; use per-channel"))
        return out
    scale = g.value(node.input[1])
    if scale.size > 1:
        axis = _attr(node, "axis", 1)
        for user, _ in users:
            if user.op_type in COMPUTE and axis != _weight_axis(user):
                out.append(Violation("channel-axis", _name(node), f"per-channel axis {axis} but {user.op_type}'s "
                                     f"output channels are axis {_weight_axis(user)}"))
    return out


def _check_activation(g: _Graph, node: onnx.NodeProto) -> list[Violation]:
    out = []
    if g.value(node.input[1]).size > 1:
        out.append(Violation("channel-axis", _name(node), "activation quantizer is per channel; TensorRT wants per "
                             "tensor"))
    if node.op_type == "QuantizeLinear":
        qtype = g.consts[node.input[2]].data_type if len(node.input) > 2 and g.is_const(node.input[2]) else None
        qtype = _attr(node, "output_dtype", 0) or qtype
        if qtype in INT4:
            out.append(Violation("int4-placement", _name(node), "int4 activations; TensorRT takes INT4 weights only"))
        users = g.consumers.get(node.output[0], [])
        if any(u.op_type != "DequantizeLinear" for u, _ in users):
            others = sorted({u.op_type for u, _ in users if u.op_type != "DequantizeLinear"})
            out.append(Violation("stray-qdq", _name(node), f"QuantizeLinear feeds {', '.join(others)}, not only a "
                                 "DequantizeLinear"))
        for dq, _ in users:
            if dq.op_type == "DequantizeLinear" and not any(
                    u.op_type in COMPUTE for u, _ in g.consumers.get(dq.output[0], [])):
                ops = sorted({u.op_type for u, _ in g.consumers.get(dq.output[0], [])}) or ["nothing"]
                out.append(Violation("stray-qdq", _name(dq), f"Q/DQ pair feeds {', '.join(ops)}, no "
                                     "Conv/MatMul/Gemm: TensorRT cannot fuse it"))
    else:
        src = g.producer.get(node.input[0])
        if src is None or src.op_type != "QuantizeLinear":
            out.append(Violation("stray-qdq", _name(node), "activation DequantizeLinear does not read a "
                                 "QuantizeLinear"))
    return out


def _reads_fp4(g: _Graph, name: str) -> bool:
    """True when tensor `name` holds NVFP4 values: a float4e2m1 constant or TRT_FP4DynamicQuantize's first output."""
    src = g.producer.get(name)
    return (g.is_const(name) and g.consts[name].data_type == TensorProto.FLOAT4E2M1) or (
        src is not None and src.op_type == FP4_QUANTIZE and src.output[0] == name)


def _is_fp4_scale(g: _Graph, node: onnx.NodeProto) -> bool:
    """True when `node` (a DequantizeLinear) only makes the block scales of NVFP4 DequantizeLinears."""
    users = g.consumers.get(node.output[0], [])
    return bool(users) and all(u.op_type == "DequantizeLinear" and i == 1 and _reads_fp4(g, u.input[0])
                               for u, i in users)


def _check_fp4(g: _Graph, node: onnx.NodeProto) -> list[Violation]:
    """The `fp4-form` and `fp4-placement` rules on an NVFP4 DequantizeLinear."""
    out = []
    scale = g.producer.get(node.input[1])
    src = g.producer.get(scale.input[0]) if scale is not None else None
    block_scales = scale is not None and (
        (g.is_const(scale.input[0]) and g.consts[scale.input[0]].data_type == TensorProto.FLOAT8E4M3FN)
        or (src is not None and src.op_type == FP4_QUANTIZE and src.output[1] == scale.input[0]))
    if (_attr(node, "block_size", 0) != FP4_BLOCK or scale is None or scale.op_type != "DequantizeLinear"
            or not block_scales or len(scale.input) < 2 or not g.is_const(scale.input[1])):
        out.append(Violation("fp4-form", _name(node), f"NVFP4 needs blocks of {FP4_BLOCK} scaled by "
                             "DequantizeLinear(FP8 block scales, constant per-tensor scale)"))
    users = g.consumers.get(node.output[0], [])
    if not users or any(u.op_type not in ("MatMul", "Gemm") for u, _ in users):
        where = ", ".join(sorted({u.op_type for u, _ in users})) or "nothing"
        out.append(Violation("fp4-placement", _name(node), f"NVFP4 values feed {where}; TensorRT's FP4 path runs "
                             "MatMul / Gemm only"))
    return out


def trt_violations(model: onnx.ModelProto) -> list[Violation]:
    """Every rule of the module docstring that `model` breaks, sorted."""
    g = _Graph(model)
    found: list[Violation] = []
    for node in g.nodes:
        if node.op_type == "DequantizeLinear" and _reads_fp4(g, node.input[0]):
            found += _check_fp4(g, node)
        elif node.op_type == "DequantizeLinear" and _is_fp4_scale(g, node):
            continue
        elif node.op_type in QDQ:
            found += _check_scale_and_zero_point(g, node)
            if any(v.rule == "scale-not-constant" and v.node == _name(node) for v in found):
                continue
            if node.op_type == "DequantizeLinear" and g.is_const(node.input[0]):
                found += _check_weight_dq(g, node)
            else:
                found += _check_activation(g, node)
    return sorted(set(found))


def summarize(violations: list[Violation]) -> str:
    """One line: the rules broken with their counts, and the first SHOWN violations."""
    counts: dict[str, int] = defaultdict(int)
    for v in violations:
        counts[v.rule] += 1
    rules = ", ".join(f"{r} ×{c}" for r, c in sorted(counts.items()))
    return f"{len(violations)} TensorRT rule violation(s) ({rules}); first: " + "; ".join(
        str(v) for v in violations[:SHOWN])


class CheckTrtRules(DenoqPass):
    """Check pass: the graph unchanged if it keeps every TensorRT rule (module docstring); `requires` raises a
    PreconditionError naming the rules broken and the first offending nodes otherwise."""

    name = "trt_rules"

    @property
    def in_place(self) -> Literal[True]:
        return True

    @property
    def changes_input(self) -> Literal[False]:
        return False

    def requires(self, model: ir.Model) -> None:
        violations = trt_violations(ir.to_proto(model))
        if violations:
            raise PreconditionError(summarize(violations) + "; compile with --set target=trt and 8-bit activations, "
                                    "or fix the graph")

    def call(self, model: ir.Model) -> PassResult:
        return PassResult(model, False)
