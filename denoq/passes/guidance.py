"""The guided graph: classifier-free guidance inside the graph, one doubled batch per call (docs/architecture.md,
Correction head: "for a guided graph, after the guidance combination").

Classifier-free guidance (Ho & Salimans 2022, eq. 6) combines the model's predictions with the null and the
requested label,

    ε̃(x, t, c) = ε(x, t, ∅) + s · (ε(x, t, c) − ε(x, t, ∅)),

and deployments run both in one engine call on the doubled batch. PTQD measures its statistics on ε̃, so its head
belongs after the combination: `GuideClassFree` first, `AppendPtqdHead` after it (it reads the new `timestep` [B]
and `out_sample` [B]). The op order is `denoq.sampling.guidance.classifier_free`'s (null half first; Sub, Mul, Add),
so the guided graph and the plain graph driven by that function compute the same float32 operations. A
learned-variance output (ε and Σ on the channel axis) is guided on its ε channels and keeps the conditional half's
Σ, as that function does.

No torch here (passes are ONNX only).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult, PostconditionError, PreconditionError

from denoq.passes.infra import InPlace
from denoq.passes.ptqd_head import HEAD_OUTPUT
from denoq.passes.selector import TIMESTEP_INPUT

SAMPLE_INPUT = "sample"
LABEL_INPUT = "class_labels"
SCALE_INPUT = "guidance_scale"  # engines.ort.GUIDANCE_INPUT reads it (passes and engines meet in the graph)
GUIDED_GRAPH = "model.guided.qdq.onnx"


class GuideClassFree(InPlace):
    """Pass: wrap a class-conditional denoiser `(sample, timestep, class_labels) → out_sample` into its guided form
    `(sample, timestep, class_labels, guidance_scale) → out_sample`.

    Args:
        null_label: the label of the unconditional model (the last class embedding, `num_classes`).
        name: prefix of the inserted nodes and of the inner values (`<name>.sample`, …).

    Invariant established: the graph inputs are `sample` [B, C, H, W], `timestep` [B], `class_labels` int64
    [B] and `guidance_scale` float32 [B] (each sample its own scale); the original graph runs once on
    `Concat(sample, sample)`, `Concat(timestep, timestep)`, `Concat(null, class_labels)` (every former reader of an
    input, the timestep selectors' Gathers included, reads the doubled value; inner values lose their recorded
    shapes, which named the old batch); `out_sample` [B, C, H, W] is
    `Add(u, Mul(Sub(c, u), Unsqueeze(guidance_scale)))` with `u, c = Split(inner out_sample, 2)` (Ho & Salimans,
    eq. 6). `requires` refuses a graph without the three inputs or the rank-4 float32 output, or one already
    guided (PreconditionError).
    """

    def __init__(self, null_label: int, name: str = "cfg") -> None:
        self.null_label, self.name = null_label, name

    def requires(self, model: ir.Model) -> None:
        self._check(model.graph)

    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        x, t, labels, y = self._check(g)
        n = self.name
        out_shape = list(y.shape)  # read before the inner shapes are dropped below
        new_inputs = {}
        for old in (x, t, labels):  # fresh graph inputs with the old names; the old values become inner values
            new_inputs[old.name] = ir.val(old.name, old.dtype, None if old.shape is None else ir.Shape(list(old.shape)))
            old.name = f"{n}.{old.name}"
        scale = ir.val(SCALE_INPUT, ir.DataType.FLOAT, ir.Shape([x.shape[0]]) if x.shape is not None else None)
        xi, ti, li = (new_inputs[v] for v in (SAMPLE_INPUT, TIMESTEP_INPUT, LABEL_INPUT))

        null = ir.val(f"{n}.null_label", const_value=ir.tensor(np.array([self.null_label], np.int64),
                                                                 name=f"{n}.null_label"))
        g.register_initializer(null)
        label_shape = ir.node("Shape", [li], name=f"{n}/labels/Shape", outputs=[ir.val(f"{n}.labels_shape")])
        nulls = ir.node("Expand", [null, label_shape.outputs[0]], name=f"{n}/null/Expand",
                        outputs=[ir.val(f"{n}.nulls")])
        doubled = [ir.node("Concat", [xi, xi], attributes={"axis": 0}, name=f"{n}/sample/Concat"),
                   ir.node("Concat", [ti, ti], attributes={"axis": 0}, name=f"{n}/timestep/Concat"),
                   ir.node("Concat", [nulls.outputs[0], li], attributes={"axis": 0}, name=f"{n}/labels/Concat")]
        for node, old in zip(doubled, (x, t, labels), strict=True):
            node.outputs[0].name = f"{old.name}_doubled"
            for use in list(old.uses()):
                use.node.replace_input_with(use.idx, node.outputs[0])
        g.inputs.clear()
        g.inputs.extend([xi, ti, li, scale])
        for node in g:  # inner values now hold the doubled batch: their recorded [B, …] shapes no longer hold
            for value in node.outputs:
                value.shape = None

        halves = ir.node("Split", [y], attributes={"axis": 0, "num_outputs": 2}, name=f"{n}/Split",
                         outputs=[ir.val(f"{n}.uncond"), ir.val(f"{n}.cond")])
        u, c = halves.outputs
        nodes = [halves]
        learned = out_shape[1] != x.shape[1]  # ε and Σ: guide the ε channels, keep the conditional half's Σ
        if learned:
            channels = [ir.node("Split", [h], attributes={"axis": 1, "num_outputs": 2}, name=f"{n}/{k}/Split",
                                outputs=[ir.val(f"{n}.{k}_eps"), ir.val(f"{n}.{k}_variance")])
                        for h, k in ((u, "uncond"), (c, "cond"))]
            nodes += channels
            u, c = channels[0].outputs[0], channels[1].outputs[0]
        axes = ir.val(f"{n}.scale_axes", const_value=ir.tensor(np.array([1, 2, 3], np.int64), name=f"{n}.scale_axes"))
        g.register_initializer(axes)
        s4 = ir.node("Unsqueeze", [scale, axes], name=f"{n}/scale/Unsqueeze", outputs=[ir.val(f"{n}.scale")])
        diff = ir.node("Sub", [c, u], name=f"{n}/Sub", outputs=[ir.val(f"{n}.difference")])
        scaled = ir.node("Mul", [s4.outputs[0], diff.outputs[0]], name=f"{n}/Mul", outputs=[ir.val(f"{n}.scaled")])
        nodes += [s4, diff, scaled]
        shape = ir.Shape([x.shape[0], *out_shape[1:]])
        if learned:
            add = ir.node("Add", [u, scaled.outputs[0]], name=f"{n}/Add", outputs=[ir.val(f"{n}.guided_eps")])
            out = ir.node("Concat", [add.outputs[0], channels[1].outputs[1]], attributes={"axis": 1},
                          name=f"{n}/Concat", outputs=[ir.val(HEAD_OUTPUT, ir.DataType.FLOAT, shape)])
            nodes += [add, out]
        else:
            out = ir.node("Add", [u, scaled.outputs[0]], name=f"{n}/Add",
                          outputs=[ir.val(HEAD_OUTPUT, ir.DataType.FLOAT, shape)])
            nodes.append(out)
        y.name = f"{n}.out_sample"
        g.outputs[list(g.outputs).index(y)] = out.outputs[0]
        g.extend([label_shape, nulls, *doubled, *nodes])
        g.sort()
        return PassResult(model, True)

    def ensures(self, model: ir.Model) -> None:
        g = model.graph
        names = [v.name for v in g.inputs]
        out = next((v for v in g.outputs if v.name == HEAD_OUTPUT), None)
        add = None if out is None else out.producer()
        readers = {u.node.op_type for v in g.inputs[:3] for u in v.uses()}  # the doubling Concats, the labels' Shape
        if (names != [SAMPLE_INPUT, TIMESTEP_INPUT, LABEL_INPUT, SCALE_INPUT] or add is None
                or add.name not in (f"{self.name}/Add", f"{self.name}/Concat") or not readers <= {"Concat", "Shape"}):
            raise PostconditionError("the graph is not the guided form (sample, timestep, class_labels, "
                                     "guidance_scale) → Add(u, s·(c − u)) over one doubled batch")

    def _check(self, g: ir.Graph) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
        inputs = {v.name: v for v in g.inputs}
        if SCALE_INPUT in inputs:
            raise PreconditionError(f"the graph already has a {SCALE_INPUT!r} input; guide the plain graph once")
        missing = [k for k in (SAMPLE_INPUT, TIMESTEP_INPUT, LABEL_INPUT) if k not in inputs]
        if missing:
            raise PreconditionError(f"the graph has no {', '.join(repr(k) for k in missing)} input (it has "
                                    f"{', '.join(sorted(inputs))}); classifier-free guidance is built for "
                                    "class-conditional models exported with class_labels")
        y = next((v for v in g.outputs if v.name == HEAD_OUTPUT), None)
        if y is None or y.shape is None or len(y.shape) != 4 or y.dtype != ir.DataType.FLOAT:
            raise PreconditionError(f"needs a float32 rank-4 {HEAD_OUTPUT!r} output; export the float32 model with "
                                    "its noise prediction named out_sample")
        x = inputs[SAMPLE_INPUT]
        if x.shape is None or len(x.shape) != 4:
            raise PreconditionError(f"input {SAMPLE_INPUT!r} must be rank 4 [B, C, H, W]; export the model with "
                                    "shape information")
        return x, inputs[TIMESTEP_INPUT], inputs[LABEL_INPUT], y
