"""Activation quantization: constant per-tensor Q/DQ on the layers' inputs and, for `ort-cpu`, outputs
(docs/architecture.md: Quantizer semantics, Targets).

- input: `QuantizeLinear → DequantizeLinear` in front of input 0 with the plan's (constant) scale and zero point
  (int8 when `signed`, else uint8). Nodes reading the same tensor with identical quantizer parameters share one
  pair (to_q / to_k / to_v); a tensor that is already `DQ(Q(·))` with identical parameters (the quantized output
  of the previous layer) is read as it is.
- bits: 8 as above; 4 with ONNX `int4` / `uint4` zero points (opset 21); 6 in the 8-bit container, saturated by
  an integer `Q → Clip(qmin, qmax) → DQ` (int6 [-32, 31], uint6 [0, 63]). TensorRT takes 8-bit activations only:
  A4 / A6 graphs are for ORT validation and quality studies.
- dynamic blocks (SVDQuant's INT4 W4A4, NVFP4; `denoq.passes.blockquant`): the block quantizer's subgraph in
  place of the pair.
- output (where the plan has one, the `ort-cpu` profile): `Q → DQ` on the layer's output, every consumer rewired
  to the DQ, a graph output keeping its name. The layer's output is the module's output: for a MatMul whose only
  consumer is the `Add` of a constant `[out]` bias (the dynamo exporter's Linear), that Add's output, so the
  quantizer sees what PyTorch's Linear returns, and ORT fuses `DQ → MatMul → Add → Q`. A timestep-selector layer
  quantizes the node's own (bias-free, ·r_t) output, before its Div: ORT fuses node → Q (`denoq.passes.selector`).

Outputs are quantized first, so that a next layer with identical input parameters reuses them.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import PassResult, PostconditionError, PreconditionError

from denoq.passes.binding import Binding, Layer
from denoq.passes.blockquant import block_qdq, is_block_qdq, require_opsets
from denoq.passes.qdq_base import PlanPass, not_yet_applied, produced_by, qdq, same_qdq
from denoq.passes.rewire import redirect
from denoq.passes.selector import ratio_div


class QuantizeOutputs(PlanPass):
    """Pass: the output quantizer of every planned layer that has one (the `ort-cpu` profile).

    Invariant established: the layer's output y (module docstring; for a selector layer the node's own output,
    before its Div) is read only by `<module>/output/QuantizeLinear`, and every former reader of y (graph output
    included, under its name) reads `DQ(Q(y))` (`DQ(Clip(Q(y)))` for 6 bits) with the plan's constant quantizer.
    Requires the selector's Div in place for selector layers (`InsertTimestepSelectors` runs first).
    """

    name = "qdq_outputs"

    def check(self, b: Binding, g: ir.Graph) -> None:
        layers = [layer for layer in b.layers if layer.output is not None]
        for layer in layers:
            if layer.ratio is not None and ratio_div(layer.node, layer.module) is None:
                raise PreconditionError(f"layer {layer.module} has no timestep selector Div for its output "
                                        "quantizer to precede; run timestep_selectors first")
        not_yet_applied(g, (f"{layer.module}.output_scale" for layer in layers), "output quantizers")

    def rewrite(self, b: Binding, g: ir.Graph) -> bool:
        layers = [layer for layer in b.layers if layer.output is not None]
        for layer in layers:
            _quantize_output(g, layer)
        return bool(layers)

    def ensures(self, model: ir.Model) -> None:
        nodes = {n.name: n for n in model.graph}
        for layer in self.bound(model).layers:
            if layer.output is None:
                continue
            q = nodes.get(f"{layer.module}/output/QuantizeLinear")
            y = None if q is None else q.inputs[0]
            dq = None if q is None else _last(q)
            if (y is None or dq is None or y.is_graph_output() or [u.node for u in y.uses()] != [q]
                    or not same_qdq(dq.outputs[0], layer.output)):
                raise PostconditionError(f"layer {layer.module}: its output is not read through one "
                                         "DQ(Q(·)) with the plan's output quantizer")


class QuantizeInputs(PlanPass):
    """Pass: the input quantizer of every planned layer that has one (and no IGQ-ViT dynamic groups).

    Invariant established: input 0 of each such layer is `DQ(Q(·))` (`DQ(Clip(Q(·)))` for 6 bits) with the plan's
    constant quantizer, reading the layer's former input: for a selector layer `x·R`, for static IGQ-ViT groups
    `x·factors` (those Muls are put in by `InsertTimestepSelectors` and `QuantizeInputGroups`, which run first).
    Requires those Muls in place and no input Q/DQ yet.
    """

    name = "qdq_inputs"

    def check(self, b: Binding, g: ir.Graph) -> None:
        layers = _input_layers(b)
        for layer in layers:
            x = layer.node.inputs[0]
            if layer.ratio is not None and not produced_by(x, "Mul", ""):
                raise PreconditionError(f"layer {layer.module} does not read x·R; run timestep_selectors first")
            if layer.ratio is None and layer.plan.input_factors is not None and not produced_by(x, "Mul", ""):
                raise PreconditionError(f"layer {layer.module} does not read its static group factors' Mul; run "
                                        "igq_groups first")
        not_yet_applied(g, (f"{layer.module}.input_scale" for layer in layers), "input quantizers")

    def rewrite(self, b: Binding, g: ir.Graph) -> bool:
        shared: dict[tuple, ir.Value] = {}
        layers = _input_layers(b)
        for layer in layers:
            a, x = layer.input, layer.node.inputs[0]
            assert a is not None and x is not None  # checked in bind
            if not a.block_size and same_qdq(x, a):
                continue
            key = (id(x), a)
            if key not in shared:
                nodes = block_qdq(g, x, a, layer.module, "input", layer.ftype, layer.node.op_type == "Conv") \
                    if a.block_size else qdq(g, x, a, layer.module, "input", layer.ftype)
                g.insert_before(layer.node, nodes)
                shared[key] = nodes[-1].outputs[0]
            layer.node.replace_input_with(0, shared[key])
        return bool(layers)

    def call(self, model: ir.Model) -> PassResult:
        require_opsets(model, [layer.input for layer in _input_layers(self.bound(model)) if layer.input])
        return super().call(model)

    def ensures(self, model: ir.Model) -> None:
        for layer in _input_layers(self.bound(model)):
            a = layer.input
            assert a is not None
            if not (is_block_qdq if a.block_size else same_qdq)(layer.node.inputs[0], a):
                raise PostconditionError(f"layer {layer.module}: input 0 is not DQ(Q(·)) with the plan's input "
                                         "quantizer")


def _input_layers(b: Binding) -> list[Layer]:
    return [layer for layer in b.layers if layer.input is not None and layer.plan.input_groups is None]


def _last(q: ir.Node) -> ir.Node | None:
    """The DequantizeLinear that ends the chain starting at `q` (through a Clip), None when there is none."""
    node: ir.Node | None = q
    while node is not None and node.op_type != "DequantizeLinear":
        uses = list(node.outputs[0].uses())
        node = uses[0].node if len(uses) == 1 and uses[0].node.op_type in ("Clip", "DequantizeLinear") else None
    return node


def layer_output(layer: Layer) -> ir.Value:
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


def _quantize_output(g: ir.Graph, layer: Layer) -> None:
    a = layer.output
    assert a is not None
    # a selector layer quantizes the node's own (bias-free, ·r_t) output, before its Div: ORT fuses node → Q
    y = layer.node.outputs[0] if layer.ratio is not None else layer_output(layer)
    nodes = qdq(g, y, a, layer.module, "output", layer.ftype)
    redirect(g, y, nodes[-1].outputs[0], skip=nodes[0], old_name=f"{layer.module}.output_float")
    producer = y.producer()
    assert producer is not None
    g.insert_after(producer, nodes)
