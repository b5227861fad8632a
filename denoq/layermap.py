"""The module → node → weight map that export records in the model (DESIGN.md, Contracts: Names).

Export writes it as JSON under the model's `metadata_props["denoq.layer_map"]`:
`{"<module>": {"node", "op_type", "weight", "weight_axis", "transposed"}}`. Passes and engines find a layer only
through this map, never through node order. It is data shared by export, passes and engines, so it lives here at
the bottom layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from denoq.errors import DenoqError

LAYER_MAP_KEY = "denoq.layer_map"
LAYER_OP_TYPES = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerRef:
    """Where one quantizable PyTorch module lives in the ONNX graph.

    `node` reads the activation as input 0 and the weight initializer `weight` as input 1. `weight_axis` is the
    output-channel axis of that initializer (0 for Conv and Gemm(transB=1), 1 for MatMul's `[in, out]` weight);
    `transposed` is true when the initializer is the transpose of the PyTorch `[out, in]` weight.
    """

    module: str
    node: str
    op_type: str
    weight: str
    weight_axis: int
    transposed: bool


def read_layer_map(model: onnx.ModelProto | ir.Model) -> dict[str, LayerRef]:
    """Parse the `denoq.layer_map` metadata of `model`; DenoqError when it is missing or malformed."""
    if isinstance(model, ir.Model):
        props = dict(model.metadata_props)
    else:
        props = {p.key: p.value for p in model.metadata_props}
    if LAYER_MAP_KEY not in props:
        raise DenoqError(f"the ONNX model has no '{LAYER_MAP_KEY}' metadata (module → node → weight map); "
                         "export it with denoq.export, which records the map")
    try:
        raw = json.loads(props[LAYER_MAP_KEY])
        return {module: LayerRef(module=module, node=str(e["node"]), op_type=str(e["op_type"]),
                                 weight=str(e["weight"]), weight_axis=int(e["weight_axis"]),
                                 transposed=bool(e["transposed"]))
                for module, e in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DenoqError(f"the model's '{LAYER_MAP_KEY}' metadata is malformed ({exc!r}); "
                         "re-export the model with denoq.export") from exc


def write_layer_map(model: onnx.ModelProto, layer_map: dict[str, dict]) -> None:
    """Store `layer_map` (module → entry dict) in `model`'s metadata, replacing an earlier one."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key != LAYER_MAP_KEY]
    del model.metadata_props[:]
    for key, value in [*keep, (LAYER_MAP_KEY, json.dumps(layer_map, sort_keys=True))]:
        model.metadata_props.add(key=key, value=value)
