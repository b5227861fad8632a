"""The checks that a QuantPlan fits the FP graph, and the constant quantizer forms they resolve (`Act`, `Weight`).

Each check raises a one-line `DenoqError` naming the layer, the problem and the fix (the plan and the graph come
from different models, the plan is corrupt, the recipe asks for a form a target does not take). Used by
`denoq.passes.binding`, before any pass changes the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from denoq.errors import DenoqError
from denoq.formats import NVFP4_BLOCK, grid_max
from denoq.layermap import LAYER_OP_TYPES, LayerRef
from denoq.plan import ActQuant, LayerPlan, qrange

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_WEIGHT_BITS = range(2, 9)  # ≤ 4 bits: int4 for MatMul / Gemm; otherwise (and always for Conv) the int8 container
_ACT_BITS = (4, 6, 8)  # int4/uint4 and int8/uint8 are ONNX types; 6 bits saturate in the 8-bit container


@dataclass(frozen=True)
class Act:
    """A constant per-tensor activation quantizer, or a dynamic block quantizer (`block_size` > 0; `scale` is then
    NVFP4's global scale g), resolved from the plan."""

    scale: float  # exactly representable in the graph's float type
    zero_point: int
    signed: bool
    bits: int
    format: str = "int"
    block_size: int = 0

    @property
    def qtype(self) -> ir.DataType:
        if self.format == "fp8":
            return ir.DataType.FLOAT8E4M3FN
        if self.format == "fp4":
            return ir.DataType.FLOAT4E2M1
        if self.bits == 4:
            return ir.DataType.INT4 if self.signed else ir.DataType.UINT4
        return ir.DataType.INT8 if self.signed else ir.DataType.UINT8

    @property
    def qmax(self) -> float:
        """The largest magnitude on the grid (2^(b−1) − 1 for signed integers)."""
        return grid_max(self.format, self.bits)

    @property
    def clip(self) -> tuple[int, int] | None:
        """The integer range a `Clip` after Q enforces, where `qtype` is wider than `bits` (None otherwise)."""
        return None if self.bits in (4, 8) or self.format != "int" else qrange(self.bits, self.signed)


@dataclass(frozen=True)
class Weight:
    """The inputs and attributes of a layer's weight DequantizeLinear, in ONNX layout."""

    ints: np.ndarray  # the plan's values as `qtype`: int8, ml_dtypes.int4, float8_e4m3fn or float4_e2m1fn
    scale: np.ndarray  # float32: [out] per channel, else the weight's shape with axis `axis` divided by block_size
    axis: int
    block_size: int  # 0: per output channel (`axis` = weight_axis); else blocked along the input axis `axis`
    qtype: ir.DataType
    global_scale: float | None = None  # NVFP4: `scale` holds FP8 E4M3 values, read through DQ(scale, g)


def check_node(name: str, ref: LayerRef, node: ir.Node | None) -> ir.Node:
    """The layer's node, reading an activation and its own FP weight initializer; DenoqError otherwise."""
    if node is None:
        raise DenoqError(f"layer {name}: the layer map names node {ref.node!r} but the graph has no such node; "
                         "re-export the model (the map is stale)")
    if node.op_type != ref.op_type or node.op_type not in LAYER_OP_TYPES:
        raise DenoqError(f"layer {name}: node {ref.node!r} is {node.op_type}, the layer map says "
                         f"{ref.op_type}; re-export the model")
    if not node.inputs or node.inputs[0] is None:
        raise DenoqError(f"layer {name}: node {ref.node!r} has no activation input; re-export the model")
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.name != ref.weight or w.const_value is None or not w.is_initializer():
        got = None if w is None else w.name
        raise DenoqError(f"layer {name}: input 1 of node {ref.node!r} is {got!r}, not the FP weight initializer "
                         f"{ref.weight!r}; pass the FP model from export (was it quantized already?)")
    others = sorted({u.node.name or u.node.op_type for u in w.uses() if u.node is not node})
    if others:
        raise DenoqError(f"layer {name}: weight {ref.weight!r} is also read by {', '.join(others)}; tied "
                         "weights cannot be quantized per layer, untie them before export")
    if w.const_value.dtype not in _FLOAT_TYPES:
        raise DenoqError(f"layer {name}: weight {ref.weight!r} has type {w.const_value.dtype}, expected a float "
                         "type; pass the FP model from export")
    return node


def _plan_values(name: str, lp: LayerPlan) -> np.ndarray:
    """The plan's weight values: int8 integers, or float32 holding FP8 / FP4 grid values (checked on the grid)."""
    if lp.weight_format == "int":
        return np.asarray(lp.weight_int.detach().cpu().numpy(), dtype=np.int8)
    v = lp.weight_int.detach().cpu().float().numpy()
    if lp.weight_format == "fp4" and not np.array_equal(v.astype(ml_dtypes.float4_e2m1fn).astype(np.float32), v):
        raise DenoqError(f"layer {name}: fp4 weights hold values off the E2M1 grid; the plan is corrupt, recalibrate")
    return v


def check_weight_ints(name: str, lp: LayerPlan, ref: LayerRef, node: ir.Node, onnx_shape: tuple) -> np.ndarray:
    """The plan's weight values in ONNX layout (`_plan_values`), checked against the graph's weight and the bit
    width."""
    ints = _plan_values(name, lp)
    if ref.transposed:
        if ints.ndim != 2:
            raise DenoqError(f"layer {name}: the layer map says the weight is transposed but the plan's "
                             f"weights are {ints.ndim}-D; re-export the model")
        ints = np.ascontiguousarray(ints.T)
    if onnx_shape != ints.shape:
        raise DenoqError(f"layer {name}: weight shape mismatch, ONNX {ref.weight!r} is {onnx_shape} but the plan "
                         f"gives {ints.shape} (ONNX layout); the plan was calibrated on a different model")
    out_channels = lp.weight_int.shape[0]
    if not 0 <= ref.weight_axis < ints.ndim or ints.shape[ref.weight_axis] != out_channels:
        raise DenoqError(f"layer {name}: weight_axis {ref.weight_axis} of {ref.weight!r} {onnx_shape} is not "
                         f"its {out_channels} output channels; re-export the model (the map is wrong)")
    if node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0)) == ref.transposed:
        raise DenoqError(f"layer {name}: Gemm transB={node.attributes.get_int('transB', 0)} contradicts "
                         f"transposed={ref.transposed} in the layer map; re-export the model")
    if lp.weight_bits not in _WEIGHT_BITS:
        raise DenoqError(f"layer {name}: weights have {lp.weight_bits} bits; insert_qdq supports 2- to 8-bit "
                         "weights, set weights.bits to 8, 4 or 3")
    lo, hi = qrange(lp.weight_bits, signed=True)
    if lp.weight_format == "int" and ints.size and (int(ints.min()) < lo or int(ints.max()) > hi):
        raise DenoqError(f"layer {name}: integer weights span [{ints.min()}, {ints.max()}], outside the "
                         f"{lp.weight_bits}-bit range [{lo}, {hi}]; the plan is corrupt, recalibrate")
    return ints


def weight_form(layer: str, lp: LayerPlan, ref: LayerRef, op_type: str, ints: np.ndarray, scale: np.ndarray,
            opset: int) -> Weight:
    """The weight DQ of `lp` (`denoq.passes.weights`): `ints` are its integers in ONNX layout, `scale` its float32
    scales in plan layout (`[out]` or `[out, in / block_size]`)."""
    perm = (1, 0) if ref.transposed else tuple(range(ints.ndim))  # ONNX axis i holds the PyTorch dimension perm[i]
    if perm.index(0) != ref.weight_axis:
        raise DenoqError(f"layer {layer}: weight_axis {ref.weight_axis} contradicts transposed={ref.transposed} in "
                         "the layer map; re-export the model (the map is wrong)")
    qtype = {"fp8": ir.DataType.FLOAT8E4M3FN, "fp4": ir.DataType.FLOAT4E2M1}.get(
        lp.weight_format, ir.DataType.INT4 if lp.weight_bits <= 4 and op_type != "Conv" else ir.DataType.INT8)
    block = lp.block_size
    if lp.weight_format == "fp4":
        if block != NVFP4_BLOCK or lp.weight_global_scale is None:
            raise DenoqError(f"layer {layer}: fp4 weights are NVFP4 (blocks of {NVFP4_BLOCK} with a global scale); "
                             f"got block size {block}; recalibrate")
        s8 = lp.weight_scale.detach().cpu().float().numpy()
        if not np.array_equal(s8.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), s8):
            raise DenoqError(f"layer {layer}: NVFP4 block scales must be FP8 E4M3 numbers; the plan is corrupt, "
                             "recalibrate")
    if block < 0:
        raise DenoqError(f"layer {layer}: block size {block} is negative; set weights.group_size to 0 (per output "
                         "channel) or a positive divisor of the input channels")
    if (block or qtype == ir.DataType.INT4) and opset < 21:  # (checked before the whole-row block below)
        what = f"blocked weights (block size {block})" if block else f"{lp.weight_bits}-bit int4 weights"
        raise DenoqError(f"layer {layer}: {what} need ONNX opset >= 21 but the model uses opset {opset}; "
                         "re-export with opset_version=21")
    if block == 0 and qtype == ir.DataType.INT4:  # INT4 is blocked only (TensorRT): one block = the whole row
        block, scale = lp.weight_int.shape[1], scale.reshape(-1, 1)
    if block == 0:
        return Weight(ints=ints.astype(qtype.numpy()), scale=scale, axis=ref.weight_axis, block_size=0, qtype=qtype)
    in_channels = lp.weight_int.shape[1]
    if in_channels % block:
        raise DenoqError(f"layer {layer}: block size {block} does not divide its {in_channels} input channels; "
                         f"set weights.group_size to a divisor of {in_channels} (or 0 for per-channel weights)")
    # [out, in / B] → [out, in / B, kh, kw] (repeated over the kernel) → ONNX layout, as the integers
    full = np.broadcast_to(scale.reshape(*scale.shape, *([1] * (ints.ndim - 2))),
                           (*scale.shape, *lp.weight_int.shape[2:]))
    return Weight(ints=ints.astype(qtype.numpy()), scale=np.ascontiguousarray(np.transpose(full, perm)),
                  axis=perm.index(1), block_size=block, qtype=qtype, global_scale=lp.weight_global_scale)


def act(layer: str, role: str, q: ActQuant | None, target: str, ftype: ir.DataType,
         resolved: float | None = None) -> Act | None:
    """The constant quantizer of `q`: its one scale, or `resolved` (the selector's s0 / s_out0) when given."""
    if q is None:
        return None
    if q.format != "int" and (not q.signed or q.zero_point != 0 or q.bits != {"fp8": 8, "fp4": 4}[q.format]):
        raise DenoqError(f"layer {layer}: {role} {q.format} activations must be signed {q.format} with zero point 0; "
                         "the plan is corrupt, recalibrate")
    if q.block_size and (q.format == "fp8" or not q.signed):
        raise DenoqError(f"layer {layer}: {role} dynamic blocks take signed int or fp4 (NVFP4) activations, not "
                         f"{'' if q.signed else 'u'}{q.format}{q.bits}; recalibrate")
    if q.format == "fp4" and q.block_size != NVFP4_BLOCK:
        raise DenoqError(f"layer {layer}: {role} fp4 activations are NVFP4: dynamic blocks of {NVFP4_BLOCK}; "
                         "the plan is corrupt, recalibrate")
    if q.bits not in _ACT_BITS:
        raise DenoqError(f"layer {layer}: {role} activations have {q.bits} bits; insert_qdq supports 4-, 6- and "
                         "8-bit activations, set activations.bits to 4, 6 or 8")
    lo, hi = q.qrange
    if not lo <= q.zero_point <= hi:
        raise DenoqError(f"layer {layer}: {role} zero point {q.zero_point} is outside [{lo}, {hi}]; the plan is "
                         "corrupt, recalibrate")
    if target == "trt" and (not q.signed or q.zero_point != 0):
        raise DenoqError(f"layer {layer}: TensorRT needs symmetric activations (signed, zero point 0) but the "
                         f"{role} quantizer is {'' if q.signed else 'u'}int{q.bits} with zero point {q.zero_point}; "
                         "calibrate with target=trt")
    scale = float(q.scale[0]) if resolved is None else resolved
    cast = float(np.asarray(scale, dtype=ftype.numpy()).astype(np.float32))
    if not (math.isfinite(scale) and scale > 0 and cast == scale):
        raise DenoqError(f"layer {layer}: {role} scale {scale!r} must be finite, positive and exact in {ftype}; "
                         "the plan is corrupt, recalibrate")
    return Act(scale=scale, zero_point=int(q.zero_point), signed=bool(q.signed), bits=int(q.bits), format=q.format,
               block_size=q.block_size)


def check_selector_layer(node: ir.Node, layer: str, ftype: ir.DataType) -> None:
    """The layer forms the selector supports: float32, Gemm without alpha/beta scaling, constant bias."""
    if ftype != ir.DataType.FLOAT:
        raise DenoqError(f"layer {layer}: timestep selectors are built for float32 graphs, this one is {ftype}; "
                         "insert Q/DQ on the float32 export, convert to FP16 afterwards")
    if node.op_type == "Gemm" and (not math.isclose(node.attributes.get_float("alpha", 1.0), 1.0)
                                   or not math.isclose(node.attributes.get_float("beta", 1.0), 1.0)
                                   or node.attributes.get_int("transA", 0)):
        raise DenoqError(f"layer {layer}: Gemm with alpha/beta != 1 or transA is not a Linear; re-export the model")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = node.inputs[2]
        if b.const_value is None or not b.is_initializer():
            raise DenoqError(f"layer {layer}: its bias {b.name!r} is not a constant initializer, the timestep "
                             "selector adds it after the Div; re-export the model with constant biases")
