"""SVDQuant's low-rank branch in the graph (Li et al., "SVDQuant: Absorbing Outliers by Low-Rank Components for
4-Bit Diffusion Models", ICLR 2025, eq. 5: XW ≈ X̂·L1L2 + Q(X̂)·Q(R); `denoq.calibrators.svdquant`).

For a planned layer with `lowrank_down` L2 and `lowrank_up` L1, the branch reads the layer's float input as the
quantizer does (after the smoothing Mul, before its Q/DQ) and is added to the module's output (for a MatMul, after
its bias Add):

- MatMul / Gemm: `MatMul(x, L2ᵀ [in, r]) → MatMul(·, L1ᵀ [r, out])`;
- Conv: `Conv(x, L2 [r, in, kh, kw])` with the layer's strides, pads and dilations, then a 1×1 `Conv(·, L1)`.

The branch weights are float16 numbers (exact in the float32 graph; the TensorRT graph computes the branch in
float16), named `<module>.lowrank_down` / `<module>.lowrank_up`; nodes `<module>/lowrank/…`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PostconditionError

from denoq.errors import DenoqError
from denoq.passes.activations import layer_output
from denoq.passes.binding import Binding, Layer
from denoq.passes.qdq_base import PlanPass, initializer, not_yet_applied, produced_by
from denoq.passes.rewire import redirect

_CONV_ATTRIBUTES = ("strides", "pads", "dilations", "auto_pad")


class AddLowRankBranches(PlanPass):
    """Pass: the low-rank branch of every planned layer that has one (module docstring).

    Invariant established: the module output y of each such layer is read only by `<module>/lowrank/Add`, whose
    other input is the branch on the layer's current input 0, and every former reader of y (graph output included,
    under its name) reads the sum. Requires no branch yet, and runs before `QuantizeInputs` (the branch reads the
    float input).
    """

    name = "lowrank_branches"

    def check(self, b: Binding, g: ir.Graph) -> None:
        not_yet_applied(g, (f"{layer.module}.lowrank_up" for layer in _lowrank(b)), "low-rank branches")

    def rewrite(self, b: Binding, g: ir.Graph) -> bool:
        for layer in _lowrank(b):
            _add_branch(g, layer)
        return bool(_lowrank(b))

    def ensures(self, model: ir.Model) -> None:
        nodes = {n.name: n for n in model.graph}
        for layer in _lowrank(self.bound(model)):
            add = nodes.get(f"{layer.module}/lowrank/Add")
            op = "Conv" if layer.node.op_type == "Conv" else "MatMul"
            if add is None or not produced_by(add.inputs[1], op, f"{layer.module}/lowrank/"):
                raise PostconditionError(f"layer {layer.module}: its output is not summed with its low-rank branch")


def _lowrank(b: Binding) -> list[Layer]:
    return [layer for layer in b.layers if layer.plan.rank]


def _add_branch(g: ir.Graph, layer: Layer) -> None:
    lp, node, ftype = layer.plan, layer.node, layer.ftype
    x = node.inputs[0]
    assert x is not None and lp.lowrank_down is not None and lp.lowrank_up is not None
    down = lp.lowrank_down.numpy().astype(ftype.numpy())
    up = lp.lowrank_up.numpy().astype(ftype.numpy())
    name, prefix = f"{layer.module}/lowrank", f"{layer.module}.lowrank"
    y = layer_output(layer)
    if node.op_type == "Conv":
        if node.attributes.get_int("group", 1) != 1:
            raise DenoqError(f"layer {layer.module}: a grouped convolution takes no low-rank branch; recalibrate "
                             "(denoq's SVDQuant leaves grouped convolutions without one)")
        attributes = {k: node.attributes[k].value for k in _CONV_ATTRIBUTES if k in node.attributes}
        first = ir.node("Conv", [x, initializer(g, f"{prefix}_down", down)], attributes=attributes,
                        name=f"{name}/Conv_down", outputs=[ir.val(f"{prefix}_hidden", ftype)])
        second = ir.node("Conv", [first.outputs[0], initializer(g, f"{prefix}_up", up[:, :, None, None])],
                         name=f"{name}/Conv", outputs=[ir.val(f"{prefix}_branch", ftype)])
    else:
        first = ir.node("MatMul", [x, initializer(g, f"{prefix}_down", np.ascontiguousarray(down.T))],
                        name=f"{name}/MatMul_down", outputs=[ir.val(f"{prefix}_hidden", ftype)])
        second = ir.node("MatMul", [first.outputs[0], initializer(g, f"{prefix}_up", np.ascontiguousarray(up.T))],
                         name=f"{name}/MatMul", outputs=[ir.val(f"{prefix}_branch", ftype)])
    add = ir.node("Add", [y, second.outputs[0]], name=f"{name}/Add",
                  outputs=[ir.val(f"{prefix}_sum", ftype, y.shape)])
    redirect(g, y, add.outputs[0], skip=add, old_name=f"{layer.module}.output_float")
    producer = y.producer()
    assert producer is not None
    g.insert_after(producer, [first, second, add])
