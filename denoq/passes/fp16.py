"""The FP16 graph for TensorRT: float tensors in float16, numerically sensitive parts in float32 with explicit casts.

TensorRT 10+ builds strongly typed networks: every tensor's type is the one the ONNX graph gives it, and the
FP16 builder flag no longer exists. So the FP16 precision of the deployed engine is decided here, in the graph:

- Every node computes in float16 except the FP32 islands: normalizations and Softmax (`FP32_OPS`: their
  reductions over thousands of values lose accuracy in float16), the timestep embedding (every node reached from
  the `timestep` input before the first QuantizeLinear or layer, the selector/PTQD table Gathers excepted: the
  sinusoids of t up to 1000 need float32's mantissa), and each layer whose module matches `fp32_layers` (fnmatch
  patterns over the layer map, e.g. `conv_out`), together with its input/weight Q/DQ and everything after it up
  to the next QuantizeLinear or layer (for the last layer: its output and the PTQD head).
- Q/DQ scales take the dtype of the tensor they quantize (a float16 QuantizeLinear has a float16 scale; a
  DequantizeLinear outputs its scale's type), as strong typing requires; zero points keep their integer type.
- A Cast is inserted on every edge between the two precisions (once per tensor and direction); graph inputs and
  outputs stay float32, so the engine's I/O is the FP32 graph's.

A float initializer is converted once per precision that reads it; a value float16 cannot hold (a scale that
rounds to 0 or a weight beyond ±65504) raises a DenoqError naming it, since the engine would silently compute
something else. The result is what `trt-rules` checks and what `denoq build` hands to TensorRT.

The element types of the float32 graph come from ONNX's shape inference, run on a protobuf snapshot of the
`ir.Model` (read, never converted back). The result carries no value_info (types are the inputs', outputs' and
initializers' own and what inference derives from them), and its nodes are in the order `_schedule` gives.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto
from onnx_ir.passes import PassResult, PostconditionError, PreconditionError

from denoq.errors import DenoqError
from denoq.layermap import LAYER_OP_TYPES, read_layer_map
from denoq.onnxio import check_and_infer
from denoq.passes.blockquant import FP4_QUANTIZE
from denoq.passes.infra import InPlace

FP32_OPS = ("GroupNormalization", "LayerNormalization", "InstanceNormalization", "Softmax")
# inputs that the op's type constraints keep in float32 whatever the node computes in
FLOAT32_INPUTS = {"Resize": (1, 2)}
STOP_OPS = ("QuantizeLinear", FP4_QUANTIZE, *LAYER_OP_TYPES)
TIMESTEP_INPUT = "timestep"
FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def _forward(seeds: Sequence[ir.Value], skip: Sequence[str] = ()) -> set[ir.Node]:
    """Nodes reached from the values `seeds`, not entering `skip` ops and stopping before `STOP_OPS`."""
    found: set[ir.Node] = set()
    todo = list(seeds)
    while todo:
        for use in todo.pop().uses():
            node = use.node
            if node in found or node.op_type in skip or node.op_type in STOP_OPS:
                continue
            found.add(node)
            todo.extend(node.outputs)
    return found


def island_nodes(model: ir.Model, fp32_layers: Sequence[str]) -> set[ir.Node]:
    """The nodes that stay float32 (the islands of the module docstring)."""
    g = model.graph
    keep = {node for node in g if node.op_type in FP32_OPS}
    keep |= _forward([v for v in g.inputs if v.name == TIMESTEP_INPUT], skip=("Gather",))
    by_name = {node.name: node for node in g}
    for module, ref in sorted(read_layer_map(model).items()):
        if not any(fnmatch.fnmatchcase(module, p) for p in fp32_layers) or ref.node not in by_name:
            continue
        layer = by_name[ref.node]
        keep.add(layer)
        for x in layer.inputs:  # its weight / input DequantizeLinear and the QuantizeLinear before it
            dq = None if x is None else x.producer()
            if dq is not None and dq.op_type == "DequantizeLinear":
                keep.add(dq)
                q = None if dq.inputs[0] is None else dq.inputs[0].producer()
                if q is not None and q.op_type == "QuantizeLinear":
                    keep.add(q)
        keep |= _forward(layer.outputs)
    return keep


def fp32_nodes(model: onnx.ModelProto, fp32_layers: Sequence[str]) -> set[int]:
    """Indices (in `model.graph.node`) of the nodes that stay float32: `island_nodes` of a protobuf model."""
    m = ir.from_proto(model)
    index = {node: i for i, node in enumerate(m.graph)}
    return {index[node] for node in island_nodes(m, fp32_layers)}


def _elem_types(model: ir.Model) -> dict[str, int]:
    inferred = check_and_infer(ir.to_proto(model), strict=False, check_type=False)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def _half(array: np.ndarray, what: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        half = array.astype(np.float16)
    if not np.isfinite(half[np.isfinite(array)]).all():
        raise DenoqError(f"{what} has values beyond float16's range (±65504); keep its layer in float32 with "
                         "trt.fp32_layers")
    return half


class ConvertFp16(InPlace):
    """Pass: a float32 Q/DQ graph → the float16 graph with float32 islands (module docstring).

    Invariant established: every float tensor a node outside the islands reads is float16 (a float16 initializer
    `<name>/fp16`, a float16 node's output or a `Cast` to float16), every float tensor an island node reads is
    float32; Q/DQ scales have their tensor's type; the graph's inputs and outputs keep their float32 types.
    Requires a float32 graph (no float16 initializer yet). `fp32_layers`: fnmatch patterns over the layer map's
    module names kept in float32 with what follows them."""

    def __init__(self, fp32_layers: Sequence[str] = ("conv_out",), name: str = "fp16") -> None:
        self.fp32_layers, self.name = tuple(fp32_layers), name

    def requires(self, model: ir.Model) -> None:
        half = next((v.name for v in model.graph.initializers.values()
                     if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT16), None)
        if half is not None:
            raise PreconditionError(f"the graph already has float16 initializers ({half!r}); convert the float32 "
                                    "graph once")

    def ensures(self, model: ir.Model) -> None:
        for v in [*model.graph.inputs, *model.graph.outputs]:
            if v.dtype == ir.DataType.FLOAT16:
                raise PostconditionError(f"graph input/output {v.name!r} became float16; the engine's I/O must "
                                         "stay float32")

    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        types = _elem_types(model)
        keep = island_nodes(model, self.fp32_layers)
        nodes = list(g)
        # the precision every float tensor will have: produced by a float16 node → float16
        produced_half = {v for node in nodes if node not in keep for v in node.outputs if types.get(v.name) == FLOAT}
        half_inits: dict[str, ir.Value] = {}
        casts: dict[tuple[str, int], ir.Value] = {}
        new_nodes: list[ir.Node] = []

        def half_initializer(v: ir.Value, scale: bool) -> ir.Value:
            if v.name not in half_inits:
                array = v.const_value.numpy()  # type: ignore[union-attr]
                half = _half(array, f"initializer {v.name}")
                if scale and ((half <= 0) | ~np.isfinite(half)).any():
                    raise DenoqError(f"Q/DQ scale {v.name} underflows float16 (smallest {float(array.min()):.3g}); "
                                     "keep its layer in float32 with trt.fp32_layers")
                name = f"{v.name}/fp16"
                half_inits[v.name] = ir.val(name, const_value=ir.tensor(half, name=name))
                g.register_initializer(half_inits[v.name])
            return half_inits[v.name]

        def cast(v: ir.Value, to: int) -> ir.Value:
            key = (v.name, to)
            if key not in casts:
                name = f"{v.name}/{'fp16' if to == HALF else 'fp32'}"
                node = ir.node("Cast", [v], attributes={"to": to}, name=f"{name}/Cast", outputs=[ir.val(name)])
                new_nodes.append(node)
                casts[key] = node.outputs[0]
            return casts[key]

        for node in nodes:
            half_node = node not in keep
            for k, v in enumerate(node.inputs):
                if v is None or types.get(v.name) != FLOAT or k in FLOAT32_INPUTS.get(node.op_type, ()):
                    continue
                is_half = v in produced_half
                if half_node and not is_half:
                    scale = node.op_type in ("QuantizeLinear", "DequantizeLinear") and k == 1
                    node.replace_input_with(k, half_initializer(v, scale) if v.is_initializer() else cast(v, HALF))
                elif not half_node and is_half:
                    node.replace_input_with(k, cast(v, FLOAT))
            if half_node:
                _retype(node)
            new_nodes.append(node)
        for i, out in enumerate(list(g.outputs)):
            if out in produced_half:  # the float16 value moves inside, a Cast gives the float32 output
                outer = ir.val(out.name, out.dtype, out.shape)
                outer.doc_string = out.doc_string
                outer.metadata_props.update(out.metadata_props)
                out.name = f"{outer.name}/fp16"
                new_nodes.append(ir.node("Cast", [out], attributes={"to": FLOAT}, name=f"{outer.name}/Cast",
                                         outputs=[outer]))
                g.outputs[i] = outer
        g.remove(nodes)
        g.extend(_schedule(new_nodes, g))
        for name, v in list(g.initializers.items()):
            if not list(v.uses()):
                del g.initializers[name]
        _drop_value_info(g)
        return PassResult(model, True)


def _retype(node: ir.Node) -> None:
    """A node moved to float16: its own float32 attributes (Cast targets, constants) follow."""
    for name, a in list(node.attributes.items()):
        if not isinstance(a, ir.Attr):
            continue
        if node.op_type == "Cast" and name == "to" and a.value == FLOAT:
            node.attributes[name] = ir.AttrInt64(name, HALF)
        elif a.type == ir.AttributeType.TENSOR and a.value.dtype == ir.DataType.FLOAT:
            half = _half(a.value.numpy(), f"constant of {node.name}")
            node.attributes[name] = ir.AttrTensor(name, ir.tensor(half, name=a.value.name))


def _schedule(nodes: list[ir.Node], g: ir.Graph) -> list[ir.Node]:
    """`nodes` in an order where every input is produced before it is read (casts placed after their source):
    repeated sweeps in list order, each taking every node whose inputs are ready."""
    ready: set[ir.Value | None] = {*g.inputs, *g.initializers.values(), None}
    pending, ordered = list(nodes), []
    while pending:
        rest = []
        for node in pending:
            if all(x in ready for x in node.inputs):
                ordered.append(node)
                ready.update(node.outputs)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise DenoqError(f"fp16 pass: {len(rest)} nodes read tensors nobody produces (first: {rest[0].name}); "
                             "the input graph is not a valid ONNX graph")
        pending = rest
    return ordered


def _drop_value_info(g: ir.Graph) -> None:
    """No type, shape or value metadata on the graph's inner values and initializers (no value_info written)."""
    io = {*g.inputs, *g.outputs}
    for v in [*g.initializers.values(), *(o for node in g for o in node.outputs)]:
        if v not in io:
            v.type, v.shape, v.doc_string = None, None, None
            v.metadata_props.clear()
