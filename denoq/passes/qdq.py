"""Quantize a graph as a QuantPlan says: the Q/DQ passes, in order (docs/architecture.md: Quantizer semantics, Targets,
Timestep selector).

`InsertQDQ(plan)` is an onnx-ir `Sequential` of the passes the plan needs, all sharing one `PlanBinding` (the
plan checked against the FP graph and bound to its nodes once, by the first pass's `requires`, before anything
is changed; `denoq.passes.binding`):

1. `QuantizeWeights` (`weights`): every planned layer reads DequantizeLinear of the plan's integer weights
   (per output channel, blocked, int4).
2. `InsertTimestepSelectors` (`selector`; ADP-DM): a layer whose input scale table varies with the timestep
   reads x·R and is followed by ÷R (with R = Gather(r, timestep)), so its Q/DQ keeps one constant scale.
3. `QuantizeOutputs` (`activations`): the `ort-cpu` profile's output Q/DQ, between a selector layer and its Div.
4. `QuantizeInputGroups` (`igq`; IGQ-ViT): dynamic groups as float ops, or static groups' (and SVDQuant's
   smoothing) factor Mul.
5. `AddLowRankBranches` (`lowrank`; SVDQuant): the 16-bit branch on the layer's float input, added to its output.
6. `QuantizeInputs` (`activations`): the input Q/DQ (FP8 / INT Q/DQ, or a dynamic block quantizer), shared by the
   readers of one tensor with one quantizer, and skipped where the input already is the previous layer's quantized
   output (so it runs after 3).
7. `QuantizeAttention` (`attention`): the attention matmuls' inputs, the softmax on its uniform grid, the log2
   grid or IGQ-ViT groups.

Passes 2-7 are left out when the plan has nothing for them (constant scale tables, no output quantizers, no
groups, no low-rank branches, no attention). Layers not in the plan stay float. The PyTorch simulation
(`denoq.calibrators.simulate`) mirrors exactly this placement.
"""

from __future__ import annotations

from onnx_ir.passes import PassBase, Sequential

from denoq.passes.activations import QuantizeInputs, QuantizeOutputs
from denoq.passes.attention import QuantizeAttention
from denoq.passes.binding import PlanBinding
from denoq.passes.igq import QuantizeInputGroups
from denoq.passes.infra import DenoqPass
from denoq.passes.lowrank import AddLowRankBranches
from denoq.passes.selector import InsertTimestepSelectors
from denoq.passes.weights import QuantizeWeights
from denoq.plan import QuantPlan


def qdq_passes(plan: QuantPlan) -> list[PassBase]:
    """The Q/DQ passes `plan` needs, in order (module docstring), sharing one `PlanBinding`."""
    b = PlanBinding(plan)
    layers = plan.layers.values()
    needed = [
        (QuantizeWeights, True),
        (InsertTimestepSelectors, any(lp.input is not None and not lp.input.is_constant for lp in layers)),
        (QuantizeOutputs, any(lp.output is not None for lp in layers)),
        (QuantizeInputGroups, any(lp.input_groups is not None or lp.input_factors is not None for lp in layers)),
        (AddLowRankBranches, any(lp.rank for lp in layers)),
        (QuantizeInputs, any(lp.input is not None for lp in layers)),
        (QuantizeAttention, bool(plan.attention)),
    ]
    return [cls(b) for cls, need in needed if need]


class InsertQDQ(DenoqPass, Sequential):
    """Pass: Q/DQ for every layer of `plan`, for the plan's target profile (`trt` or `ort-cpu`): the Q/DQ passes
    of the module docstring in one `Sequential` (the pass manager runs, records and checks each of them).

    Invariant established: the conjunction of theirs. Every planned layer reads `DequantizeLinear(plan integers,
    plan scales)` as its weight and, where the plan quantizes its input, `DQ(Q(x))` as its activation (x·R for a
    timestep-grouped scale, x·factors for static groups; IGQ-ViT's float-op quantizer for dynamic groups); where
    the plan quantizes its output, every reader of that output (graph output included, under its original name)
    reads `DQ(Q(y))`. Raises DenoqError, before changing anything, when the plan and the graph do not match.
    """

    name = "insert_qdq"

    def __init__(self, plan: QuantPlan) -> None:
        self.plan = plan
        super().__init__(*qdq_passes(plan))
