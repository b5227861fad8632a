"""Timestep selectors: timestep-grouped activation scales in a graph whose Q/DQ scales are constants.

docs/architecture.md (Contracts: Timestep selector) after ADP-DM (Wang et al., "Towards Accurate Post-training
Quantization for Diffusion Models", CVPR 2024, arXiv 2305.18723): a layer whose input scale table `s_t` (length T,
piecewise constant over the layer's timestep groups) is not constant keeps ONE constant Q/DQ scale `s0`, as TensorRT
needs, and moves the timestep dependence into pointwise multiplies with `r_t = s0 / s_t`:

    x → Mul(R) → Q(s0, z) → DQ(s0, z) → Conv/Gemm/MatMul without bias → Div(R) → Add(bias)
    R = Gather(r, timestep)            (r: [T,1,1,1] for Conv, [T,1] for Gemm, [T,1,1] for MatMul on [B,L,C])

`r` is a float32 initializer of T entries, shaped `[T, 1, …]` so that gathering with the rows of the graph's input
`timestep` `[B]` (`timestep_rows`: the nearest training timestep of a float timestep) gives R already
broadcastable (`[B, 1, …]`, one node per table and rank); each sample of a batch reads its own group. Since
`DQ(Q(x·r_t; s0, z)) / r_t = s_t·(clamp(round(x / s_t) + z) − z)` up to float rounding, the layer sees exactly the
plan's group-t quantizer (range and saturation included) — *because the zero point z is the same for every
group*: the plan guarantees it (one zero point per quantizer), the multiply only moves the scale.
That holds for the uint8 asymmetric (`ort-cpu`) quantizers as well as for int8 symmetric (`trt`) ones.

**Choice of s0 = min_t s_t** (the finest group's scale), so every `r_t = s0 / s_t ≤ 1`: the multiply never
enlarges an activation (no overflow when the engine runs the float parts in FP16, and the value reaching Q stays
within the range calibration saw), and the finest-grid group runs with `r = 1`, i.e. exactly the constant-scale
graph. (`s0 = max_t s_t` would give `r_t ≥ 1` and multiply activations up by the groups' scale ratio.)

**Output quantizer (`ort-cpu`).** ORT fuses `DQ → Conv/Gemm/MatMul → Q` into an integer kernel only when the
layer's Q reads the layer node's output directly, so the output Q/DQ sits between the node and the selector's Div:

    … → Conv (no bias) → Q(s_out0, z_out) → DQ(s_out0, z_out) → Div(R) → Add(bias)

The value the graph quantizes is `u = conv(x̂, w)`, the layer's *bias-free* output times r_t (`u = r_t·(y − b)`).
Quantizing `u` with the constant `s_out0` is quantizing `y − b` with the effective scale `s_out0 / r_t`. So for a
selector layer the plan's output table `s_out[t]` is read as the scale of the bias-free output `y − b` at timestep t
(zero point `z_out` applies to it too), and the graph uses `s_out0 = max_t(s_out[t]·r_t)` (float32): exact, i.e.
effective scale = `s_out[t]` at every t, when the calibrator writes tables with `s_out[t]·r_t` constant (output
scale proportional to the input scale); otherwise the effective scale `s_out0 / r_t ≥ s_out[t]` never clips more
than the plan. A layer without an input selector (constant or no input table) has `r ≡ 1`: its output scale is the
constant `max_t s_out[t]` on `y` itself (bias included, as for every constant-scale layer).

The PyTorch simulation (`denoq.calibrators.simulate`) computes the same tables with the same float32 operations and
follows the same op order. Constant tables (one group) produce no selector nodes: the graph is byte for byte the
constant-scale `InsertQDQ` graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PostconditionError, PreconditionError

from denoq.errors import DenoqError
from denoq.passes.binding import Binding
from denoq.passes.qdq_base import PlanPass
from denoq.passes.rewire import redirect

TIMESTEP_INPUT = "timestep"


# -- graph -------------------------------------------------------------------------------------------------

def timestep_input(g: ir.Graph, layer: str) -> ir.Value:
    """The graph's `timestep` input; DenoqError when there is none."""
    for v in g.inputs:
        if v.name == TIMESTEP_INPUT:
            return v
    raise DenoqError(f"layer {layer}: its scale varies with the timestep but the graph has no {TIMESTEP_INPUT!r} "
                     "input; export the model with its timestep input (or set activations.timestep_groups=1)")


def _index_chain(cast: ir.Node, t: ir.Value) -> bool:
    clip = cast.inputs[0].producer() if cast.op_type == "Cast" and cast.inputs[0] is not None else None
    rnd = clip.inputs[0].producer() if clip is not None and clip.op_type == "Clip" else None
    return rnd is not None and rnd.op_type == "Round" and rnd.inputs[0] is t


def is_timestep_rows(v: ir.Value | None, t: ir.Value | None) -> bool:
    """Whether `v` is the table-row index of the timestep input `t` (`timestep_rows`)."""
    if v is None or t is None:
        return False
    return v is t or (v.producer() is not None and _index_chain(v.producer(), t))


def timestep_rows(g: ir.Graph, num_train_timesteps: int, layer: str) -> ir.Value:
    """The rows of the per-timestep tables for the graph's `timestep` input: the input itself when it is integral;
    for a float timestep (the scheduler's own values) the nearest training timestep,
    `Cast(Clip(Round(timestep), 0, T − 1), int64)` (round half to even: `denoq.sampling.cond.timestep_index`),
    built once and shared by every Gather. Its values carry no shape: a later pass (classifier-free guidance) may
    feed the chain a doubled batch."""
    t = timestep_input(g, layer)
    if t.dtype in (ir.DataType.INT64, ir.DataType.INT32):
        return t
    if t.dtype != ir.DataType.FLOAT:
        raise DenoqError(f"layer {layer}: graph input {TIMESTEP_INPUT!r} is {t.dtype}; denoq gathers its "
                         "per-timestep tables with an integer or float32 timestep, re-export the model")
    for node in g:
        if _index_chain(node, t):
            return node.outputs[0]
    taken = {v.name for v in g.inputs} | set(g.initializers) | {o.name for n in g for o in n.outputs}
    stem = next(f"timestep.rows{i or ''}" for i in range(len(taken) + 1) if f"timestep.rows{i or ''}" not in taken)
    lo, hi = (ir.val(f"{stem}.{k}", const_value=ir.tensor(np.array(v, np.float32), name=f"{stem}.{k}"))
              for k, v in (("min", 0.0), ("max", num_train_timesteps - 1.0)))
    g.register_initializer(lo)
    g.register_initializer(hi)
    rnd = ir.node("Round", [t], name=f"{stem}/Round", outputs=[ir.val(f"{stem}.round", ir.DataType.FLOAT)])
    clip = ir.node("Clip", [rnd.outputs[0], lo, hi], name=f"{stem}/Clip",
                   outputs=[ir.val(f"{stem}.clip", ir.DataType.FLOAT)])
    cast = ir.node("Cast", [clip.outputs[0]], attributes={"to": ir.DataType.INT64}, name=f"{stem}/Cast",
                   outputs=[ir.val(stem, ir.DataType.INT64)])
    g.insert_before(next(iter(g)), [rnd, clip, cast])
    return cast.outputs[0]


class RatioCache:
    """Builds `Gather(r, timestep)` once per (table, rank), `r` shaped `[T, 1, …]`, and shares it between layers."""

    def __init__(self, g: ir.Graph) -> None:
        self.g = g
        self.gathered: dict[tuple[bytes, int], ir.Value] = {}

    def broadcast(self, ratio: np.ndarray, rank: int, module: str, before: ir.Node) -> ir.Value:
        """`R` of rank `rank` (`[B, 1, …]`) for the ratio table `ratio` `[T]`, its node inserted before `before`."""
        key = (ratio.tobytes(), rank)
        if key in self.gathered:
            return self.gathered[key]
        name = f"{module}.timestep_ratio{rank}"
        shaped = np.ascontiguousarray(ratio.reshape(-1, *([1] * (rank - 1))))
        table = ir.val(name, const_value=ir.tensor(shaped, name=name))
        self.g.register_initializer(table)
        t = timestep_rows(self.g, ratio.shape[0], module)
        gather = ir.node("Gather", [table, t], attributes={"axis": 0}, name=f"{module}/timestep_ratio/Gather",
                         outputs=[ir.val(f"{module}.timestep_ratio_b{rank}", ir.DataType.FLOAT)])
        self.g.insert_before(before, [gather])
        self.gathered[key] = gather.outputs[0]
        return gather.outputs[0]


def layer_rank(node: ir.Node, layer: str) -> int:
    """Rank of the layer's activation: 4 for Conv (NCHW), 2 for Gemm, the known input rank for MatMul."""
    if node.op_type == "Conv":
        rank = 4
    elif node.op_type == "Gemm":
        rank = 2
    else:
        x = node.inputs[0]
        if x is None or x.shape is None:
            raise DenoqError(f"layer {layer}: the rank of MatMul input is unknown, the timestep selector needs it "
                             "to broadcast its [B] ratios; export with shape information (dynamo export keeps it)")
        rank = len(x.shape)
    x = node.inputs[0]
    if x is not None and x.shape is not None and len(x.shape) != rank:
        raise DenoqError(f"layer {layer}: {node.op_type} input has rank {len(x.shape)}, expected {rank}; the timestep "
                         "selector supports Conv2d on NCHW, Gemm on [B, C] and MatMul on [B, …, C] only")
    return rank


def insert_division(g: ir.Graph, node: ir.Node, ratio_b: ir.Value, module: str) -> None:
    """`node → Div(R) [→ Add(bias)]`: strips a Conv/Gemm bias, divides by R, adds the bias back; every reader
    of the node's output (graph output included, under its name) now reads the result."""
    y = node.outputs[0]
    bias: ir.Value | None = None
    if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
        b = node.inputs[2]
        node.resize_inputs(2)
        arr = b.const_value.numpy()  # type: ignore[union-attr]
        if node.op_type == "Conv":  # [C] → [C, 1, 1] to broadcast over NCHW
            name = f"{module}.bias_broadcast"
            bias = ir.val(name, const_value=ir.tensor(np.ascontiguousarray(arr.reshape(-1, 1, 1)), name=name))
            g.register_initializer(bias)
            if not list(b.uses()) and not b.is_graph_output():
                del g.initializers[b.name]
        else:
            bias = b
    div = ir.node("Div", [y, ratio_b], name=f"{module}/timestep_ratio/Div",
                  outputs=[ir.val(f"{module}.output_rescaled", y.type.dtype if y.type else ir.DataType.FLOAT)])
    chain = [div]
    if bias is not None:
        chain.append(ir.node("Add", [div.outputs[0], bias], name=f"{module}/bias/Add",
                             outputs=[ir.val(f"{module}.output_biased", ir.DataType.FLOAT)]))
    out = chain[-1].outputs[0]
    out.shape = y.shape
    redirect(g, y, out, skip=div, old_name=f"{module}.output_unbiased")
    g.insert_after(node, chain)


# -- the pass ----------------------------------------------------------------------------------------------

def ratio_div(node: ir.Node, module: str) -> ir.Node | None:
    """The selector's `Div(R)` after `node` (named `<module>/timestep_ratio/Div`), None when there is none."""
    y = node.outputs[0]
    return next((u.node for u in y.uses() if u.node.op_type == "Div"
                 and u.node.name == f"{module}/timestep_ratio/Div"), None)


class InsertTimestepSelectors(PlanPass):
    """Pass: the timestep selector (module docstring; ADP-DM, arXiv 2305.18723) around every planned layer whose
    input scale table varies with the timestep.

    Invariant established: such a layer reads `Mul(x, R)` (node `<module>/timestep_ratio/Mul`, value
    `<module>.input_scaled`), has no bias input, and its output is read only by `Div(·, R)`
    (`<module>/timestep_ratio/Div`, then `Add(bias)`), with one and the same `R = Gather(r, timestep)` (r_t =
    s0 / s_t, shaped `[T, 1, …]`) on both sides; every former reader of the output (graph output included, under
    its name) reads the Div / Add. The input and output Q/DQ (`QuantizeInputs`, `QuantizeOutputs`, which run after
    this pass) go between the Mul and the layer, and between the layer and the Div. Layers with constant tables
    get no selector nodes (a plan with one group gives the constant-scale graph byte for byte). Requires the
    graph's int64 `timestep` input and no selector yet.
    """

    name = "timestep_selectors"

    def check(self, b: Binding, g: ir.Graph) -> None:
        for layer in b.layers:
            if layer.ratio is not None:
                timestep_input(g, layer.module)  # DenoqError (with its fix) without one
                layer_rank(layer.node, layer.module)
                if ratio_div(layer.node, layer.module) is not None:
                    raise PreconditionError(f"layer {layer.module} already has its timestep selector; run "
                                            f"{self.name} once")

    def rewrite(self, b: Binding, g: ir.Graph) -> bool:
        ratios = RatioCache(g)
        selected = [layer for layer in b.layers if layer.ratio is not None]
        for layer in selected:  # node → Div(R) → Add(bias)
            rank = layer_rank(layer.node, layer.module)
            insert_division(g, layer.node, ratios.broadcast(layer.ratio, rank, layer.module, layer.node),
                            layer.module)
        scaled: dict[tuple, ir.Value] = {}
        for layer in selected:  # x → Mul(R); layers reading one x with one quantizer and table share it
            x = layer.node.inputs[0]
            assert x is not None and layer.ratio is not None  # checked in bind
            key = (id(x), layer.input, layer.ratio.tobytes())
            if key not in scaled:
                r_b = ratios.broadcast(layer.ratio, layer_rank(layer.node, layer.module), layer.module, layer.node)
                mul = ir.node("Mul", [x, r_b], name=f"{layer.module}/timestep_ratio/Mul",
                              outputs=[ir.val(f"{layer.module}.input_scaled", layer.ftype, x.shape)])
                g.insert_before(layer.node, [mul])
                scaled[key] = mul.outputs[0]
            layer.node.replace_input_with(0, scaled[key])
        return bool(selected)

    def ensures(self, model: ir.Model) -> None:
        t = next((v for v in model.graph.inputs if v.name == TIMESTEP_INPUT), None)
        for layer in self.bound(model).layers:
            if layer.ratio is None:
                continue
            x, div = layer.node.inputs[0], ratio_div(layer.node, layer.module)
            mul = None if x is None else x.producer()
            r = None if div is None else div.inputs[1]
            gather = None if r is None else r.producer()
            if (mul is None or mul.op_type != "Mul" or div is None or mul.inputs[1] is not r or gather is None
                    or gather.op_type != "Gather" or not is_timestep_rows(gather.inputs[1], t)
                    or len(list(layer.node.outputs[0].uses())) != 1 or len(layer.node.inputs) > 2):
                raise PostconditionError(f"layer {layer.module} is not x·R → layer (no bias) → ÷R with one "
                                         "R = Gather(r, timestep)")
