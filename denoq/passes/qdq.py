"""Insert QuantizeLinear / DequantizeLinear for every layer of a QuantPlan (DESIGN.md: Quantizer semantics, Targets).

For each planned layer (found through the `denoq.layer_map` metadata, never by node order):

- weight: the FP initializer `<module>.weight` is replaced by the plan's integers (ONNX layout: transposed for
  `[in, out]` MatMul weights), a float scale per output channel and zeros, read through
  `DequantizeLinear(axis=weight_axis)`. The DQ output keeps the name `<module>.weight`, so the layer map still
  names the node's weight input. Integers are copied, never re-rounded; they must lie in `qrange(weight_bits)`.
- INT4 / blocked weights (opset 21): MatMul / Gemm weights of ≤ 4 bits are stored as ONNX `int4` (zero points
  `int4` too), wider ones as int8; Conv weights always use the int8 container (4- and 3-bit values in int8).
  A plan with `block_size` B > 0 gives `DequantizeLinear(axis=<input-channel axis>, block_size=B)`, that axis
  taken from the layer map (0 for a transposed `[in, out]` MatMul weight, 1 for Gemm `[out, in]` and Conv
  `[out, in, kh, kw]`); scale and zero point have the weight's shape with that axis divided by B (ONNX's blocked
  rule), so a conv's `[out, in / B]` scales are repeated over kh, kw: exactly `LayerPlan.dequantized_weight`.
  8-bit per-channel weights give the same bytes as before. A per-channel INT4 MatMul / Gemm weight (a layer the
  group size does not divide) is written as one block spanning the whole row: the same numbers, in the only
  form TensorRT accepts INT4 in.
- input activation: `QuantizeLinear → DequantizeLinear` in front of input 0 with the plan's (constant) scale
  and zero point (int8 when `signed`, else uint8). Nodes reading the same tensor with identical quantizer
  parameters share one pair (to_q / to_k / to_v); a tensor that is already `DQ(Q(·))` with identical parameters
  (the quantized output of the previous layer) is read as it is.
- activation bits: 8 as above; 4 with ONNX `int4` / `uint4` zero points (opset 21); 6 in the 8-bit container,
  saturated by an integer `Q → Clip(qmin, qmax) → DQ` (int6 [-32, 31], uint6 [0, 63]). TensorRT takes 8-bit
  activations only: A4 / A6 graphs are for ORT validation and quality studies.
- output activation (where the plan has one, the `ort-cpu` profile): `Q → DQ` on the layer's output, every
  consumer rewired to the DQ, a graph output keeping its name. The layer's output is the module's output: for a
  MatMul whose only consumer is the `Add` of a constant `[out]` bias (the dynamo exporter's Linear), that Add's
  output, so the quantizer sees what PyTorch's Linear returns, and ORT fuses `DQ → MatMul → Add → Q`.

Attention matmuls (plans with `attention`, `denoq.calibrators.attention`): each planned attention module, found
through the `denoq.attention_map` metadata, gets `Q → DQ` on both inputs of its Q·Kᵀ MatMul (the scaled query
`attn_q`, the scaled transposed key `attn_k`) and of its P·V MatMul (the softmax probabilities `attn_p`, the values
`attn_v`), with the plan's constant scales (an attention quantizer has no timestep selector); probabilities on the
log2 grid (`AttentionPlan.p_log2`) as `Pow(2, −Clip(Round(−Log(p) / ln 2)))` in float ops instead.

IGQ-ViT groups (`LayerPlan.input_groups`, `AttentionPlan.p_groups`; `denoq.calibrators.igq`): the dynamic
assignment as ONNX ops ORT runs. For a token input x [B, L, C]: m, M = ReduceMin / ReduceMax over the tokens,
the width w = M − m (symmetric: Max(|m|, |M|)), g = ArgMin(Max(w / w_g, w_g / w)) per (instance, channel) against
the G group widths, s, z = Gather(scales, g), Gather(zero points, g), then the quantizer in float ops,
x̂ = (Clip(Round(x / s) + z, qmin, qmax) − z) · s (QuantizeLinear takes no per-instance scale). Softmax rows are
assigned by their maximum. These layers then have no activation Q/DQ: TensorRT would run them with float
activations (the trt-rules check, which reads Q/DQ placement, does not flag that). Static groups
(`LayerPlan.input_factors`, TensorRT's variant) are a constant `Mul(x, factors)` over the channel axis before
the layer's one input Q/DQ; the inverse factors are already in the plan's weights.

Timestep-grouped scales (DESIGN.md, Timestep selector; ADP-DM, arXiv 2305.18723): a
layer whose input scale table is not constant gets the selector rewrite of `denoq.passes.selector`

    trt:     x → Mul(R) → Q(s0) → DQ(s0) → Conv/Gemm/MatMul (no bias) → Div(R) → Add(bias)
    ort-cpu: x → Mul(R) → Q(s0) → DQ(s0) → Conv/Gemm/MatMul (no bias) → Q(s_out0) → DQ(s_out0) → Div(R) → Add(bias)

with `R = Gather(r, timestep)` (`r` shaped `[T, 1, …]`), `r_t = s0 / s_t`, `s0 = min_t s_t` and `s_out0` as that module
defines it. Layers with constant tables are rewritten exactly as before (G = 1 gives the same bytes).

The PyTorch simulation mirrors exactly this placement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from denoq.errors import DenoqError
from denoq.layermap import LAYER_OP_TYPES, LayerRef, read_attention_map, read_layer_map
from denoq.passes import selector
from denoq.passes.rewire import redirect
from denoq.plan import (
    ActQuant,
    GroupQuant,
    LayerPlan,
    QuantPlan,
    check_scale_table,
    qrange,
    selector_tables,
)

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_WEIGHT_BITS = range(2, 9)  # ≤ 4 bits: int4 for MatMul / Gemm; otherwise (and always for Conv) the int8 container
_ACT_BITS = (4, 6, 8)  # int4/uint4 and int8/uint8 are ONNX types; 6 bits saturate in the 8-bit container


@dataclass(frozen=True)
class _Act:
    """A constant per-tensor activation quantizer, resolved from the plan."""

    scale: float  # exactly representable in the graph's float type
    zero_point: int
    signed: bool
    bits: int

    @property
    def qtype(self) -> ir.DataType:
        if self.bits == 4:
            return ir.DataType.INT4 if self.signed else ir.DataType.UINT4
        return ir.DataType.INT8 if self.signed else ir.DataType.UINT8

    @property
    def clip(self) -> tuple[int, int] | None:
        """The integer range a `Clip` after Q enforces, where `qtype` is wider than `bits` (None otherwise)."""
        return None if self.bits in (4, 8) else qrange(self.bits, self.signed)


@dataclass(frozen=True)
class _Weight:
    """The inputs and attributes of a layer's weight DequantizeLinear, in ONNX layout."""

    ints: np.ndarray  # the plan's integers, int8 or ml_dtypes.int4 (`qtype`)
    scale: np.ndarray  # float32: [out] per channel, else the weight's shape with axis `axis` divided by block_size
    axis: int
    block_size: int  # 0: per output channel (`axis` = weight_axis); else blocked along the input axis `axis`
    qtype: ir.DataType


@dataclass
class _Layer:
    """A plan layer bound to its node in the graph (checked before anything is changed)."""

    ref: LayerRef
    plan: LayerPlan
    node: ir.Node
    weight_int: np.ndarray  # ONNX layout
    weight: _Weight
    ftype: ir.DataType  # the graph's float type for this layer (the FP weight's)
    input: _Act | None
    output: _Act | None
    ratio: np.ndarray | None = None  # timestep selector r_t = s0 / s_t (float32 [T]), None for constant scales


@dataclass(frozen=True)
class InsertQDQ:
    """Pass: Q/DQ for every layer of `plan`, for the plan's target profile (`trt` or `ort-cpu`).

    Invariant established: every planned layer reads `DequantizeLinear(plan integers, plan scales)` as its
    weight (no FP weight of a planned layer remains) and, where the plan quantizes its input,
    `DequantizeLinear(QuantizeLinear(x))` as its activation; where the plan quantizes its output, every reader
    of that output (graph output included, under its original name) reads `DQ(Q(y))`. A layer whose input
    scale varies with the timestep reads `DQ(Q(x·R))` and its output is `Div(·, R)` plus its bias (module
    docstring, `denoq.passes.selector`); constant tables give no selector nodes. For 6-bit activations every
    such `DQ(Q(·))` is `DQ(Clip(Q(·)))`, saturating to the 6-bit range.
    Raises DenoqError, before changing anything, when the plan and the graph do not match.
    """

    plan: QuantPlan
    name: str = "insert_qdq"

    def __call__(self, model: onnx.ModelProto) -> onnx.ModelProto:
        m = ir.from_proto(_copy(model))  # onnx-ir wraps the proto's tensors: work on a copy, leave the input as it is
        opset = m.opset_imports.get("", 0)
        if opset < 13:
            raise DenoqError(f"the model uses ONNX opset {opset}; per-channel Q/DQ needs opset >= 13, "
                             "re-export with opset_version=21")
        layers = _bind(self.plan, m)
        attention = _bind_attention(self.plan, m)
        g = m.graph
        ratios = selector.RatioCache(g)
        for layer in layers:
            _quantize_weight(g, layer)
        for layer in layers:  # selector layers: node → Div(R) → Add(bias), before their output Q/DQ goes in
            if layer.ratio is not None:
                rank = selector.layer_rank(layer.node, layer.ref.module)
                r_b = ratios.broadcast(layer.ratio, rank, layer.ref.module, layer.node)
                selector.insert_division(g, layer.node, r_b, layer.ref.module)
        for layer in layers:  # outputs first, so a next layer with identical input parameters can reuse them
            if layer.output is not None:
                _quantize_output(g, layer)
        shared: dict[tuple, ir.Value] = {}
        for layer in layers:
            if layer.plan.input_groups is not None:
                x = layer.node.inputs[0]
                nodes = _group_qdq(g, x, layer.plan.input_groups, layer.ref.module, "input", rows=False)
                g.insert_before(layer.node, nodes)
                layer.node.replace_input_with(0, nodes[-1].outputs[0])
            elif layer.input is not None:
                _quantize_input(g, layer, shared, ratios)
        for module, node, idx, role, a in attention:
            x = node.inputs[idx]
            ap = self.plan.attention[module]
            if role == "p" and ap.p_log2:
                nodes = _log2_qdq(g, x, ap.quants["p"].bits, module)
            elif role == "p" and ap.p_groups is not None:
                nodes = _group_qdq(g, x, ap.p_groups, module, "attn_p", rows=True)
            else:
                nodes = _qdq(g, x, a, module, f"attn_{role}", x.dtype)
            g.insert_before(node, nodes)
            node.replace_input_with(idx, nodes[-1].outputs[0])
        g.sort()
        return ir.to_proto(m)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# -- checks ------------------------------------------------------------------------------------------------

def _bind(plan: QuantPlan, model: ir.Model) -> list[_Layer]:
    refs = read_layer_map(model)
    nodes = {n.name: n for n in model.graph}
    layers = []
    for name in sorted(plan.layers):
        lp = plan.layers[name]
        ref = refs.get(name)
        if ref is None:
            raise DenoqError(f"plan layer {name!r} is not in the model's layer map; calibrate and export the same "
                             "network (the plan and the ONNX model come from different models)")
        node = nodes.get(ref.node)
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
        ftype = w.const_value.dtype
        if ftype not in _FLOAT_TYPES:
            raise DenoqError(f"layer {name}: weight {ref.weight!r} has type {ftype}, expected a float type; "
                             "pass the FP model from export")
        ints = np.asarray(lp.weight_int.detach().cpu().numpy(), dtype=np.int8)
        if ref.transposed:
            if ints.ndim != 2:
                raise DenoqError(f"layer {name}: the layer map says the weight is transposed but the plan's "
                                 f"weights are {ints.ndim}-D; re-export the model")
            ints = np.ascontiguousarray(ints.T)
        onnx_shape = tuple(w.const_value.shape)
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
        if ints.size and (int(ints.min()) < lo or int(ints.max()) > hi):
            raise DenoqError(f"layer {name}: integer weights span [{ints.min()}, {ints.max()}], outside the "
                             f"{lp.weight_bits}-bit range [{lo}, {hi}]; the plan is corrupt, recalibrate")
        scale = np.asarray(lp.weight_scale.detach().cpu().numpy(), dtype=np.float32)
        if not np.all(np.isfinite(scale) & (scale > 0)):
            raise DenoqError(f"layer {name}: weight scales must be finite and positive; the plan is corrupt, "
                             "recalibrate")
        weight = _weight(name, lp, ref, node.op_type, ints, scale, model.opset_imports.get("", 0))
        for role, q in (("input", lp.input), ("output", lp.output)):
            if q is not None:  # every table: length T, finite, positive
                check_scale_table(name, role, q, plan.num_train_timesteps)
        tables = None
        if any(q is not None and not q.is_constant for q in (lp.input, lp.output)):
            tables = selector_tables(name, lp.input, lp.output, plan.num_train_timesteps)
            if tables.ratio is not None:
                selector.check_selector_layer(node, name, ftype)
        layers.append(_Layer(ref=ref, plan=lp, node=node, weight_int=ints, weight=weight, ftype=ftype,
                             input=_act(name, "input", lp.input, plan.target, ftype,
                                        None if tables is None else tables.input_scale),
                             output=_act(name, "output", lp.output, plan.target, ftype,
                                         None if tables is None else tables.output_scale),
                             ratio=None if tables is None or tables.ratio is None else tables.ratio.numpy()))
    return layers


def _bind_attention(plan: QuantPlan, m: ir.Model) -> list[tuple[str, ir.Node, int, str, _Act]]:
    """(module, MatMul node, input index, role, quantizer) for every planned attention matmul input; DenoqError
    when the graph has no attention map entry or the nodes it names are not a MatMul → Softmax → MatMul."""
    if not plan.attention:
        return []
    amap = read_attention_map(m)
    nodes = {n.name: n for n in m.graph}
    bound = []
    for name in sorted(plan.attention):
        ref = amap.get(name)
        if ref is None:
            raise DenoqError(f"attention {name}: the graph's attention map has no entry for it (its attention did "
                             "not export as MatMul → Softmax → MatMul); set attention.quantize=false")
        qk, sm, pv = (nodes.get(n) for n in (ref.qk, ref.softmax, ref.pv))
        if (qk is None or sm is None or pv is None or qk.op_type != "MatMul" or sm.op_type != "Softmax"
                or pv.op_type != "MatMul" or sm.inputs[0] is not qk.outputs[0] or pv.inputs[0] is not sm.outputs[0]):
            raise DenoqError(f"attention {name}: the nodes the attention map names are not MatMul → Softmax → "
                             "MatMul; re-export the model with denoq.export")
        quants = plan.attention[name].quants
        for node, idx, role in ((qk, 0, "q"), (qk, 1, "k"), (pv, 0, "p"), (pv, 1, "v")):
            q = quants[role]
            if not q.is_constant:
                raise DenoqError(f"attention {name}: the {role} scale varies with the timestep; attention "
                                 "quantizers take one scale (recalibrate)")
            bound.append((name, node, idx, role, _act(name, f"attention {role}", q, plan.target,
                                                      node.inputs[idx].dtype)))
    return bound


def _weight(layer: str, lp: LayerPlan, ref: LayerRef, op_type: str, ints: np.ndarray, scale: np.ndarray,
            opset: int) -> _Weight:
    """The weight DQ of `lp` (module docstring): `ints` are its integers in ONNX layout, `scale` its float32 scales
    in plan layout (`[out]` or `[out, in / block_size]`)."""
    perm = (1, 0) if ref.transposed else tuple(range(ints.ndim))  # ONNX axis i holds the PyTorch dimension perm[i]
    if perm.index(0) != ref.weight_axis:
        raise DenoqError(f"layer {layer}: weight_axis {ref.weight_axis} contradicts transposed={ref.transposed} in "
                         "the layer map; re-export the model (the map is wrong)")
    qtype = ir.DataType.INT4 if lp.weight_bits <= 4 and op_type != "Conv" else ir.DataType.INT8
    block = lp.block_size
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
        return _Weight(ints=ints.astype(qtype.numpy()), scale=scale, axis=ref.weight_axis, block_size=0, qtype=qtype)
    in_channels = lp.weight_int.shape[1]
    if in_channels % block:
        raise DenoqError(f"layer {layer}: block size {block} does not divide its {in_channels} input channels; "
                         f"set weights.group_size to a divisor of {in_channels} (or 0 for per-channel weights)")
    # [out, in / B] → [out, in / B, kh, kw] (repeated over the kernel) → ONNX layout, as the integers
    full = np.broadcast_to(scale.reshape(*scale.shape, *([1] * (ints.ndim - 2))),
                           (*scale.shape, *lp.weight_int.shape[2:]))
    return _Weight(ints=ints.astype(qtype.numpy()), scale=np.ascontiguousarray(np.transpose(full, perm)),
                   axis=perm.index(1), block_size=block, qtype=qtype)


def _act(layer: str, role: str, q: ActQuant | None, target: str, ftype: ir.DataType,
         resolved: float | None = None) -> _Act | None:
    """The constant quantizer of `q`: its one scale, or `resolved` (the selector's s0 / s_out0) when given."""
    if q is None:
        return None
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
    return _Act(scale=scale, zero_point=int(q.zero_point), signed=bool(q.signed), bits=int(q.bits))


# -- rewrites ----------------------------------------------------------------------------------------------

def _initializer(g: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    v = ir.val(name, const_value=ir.tensor(array, name=name))
    g.register_initializer(v)
    return v


def _qdq(g: ir.Graph, x: ir.Value, a: _Act, module: str, role: str, ftype: ir.DataType) -> list[ir.Node]:
    """`DQ(Q(x))`, or `DQ(Clip(Q(x)))` where `a.clip` is set: nodes `<module>/<role>/QuantizeLinear` …, values
    `<module>.<role>_quantized` / `_clipped` / `_dequantized`, initializers `<module>.<role>_scale` / `_zero_point`
    / `_qmin` / `_qmax`. The first node reads `x`, the last one gives the dequantized value."""
    prefix = f"{module}.{role}"
    scale = _initializer(g, f"{prefix}_scale", np.asarray(a.scale, dtype=ftype.numpy()))
    zp = _initializer(g, f"{prefix}_zero_point", np.asarray(a.zero_point, dtype=a.qtype.numpy()))
    nodes = [ir.node("QuantizeLinear", [x, scale, zp], name=f"{module}/{role}/QuantizeLinear",
                     outputs=[ir.val(f"{prefix}_quantized", a.qtype, x.shape)])]
    if a.clip is not None:
        qmin = _initializer(g, f"{prefix}_qmin", np.asarray(a.clip[0], dtype=a.qtype.numpy()))
        qmax = _initializer(g, f"{prefix}_qmax", np.asarray(a.clip[1], dtype=a.qtype.numpy()))
        nodes.append(ir.node("Clip", [nodes[0].outputs[0], qmin, qmax], name=f"{module}/{role}/Clip",
                             outputs=[ir.val(f"{prefix}_clipped", a.qtype, x.shape)]))
    nodes.append(ir.node("DequantizeLinear", [nodes[-1].outputs[0], scale, zp],
                         name=f"{module}/{role}/DequantizeLinear",
                         outputs=[ir.val(f"{prefix}_dequantized", ftype, x.shape)]))
    return nodes


def _group_qdq(g: ir.Graph, x: ir.Value, gq: GroupQuant, module: str, role: str, rows: bool) -> list[ir.Node]:
    """The dynamic IGQ-ViT quantizer of `x` (module docstring) as float32 ONNX ops; `rows`: softmax rows [.., L]
    assigned by their maximum (keepdims), else token channels [B, L, C] by their min / max over axis 1. The last
    node gives x̂. Nodes `<module>/<role>_groups/...`, values and initializers `<module>.<role>_groups.*`."""
    pre = f"{module}.{role}_groups"
    nodes: list[ir.Node] = []

    def op(kind: str, inputs: list, **attrs: object) -> ir.Value:
        node = ir.node(kind, inputs, attributes=attrs, name=f"{module}/{role}_groups/{kind}_{len(nodes)}",
                       outputs=[ir.val(f"{pre}.v{len(nodes)}")])
        nodes.append(node)
        return node.outputs[0]

    def const(name: str, array: np.ndarray) -> ir.Value:
        return _initializer(g, f"{pre}.{name}", array)

    f32 = np.float32
    wg = const("widths", gq.width.numpy().astype(f32))
    if rows:  # each softmax row by its maximum
        w = op("ReduceMax", [x, const("axes", np.array([-1], np.int64))], keepdims=1)
    else:  # each (instance, channel) by the width of its range over the tokens
        axes = const("axes", np.array([1], np.int64))
        m, big_m = op("ReduceMin", [x, axes], keepdims=1), op("ReduceMax", [x, axes], keepdims=1)
        w = op("Max", [op("Abs", [m]), op("Abs", [big_m])]) if gq.signed else op("Sub", [big_m, m])
        w = op("Unsqueeze", [w, const("last", np.array([-1], np.int64))])
    idx = op("ArgMin", [op("Max", [op("Div", [w, wg]), op("Div", [wg, w])])], axis=-1, keepdims=int(rows))
    s = op("Gather", [const("scale", gq.scale.numpy().astype(f32)), idx], axis=0)
    z = op("Gather", [const("zero_point", gq.zero_point.numpy().astype(f32)), idx], axis=0)
    qmin, qmax = gq.qrange
    q = op("Clip", [op("Add", [op("Round", [op("Div", [x, s])]), z]), const("qmin", np.array(qmin, f32)),
                    const("qmax", np.array(qmax, f32))])
    op("Mul", [op("Sub", [q, z]), s])
    return nodes


def _log2_qdq(g: ir.Graph, x: ir.Value, bits: int, module: str) -> list[ir.Node]:
    """Probabilities on the log2 grid, `Pow(2, −Clip(Round(−(Log(x) / ln 2)), 0, 2^bits − 1))`, as float32 ops
    (`denoq.calibrators.attention.fake_quant_log2`); the last node gives p̂."""
    pre, nodes = f"{module}.attn_p_log2", []

    def op(kind: str, inputs: list) -> ir.Value:
        node = ir.node(kind, inputs, name=f"{module}/attn_p_log2/{kind}_{len(nodes)}",
                       outputs=[ir.val(f"{pre}.v{len(nodes)}")])
        nodes.append(node)
        return node.outputs[0]

    def const(name: str, value: float) -> ir.Value:
        return _initializer(g, f"{pre}.{name}", np.array(value, np.float32))

    q = op("Neg", [op("Div", [op("Log", [x]), const("ln2", math.log(2.0))])])
    q = op("Clip", [op("Round", [q]), const("qmin", 0.0), const("qmax", 2.0**bits - 1)])
    op("Pow", [const("two", 2.0), op("Neg", [q])])
    return nodes


def _quantize_weight(g: ir.Graph, layer: _Layer) -> None:
    node, ref, w = layer.node, layer.ref, layer.weight
    fp = node.inputs[1]
    assert fp is not None
    del g.initializers[fp.name]
    prefix = ref.module + ".weight"
    wq = _initializer(g, f"{prefix}_quantized", w.ints)
    ws = _initializer(g, f"{prefix}_scale", w.scale.astype(layer.ftype.numpy()))
    wz = _initializer(g, f"{prefix}_zero_point", np.zeros(w.scale.shape, dtype=w.qtype.numpy()))
    attributes = {"axis": w.axis} if w.block_size == 0 else {"axis": w.axis, "block_size": w.block_size}
    dq = ir.node("DequantizeLinear", [wq, ws, wz], attributes=attributes,
                 name=f"{ref.module}/weight/DequantizeLinear",
                 outputs=[ir.val(f"{prefix}_dequantized", layer.ftype, ir.Shape(layer.weight_int.shape))])
    node.replace_input_with(1, dq.outputs[0])
    fp.name = f"{prefix}_float"  # detached from the graph; frees the name for the DQ output
    dq.outputs[0].name = ref.weight
    g.insert_before(node, dq)


def _layer_output(layer: _Layer) -> ir.Value:
    """The module's output: the node's, or for MatMul the output of the constant-bias Add that follows it."""
    y = layer.node.outputs[0]
    if layer.node.op_type != "MatMul" or y.is_graph_output():
        return y
    uses = list(y.uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return y
    add, idx = uses[0].node, uses[0].idx
    bias = add.inputs[1 - idx]
    out_channels = layer.weight_int.shape[layer.ref.weight_axis]
    if bias is not None and bias.const_value is not None and tuple(bias.const_value.shape) == (out_channels,):
        return add.outputs[0]
    return y


def _quantize_output(g: ir.Graph, layer: _Layer) -> None:
    a = layer.output
    assert a is not None
    # a selector layer quantizes the node's own (bias-free, ·r_t) output, before its Div: ORT fuses node → Q
    y = layer.node.outputs[0] if layer.ratio is not None else _layer_output(layer)
    nodes = _qdq(g, y, a, layer.ref.module, "output", layer.ftype)
    redirect(g, y, nodes[-1].outputs[0], skip=nodes[0], old_name=f"{layer.ref.module}.output_float")
    producer = y.producer()
    assert producer is not None
    g.insert_after(producer, nodes)


def _same_qdq(x: ir.Value, a: _Act) -> bool:
    """True when `x` is `DQ(Q(·))`, or `DQ(Clip(Q(·)))` where `a.clip` is set, with exactly the quantizer `a`
    (scale, zero point, integer type and range)."""
    dq = x.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0] is None:
        return False
    q = dq.inputs[0].producer()
    if a.clip is not None:
        if q is None or q.op_type != "Clip" or q.inputs[0] is None or _clip_bounds(q) != a.clip:
            return False
        q = q.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear":
        return False
    for node in (q, dq):
        if len(node.inputs) < 3 or any(v is None or v.const_value is None for v in node.inputs[1:3]):
            return False
        s, z = (v.const_value.numpy() for v in node.inputs[1:3])  # type: ignore[union-attr]
        if s.size != 1 or z.size != 1 or ir.DataType.from_numpy(z.dtype) != a.qtype:
            return False
        if float(s.reshape(())) != a.scale or int(z.reshape(())) != a.zero_point:
            return False
    return True


def _clip_bounds(clip: ir.Node) -> tuple[int, ...] | None:
    """The constant scalar (min, max) of an integer `Clip`; None when they are not both constants."""
    bounds = clip.inputs[1:3]
    if len(bounds) != 2 or any(v is None or v.const_value is None or v.const_value.size != 1 for v in bounds):
        return None
    return tuple(int(v.const_value.numpy().reshape(())) for v in bounds)  # type: ignore[union-attr]


def _quantize_input(g: ir.Graph, layer: _Layer, shared: dict[tuple, ir.Value],
                    ratios: selector.RatioCache) -> None:
    a = layer.input
    assert a is not None
    x = layer.node.inputs[0]
    assert x is not None  # checked in _bind
    factors = layer.plan.input_factors
    if layer.ratio is None and factors is None and _same_qdq(x, a):
        return
    key = (id(x), a) if layer.ratio is None else (id(x), a, layer.ratio.tobytes())
    if factors is not None:
        key = (*key, factors.numpy().tobytes())
    if key not in shared:
        module = layer.ref.module
        mul = None
        if layer.ratio is not None:  # x → Mul(R) → Q(s0) → DQ(s0)
            r_b = ratios.broadcast(layer.ratio, selector.layer_rank(layer.node, module), module, layer.node)
            mul = ir.node("Mul", [x, r_b], name=f"{module}/timestep_ratio/Mul",
                          outputs=[ir.val(f"{module}.input_scaled", layer.ftype, x.shape)])
            x = mul.outputs[0]
        elif factors is not None:  # static groups: x → Mul(factors over the channel axis) → Q → DQ
            f = _initializer(g, f"{module}.input_factors", factors.numpy().astype(layer.ftype.numpy()))
            mul = ir.node("Mul", [x, f], name=f"{module}/input_factors/Mul",
                          outputs=[ir.val(f"{module}.input_scaled", layer.ftype, x.shape)])
            x = mul.outputs[0]
        nodes = _qdq(g, x, a, module, "input", layer.ftype)
        g.insert_before(layer.node, nodes if mul is None else [mul, *nodes])
        shared[key] = nodes[-1].outputs[0]
    layer.node.replace_input_with(0, shared[key])
