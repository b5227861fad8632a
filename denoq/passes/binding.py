"""The QuantPlan bound to the graph: every check that the plan fits the FP graph, and the layer records the Q/DQ
passes read (docs/architecture.md, Contracts: Names, QuantPlan).

`bind(plan, model)` runs on the FP graph from export, before any Q/DQ pass changes it, and raises a one-line
`DenoqError` (problem; fix) for a plan and a graph that do not match: a layer the map does not name, a node or
weight that is not what the map says, tied weights, integer weights outside their range, scales that are not
finite and positive (or not exact in the graph's float type), activation bits or zero points the targets do not
take, a block size that does not divide the input channels. Its `Layer` records resolve every number the passes
write: the weight integers in ONNX layout with their DequantizeLinear form (`Weight`), the constant activation
quantizers (`Act`; for timestep-grouped tables the selector's s0 / s_out0) and the selector's ratio table r_t.

`PlanBinding` binds once per graph and hands the same records to every Q/DQ pass of a pipeline (their `requires`
asks for it, so the first pass binds before anything is changed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from denoq.errors import DenoqError
from denoq.layermap import LayerRef, read_attention_map, read_layer_map
from denoq.passes.plan_checks import Act, Weight, act, check_node, check_selector_layer, check_weight_ints, weight_form
from denoq.plan import LayerPlan, QuantPlan, check_scale_table, selector_tables


@dataclass
class Layer:
    """A plan layer bound to its node in the graph (checked before anything is changed)."""

    ref: LayerRef
    plan: LayerPlan
    node: ir.Node
    weight_int: np.ndarray  # ONNX layout
    weight: Weight
    ftype: ir.DataType  # the graph's float type for this layer (the FP weight's)
    input: Act | None
    output: Act | None
    ratio: np.ndarray | None = None  # timestep selector r_t = s0 / s_t (float32 [T]), None for constant scales

    @property
    def module(self) -> str:
        return self.ref.module


@dataclass(frozen=True)
class AttentionInput:
    """One input of a planned attention matmul: `node.inputs[idx]` in role q, k (Q·Kᵀ), p or v (P·V)."""

    module: str
    node: ir.Node
    idx: int
    role: str
    act: Act | None


@dataclass(frozen=True)
class Binding:
    """The plan's layers (sorted by module name) and attention matmul inputs, bound to one graph."""

    plan: QuantPlan
    layers: list[Layer]
    attention: list[AttentionInput]


class PlanBinding:
    """`plan` bound to a graph once (`bind` on the first call with a model) and the same `Binding` for every later
    call with that model: the Q/DQ passes of one pipeline share it."""

    def __init__(self, plan: QuantPlan) -> None:
        self.plan = plan
        self._model: ir.Model | None = None
        self._binding: Binding | None = None

    def __call__(self, model: ir.Model) -> Binding:
        if self._model is not model or self._binding is None:
            self._binding, self._model = bind(self.plan, model), model
        return self._binding


def bind(plan: QuantPlan, model: ir.Model) -> Binding:
    """Check that `plan` fits the FP graph `model` and resolve its layers (module docstring); DenoqError if not."""
    opset = model.opset_imports.get("", 0)
    if opset < 13:
        raise DenoqError(f"the model uses ONNX opset {opset}; per-channel Q/DQ needs opset >= 13, "
                         "re-export with opset_version=21")
    return Binding(plan, _bind_layers(plan, model), _bind_attention(plan, model))


def _bind_layers(plan: QuantPlan, model: ir.Model) -> list[Layer]:
    refs = read_layer_map(model)
    nodes = {n.name: n for n in model.graph}
    layers = []
    for name in sorted(plan.layers):
        lp = plan.layers[name]
        ref = refs.get(name)
        if ref is None:
            raise DenoqError(f"plan layer {name!r} is not in the model's layer map; calibrate and export the same "
                             "network (the plan and the ONNX model come from different models)")
        node = check_node(name, ref, nodes.get(ref.node))
        w = node.inputs[1]
        assert w is not None and w.const_value is not None  # check_node
        ftype = w.const_value.dtype
        ints = check_weight_ints(name, lp, ref, node, tuple(w.const_value.shape))
        scale = np.asarray(lp.weight_scale.detach().cpu().numpy(), dtype=np.float32)
        if not np.all(np.isfinite(scale) & (scale > 0)):
            raise DenoqError(f"layer {name}: weight scales must be finite and positive; the plan is corrupt, "
                             "recalibrate")
        weight = weight_form(name, lp, ref, node.op_type, ints, scale, model.opset_imports.get("", 0))
        for role, q in (("input", lp.input), ("output", lp.output)):
            if q is not None:  # every table: length T, finite, positive
                check_scale_table(name, role, q, plan.num_train_timesteps)
        tables = None
        if any(q is not None and not q.is_constant for q in (lp.input, lp.output)):
            tables = selector_tables(name, lp.input, lp.output, plan.num_train_timesteps)
            if tables.ratio is not None:
                check_selector_layer(node, name, ftype)
                if lp.input_groups is not None or lp.input_factors is not None:
                    raise DenoqError(f"layer {name}: timestep groups and IGQ-ViT groups do not combine; set "
                                     "activations.timestep_groups=1 or activations.igq_groups=0")
        if lp.input is not None and lp.input.format == "fp4" and node.op_type == "Conv":
            raise DenoqError(f"layer {name}: NVFP4 activations on a convolution; TensorRT's FP4 path runs GEMMs "
                             "only, keep convolutions in FP8 (layers.conv_format=fp8)")
        if lp.rank and (lp.output is not None or tables is not None):
            raise DenoqError(f"layer {name}: SVDQuant's low-rank branch takes neither timestep groups nor output "
                             "quantizers; set activations.timestep_groups=1 and target=trt (or svdquant.rank=0)")
        layers.append(Layer(ref=ref, plan=lp, node=node, weight_int=ints, weight=weight, ftype=ftype,
                            input=act(name, "input", lp.input, plan.target, ftype,
                                      None if tables is None else tables.input_scale),
                            output=act(name, "output", lp.output, plan.target, ftype,
                                       None if tables is None else tables.output_scale),
                            ratio=None if tables is None or tables.ratio is None else tables.ratio.numpy()))
    return layers


def _bind_attention(plan: QuantPlan, m: ir.Model) -> list[AttentionInput]:
    """Every planned attention matmul input; DenoqError when the graph has no attention map entry or the nodes it
    names are not a MatMul → Softmax → MatMul."""
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
            x = node.inputs[idx]
            assert x is not None
            bound.append(AttentionInput(name, node, idx, role,
                                        act(name, f"attention {role}", q, plan.target, x.dtype)))
    return bound


