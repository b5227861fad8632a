"""What the Q/DQ passes share: `PlanPass` (a pass over the plan's bound layers) and the node builders.

Naming (every Q/DQ pass): nodes `<module>/<role>/QuantizeLinear` …, values `<module>.<role>_quantized` /
`_clipped` / `_dequantized`, initializers `<module>.<role>_scale` / `_zero_point` / `_qmin` / `_qmax`, with role
`weight`, `input`, `output` or `attn_q` / `attn_k` / `attn_p` / `attn_v`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult, PreconditionError

from denoq.passes.binding import Act, Binding, PlanBinding
from denoq.passes.infra import InPlace
from denoq.plan import QuantPlan


class PlanPass(InPlace):
    """A Q/DQ pass: rewrites the layers of one QuantPlan, bound to the graph by a `PlanBinding` (given, so that the
    passes of one pipeline share it, or made from the plan). `requires` binds (a plan that does not fit the
    graph is a DenoqError) and then checks the pass's own precondition (`check`); `call` runs `rewrite` and
    sorts the graph topologically."""

    def __init__(self, plan: QuantPlan | PlanBinding) -> None:
        self.binding = plan if isinstance(plan, PlanBinding) else PlanBinding(plan)

    def bound(self, model: ir.Model) -> Binding:
        return self.binding(model)

    def requires(self, model: ir.Model) -> None:
        self.check(self.bound(model), model.graph)

    def check(self, b: Binding, g: ir.Graph) -> None:
        """The pass's precondition on the bound graph (PreconditionError); none by default."""

    def call(self, model: ir.Model) -> PassResult:
        modified = self.rewrite(self.bound(model), model.graph)
        model.graph.sort()
        return PassResult(model, modified)

    def rewrite(self, b: Binding, g: ir.Graph) -> bool:
        """Rewrite `g`; True when anything changed."""
        raise NotImplementedError


def not_yet_applied(g: ir.Graph, names: Iterable[str], what: str) -> None:
    """PreconditionError when one of the initializers the pass creates (`names`) is already in the graph."""
    taken = sorted(set(names) & set(g.initializers))
    if taken:
        raise PreconditionError(f"the graph already has {what} ({taken[0]!r}); run each Q/DQ pass once, on the FP "
                                "graph from export")


def initializer(g: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    v = ir.val(name, const_value=ir.tensor(array, name=name))
    g.register_initializer(v)
    return v


def qdq(g: ir.Graph, x: ir.Value, a: Act, module: str, role: str, ftype: ir.DataType) -> list[ir.Node]:
    """`DQ(Q(x))`, or `DQ(Clip(Q(x)))` where `a.clip` is set, named as the module docstring says. The first node
    reads `x`, the last one gives the dequantized value."""
    prefix = f"{module}.{role}"
    scale = initializer(g, f"{prefix}_scale", np.asarray(a.scale, dtype=ftype.numpy()))
    zp = initializer(g, f"{prefix}_zero_point", np.asarray(a.zero_point, dtype=a.qtype.numpy()))
    nodes = [ir.node("QuantizeLinear", [x, scale, zp], name=f"{module}/{role}/QuantizeLinear",
                     outputs=[ir.val(f"{prefix}_quantized", a.qtype, x.shape)])]
    if a.clip is not None:
        qmin = initializer(g, f"{prefix}_qmin", np.asarray(a.clip[0], dtype=a.qtype.numpy()))
        qmax = initializer(g, f"{prefix}_qmax", np.asarray(a.clip[1], dtype=a.qtype.numpy()))
        nodes.append(ir.node("Clip", [nodes[0].outputs[0], qmin, qmax], name=f"{module}/{role}/Clip",
                             outputs=[ir.val(f"{prefix}_clipped", a.qtype, x.shape)]))
    nodes.append(ir.node("DequantizeLinear", [nodes[-1].outputs[0], scale, zp],
                         name=f"{module}/{role}/DequantizeLinear",
                         outputs=[ir.val(f"{prefix}_dequantized", ftype, x.shape)]))
    return nodes


def same_qdq(x: ir.Value | None, a: Act) -> bool:
    """True when `x` is `DQ(Q(·))`, or `DQ(Clip(Q(·)))` where `a.clip` is set, with exactly the quantizer `a`
    (scale, zero point, integer type and range)."""
    dq = None if x is None else x.producer()
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


def produced_by(x: ir.Value | None, op_type: str, prefix: str) -> bool:
    """True when `x` is the output of an `op_type` node whose name starts with `prefix`."""
    node = None if x is None else x.producer()
    return node is not None and node.op_type == op_type and node.name is not None and node.name.startswith(prefix)
