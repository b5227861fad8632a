"""IGQ-ViT groups in the graph (Moon et al., "Instance-Aware Group Quantization for Vision Transformers", CVPR 2024,
arXiv 2404.00928, §3.2; `denoq.calibrators.igq`).

Dynamic groups (`LayerPlan.input_groups`, `AttentionPlan.p_groups`): the assignment as ONNX ops ORT runs. For a
token input x [B, L, C]: m, M = ReduceMin / ReduceMax over the tokens, the width w = M − m (symmetric:
Max(|m|, |M|)), g = ArgMin(Max(w / w_g, w_g / w)) per (instance, channel) against the G group widths (the paper's
assignment, on a log scale), s, z = Gather(scales, g), Gather(zero points, g), then the quantizer in float ops,
x̂ = (Clip(Round(x / s) + z, qmin, qmax) − z) · s (QuantizeLinear takes no per-instance scale). Softmax rows are
assigned by their maximum. These layers then have no activation Q/DQ: TensorRT would run them with float
activations (the trt-rules check, which reads Q/DQ placement, does not flag that).

Static groups (`LayerPlan.input_factors`, TensorRT's variant; also SVDQuant's smoothing) are a constant
`Mul(x, factors)` over the channel axis (the last one, axis 1 of a Conv input: factors `[C, 1, 1]`) before the
layer's one input Q/DQ (`QuantizeInputs`); the inverse factors are already in the plan's weights.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PostconditionError

from denoq.passes.binding import Binding, Layer
from denoq.passes.qdq_base import PlanPass, initializer, not_yet_applied, produced_by
from denoq.plan import GroupQuant


class QuantizeInputGroups(PlanPass):
    """Pass: IGQ-ViT's groups on the inputs of the planned layers that have them (module docstring).

    Invariant established: a layer with dynamic groups reads x̂ = the last node (`Mul`) of its
    `<module>/input_groups/…` quantizer on its former input; a layer with static groups (and an input quantizer)
    reads `Mul(x, <module>.input_factors)` (`<module>/input_factors/Mul`, shared by layers reading one x with
    one quantizer and one factor vector), to be quantized by `QuantizeInputs`. Requires no groups yet.
    """

    name = "igq_groups"

    def check(self, b: Binding, g: ir.Graph) -> None:
        not_yet_applied(g, [f"{layer.module}.input_groups.widths" for layer in _dynamic(b)]
                        + [f"{layer.module}.input_factors" for layer in _static(b)], "IGQ-ViT groups")

    def rewrite(self, b: Binding, g: ir.Graph) -> bool:
        for layer in _dynamic(b):
            x = layer.node.inputs[0]
            assert x is not None
            nodes = group_qdq(g, x, layer.plan.input_groups, layer.module, "input", rows=False)  # type: ignore[arg-type]
            g.insert_before(layer.node, nodes)
            layer.node.replace_input_with(0, nodes[-1].outputs[0])
        scaled: dict[tuple, ir.Value] = {}
        for layer in _static(b):
            x, factors = layer.node.inputs[0], layer.plan.input_factors
            assert x is not None and factors is not None
            key = (id(x), layer.input, factors.numpy().tobytes())
            if key not in scaled:
                f = factors.numpy().astype(layer.ftype.numpy())
                f = initializer(g, f"{layer.module}.input_factors",
                                f.reshape(-1, 1, 1) if layer.node.op_type == "Conv" else f)
                mul = ir.node("Mul", [x, f], name=f"{layer.module}/input_factors/Mul",
                              outputs=[ir.val(f"{layer.module}.input_scaled", layer.ftype, x.shape)])
                g.insert_before(layer.node, [mul])
                scaled[key] = mul.outputs[0]
            layer.node.replace_input_with(0, scaled[key])
        return bool(_dynamic(b) or _static(b))

    def ensures(self, model: ir.Model) -> None:
        b = self.bound(model)
        for layer in _dynamic(b):
            if not produced_by(layer.node.inputs[0], "Mul", f"{layer.module}/input_groups/"):
                raise PostconditionError(f"layer {layer.module} does not read its IGQ-ViT group quantizer")
        for layer in _static(b):
            x = layer.node.inputs[0]
            mul = None if x is None else x.producer()
            if mul is None or mul.op_type != "Mul" or not (mul.name or "").endswith("/input_factors/Mul"):
                raise PostconditionError(f"layer {layer.module} does not read x·factors of its static groups")


def _dynamic(b: Binding) -> list[Layer]:
    return [layer for layer in b.layers if layer.plan.input_groups is not None]


def _static(b: Binding) -> list[Layer]:
    """Layers with static group factors before their input quantizer (a selector layer has none: `bind`)."""
    return [layer for layer in b.layers if layer.plan.input_groups is None and layer.input is not None
            and layer.plan.input_factors is not None]


def group_qdq(g: ir.Graph, x: ir.Value, gq: GroupQuant, module: str, role: str, rows: bool) -> list[ir.Node]:
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
        return initializer(g, f"{pre}.{name}", array)

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
