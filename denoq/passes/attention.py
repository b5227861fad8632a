"""Attention matmuls in the graph (plans with `attention`, `denoq.calibrators.attention`).

Each planned attention module, found through the `denoq.attention_map` metadata, gets `Q → DQ` on both inputs of
its Q·Kᵀ MatMul (the scaled query `attn_q`, the scaled transposed key `attn_k`) and of its P·V MatMul (the softmax
probabilities `attn_p`, the values `attn_v`), with the plan's constant scales (an attention quantizer has no
timestep selector). The probabilities take one of three forms: that Q/DQ (the uniform grid on [0, max P]), the
log2 grid (`AttentionPlan.p_log2`) as `Pow(2, −Clip(Round(−Log(p) / ln 2)))` in float ops, or IGQ-ViT's token-wise
groups (`AttentionPlan.p_groups`, `denoq.passes.igq.group_qdq`, rows assigned by their maximum).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PostconditionError

from denoq.passes.binding import AttentionInput, Binding
from denoq.passes.igq import group_qdq
from denoq.passes.qdq_base import PlanPass, initializer, not_yet_applied, produced_by, qdq, same_qdq


class QuantizeAttention(PlanPass):
    """Pass: the inputs of the planned attention matmuls quantized (module docstring).

    Invariant established: for every planned attention module, inputs q, k of its Q·Kᵀ MatMul and v of its P·V
    MatMul are `DQ(Q(·))` with the plan's constant quantizers (`<module>/attn_<role>/…`); its probabilities p are
    `DQ(Q(p))`, or on the log2 grid the `Pow` ending `<module>/attn_p_log2/…`, or with IGQ-ViT groups the `Mul`
    ending `<module>/attn_p_groups/…`. Requires no attention quantizer yet.
    """

    name = "qdq_attention"

    def check(self, b: Binding, g: ir.Graph) -> None:
        not_yet_applied(g, (f"{a.module}.attn_{a.role}_scale" for a in b.attention), "attention quantizers")
        not_yet_applied(g, (f"{a.module}.attn_p_log2.ln2" for a in b.attention), "attention quantizers")
        not_yet_applied(g, (f"{a.module}.attn_p_groups.widths" for a in b.attention), "attention quantizers")

    def rewrite(self, b: Binding, g: ir.Graph) -> bool:
        for a in b.attention:
            x = a.node.inputs[a.idx]
            assert x is not None
            ap = b.plan.attention[a.module]
            if a.role == "p" and ap.p_log2:
                nodes = log2_qdq(g, x, ap.quants["p"].bits, a.module)
            elif a.role == "p" and ap.p_groups is not None:
                nodes = group_qdq(g, x, ap.p_groups, a.module, "attn_p", rows=True)
            else:
                assert a.act is not None
                nodes = qdq(g, x, a.act, a.module, f"attn_{a.role}", x.dtype)  # type: ignore[arg-type]
            g.insert_before(a.node, nodes)
            a.node.replace_input_with(a.idx, nodes[-1].outputs[0])
        return bool(b.attention)

    def ensures(self, model: ir.Model) -> None:
        b = self.bound(model)
        for a in b.attention:
            if not _quantized(b, a):
                raise PostconditionError(f"attention {a.module}: input {a.role} of {a.node.name} is not quantized "
                                         "as the plan says")


def _quantized(b: Binding, a: AttentionInput) -> bool:
    x, ap = a.node.inputs[a.idx], b.plan.attention[a.module]
    if a.role == "p" and ap.p_log2:
        return produced_by(x, "Pow", f"{a.module}/attn_p_log2/")
    if a.role == "p" and ap.p_groups is not None:
        return produced_by(x, "Mul", f"{a.module}/attn_p_groups/")
    return a.act is not None and same_qdq(x, a.act)


def log2_qdq(g: ir.Graph, x: ir.Value, bits: int, module: str) -> list[ir.Node]:
    """Probabilities on the log2 grid, `Pow(2, −Clip(Round(−(Log(x) / ln 2)), 0, 2^bits − 1))`, as float32 ops
    (`denoq.calibrators.attention.fake_quant_log2`); the last node gives p̂."""
    pre, nodes = f"{module}.attn_p_log2", []

    def op(kind: str, inputs: list) -> ir.Value:
        node = ir.node(kind, inputs, name=f"{module}/attn_p_log2/{kind}_{len(nodes)}",
                       outputs=[ir.val(f"{pre}.v{len(nodes)}")])
        nodes.append(node)
        return node.outputs[0]

    def const(name: str, value: float) -> ir.Value:
        return initializer(g, f"{pre}.{name}", np.array(value, np.float32))

    q = op("Neg", [op("Div", [op("Log", [x]), const("ln2", math.log(2.0))])])
    q = op("Clip", [op("Round", [q]), const("qmin", 0.0), const("qmax", 2.0**bits - 1)])
    op("Pow", [const("two", 2.0), op("Neg", [q])])
    return nodes
