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
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from denoq.errors import DenoqError
from denoq.layermap import LAYER_OP_TYPES, read_layer_map
from denoq.onnxio import check_and_infer

FP32_OPS = ("GroupNormalization", "LayerNormalization", "InstanceNormalization", "Softmax")
# inputs that the op's type constraints keep in float32 whatever the node computes in
FLOAT32_INPUTS = {"Resize": (1, 2)}
STOP_OPS = ("QuantizeLinear", *LAYER_OP_TYPES)
TIMESTEP_INPUT = "timestep"
FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def _consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name:
                out[name].append(i)
    return out


def _forward(graph: onnx.GraphProto, seeds: Sequence[str], consumers: dict[str, list[int]],
             skip: Sequence[str] = ()) -> set[int]:
    """Nodes reached from the tensors `seeds`, not entering `skip` ops and stopping before `STOP_OPS`."""
    found: set[int] = set()
    todo = list(seeds)
    while todo:
        for i in consumers.get(todo.pop(), []):
            node = graph.node[i]
            if i in found or node.op_type in skip or node.op_type in STOP_OPS:
                continue
            found.add(i)
            todo.extend(node.output)
    return found


def fp32_nodes(model: onnx.ModelProto, fp32_layers: Sequence[str]) -> set[int]:
    """Indices of the nodes that stay float32 (the islands of the module docstring)."""
    graph = model.graph
    consumers = _consumers(graph)
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    keep = {i for i, node in enumerate(graph.node) if node.op_type in FP32_OPS}
    keep |= _forward(graph, [TIMESTEP_INPUT], consumers, skip=("Gather",))
    index = {node.name: i for i, node in enumerate(graph.node)}
    for module, ref in sorted(read_layer_map(model).items()):
        if not any(fnmatch.fnmatchcase(module, p) for p in fp32_layers) or ref.node not in index:
            continue
        layer = index[ref.node]
        keep.add(layer)
        for name in graph.node[layer].input:  # its weight / input DequantizeLinear and the QuantizeLinear before it
            dq = producer.get(name)
            if dq is not None and graph.node[dq].op_type == "DequantizeLinear":
                keep.add(dq)
                q = producer.get(graph.node[dq].input[0])
                if q is not None and graph.node[q].op_type == "QuantizeLinear":
                    keep.add(q)
        keep |= _forward(graph, list(graph.node[layer].output), consumers)
    return keep


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = check_and_infer(model, strict=False, check_type=False)
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


@dataclass(frozen=True)
class ConvertFp16:
    """The pass: a float32 Q/DQ graph → the float16 graph with float32 islands (module docstring).

    `fp32_layers`: fnmatch patterns over the layer map's module names kept in float32 with what follows them."""

    fp32_layers: tuple[str, ...] = ("conv_out",)
    name: str = "fp16"

    def __call__(self, model: onnx.ModelProto) -> onnx.ModelProto:
        types = _elem_types(model)
        keep = fp32_nodes(model, self.fp32_layers)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        graph = out.graph
        inits = {i.name: i for i in graph.initializer}
        # the precision every float tensor will have: produced by a float16 node → float16
        produced_half = {name for i, node in enumerate(graph.node) if i not in keep
                         for name in node.output if types.get(name) == FLOAT}
        half_inits: dict[str, str] = {}
        casts: dict[tuple[str, int], str] = {}
        new_nodes: list[onnx.NodeProto] = []

        def half_initializer(name: str, scale: bool) -> str:
            if name not in half_inits:
                array = numpy_helper.to_array(inits[name])
                half = _half(array, f"initializer {name}")
                if scale and ((half <= 0) | ~np.isfinite(half)).any():
                    raise DenoqError(f"Q/DQ scale {name} underflows float16 (smallest {float(array.min()):.3g}); "
                                     "keep its layer in float32 with trt.fp32_layers")
                half_inits[name] = f"{name}/fp16"
                graph.initializer.append(numpy_helper.from_array(half, half_inits[name]))
            return half_inits[name]

        def cast(name: str, to: int) -> str:
            key = (name, to)
            if key not in casts:
                casts[key] = f"{name}/{'fp16' if to == HALF else 'fp32'}"
                new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to,
                                                  name=f"{casts[key]}/Cast"))
            return casts[key]

        for i, node in enumerate(graph.node):
            half_node = i not in keep
            for k, name in enumerate(node.input):
                if not name or types.get(name) != FLOAT or k in FLOAT32_INPUTS.get(node.op_type, ()):
                    continue
                is_half = name in produced_half
                if half_node and not is_half:
                    scale = node.op_type in ("QuantizeLinear", "DequantizeLinear") and k == 1
                    node.input[k] = half_initializer(name, scale) if name in inits else cast(name, HALF)
                elif not half_node and is_half:
                    node.input[k] = cast(name, FLOAT)
            if half_node:
                _retype(node)
            new_nodes.append(node)
        for output in graph.output:
            if output.name in produced_half:
                producer = next(n for n in new_nodes if output.name in n.output)
                inner = f"{output.name}/fp16"
                producer.output[list(producer.output).index(output.name)] = inner
                for n in new_nodes:
                    n.input[:] = [inner if x == output.name else x for x in n.input]
                new_nodes.append(helper.make_node("Cast", [inner], [output.name], to=FLOAT,
                                                  name=f"{output.name}/Cast"))
        del graph.node[:]
        graph.node.extend(_topological(new_nodes, graph))
        used = {x for n in graph.node for x in n.input}
        unused = [init for init in graph.initializer if init.name not in used]
        for init in unused:
            graph.initializer.remove(init)
        del graph.value_info[:]
        return out


def _retype(node: onnx.NodeProto) -> None:
    """A node moved to float16: its own float32 attributes (Cast targets, constants) follow."""
    for a in node.attribute:
        if node.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
            a.i = HALF
        elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT:
            a.t.CopyFrom(numpy_helper.from_array(_half(numpy_helper.to_array(a.t), f"constant of {node.name}"),
                                                 a.t.name))


def _topological(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """`nodes` in an order where every input is produced before it is read (casts placed after their source)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        rest = []
        for node in pending:
            if all(x in ready for x in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise DenoqError(f"fp16 pass: {len(rest)} nodes read tensors nobody produces (first: {rest[0].name}); "
                             "the input graph is not a valid ONNX graph")
        pending = rest
    return ordered
