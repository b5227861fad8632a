"""The module → node → weight map that export records in the model (docs/architecture.md, Contracts: Names).

Export writes it as JSON under the model's `metadata_props["denoq.layer_map"]`:
`{"<module>": {"node", "op_type", "weight", "weight_axis", "transposed"}}`, and the attention map (every diffusers
`Attention` module → the nodes of its decomposed scaled dot-product attention) under
`metadata_props["denoq.attention_map"]`: `{"<module>": {"qk", "softmax", "pv"}}`. Passes and engines find a layer only
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
ATTENTION_MAP_KEY = "denoq.attention_map"
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


def _props(model: onnx.ModelProto | ir.Model) -> dict[str, str]:
    """The model's metadata_props as a dict (an onnx proto or an onnx-ir model)."""
    if isinstance(model, ir.Model):
        return dict(model.metadata_props)
    return {p.key: p.value for p in model.metadata_props}


def read_layer_map(model: onnx.ModelProto | ir.Model) -> dict[str, LayerRef]:
    """Parse the `denoq.layer_map` metadata of `model`; DenoqError when it is missing or malformed."""
    props = _props(model)
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


@dataclass(frozen=True)
class AttentionRef:
    """The nodes of one attention module's scaled dot-product attention: the Q·Kᵀ MatMul `qk` (inputs: the scaled
    query and the scaled transposed key), the `softmax` reading its output and the P·V MatMul `pv` (inputs: the
    probabilities and the values)."""

    module: str
    qk: str
    softmax: str
    pv: str


def read_attention_map(model: onnx.ModelProto | ir.Model) -> dict[str, AttentionRef]:
    """Parse the `denoq.attention_map` metadata of `model` ({} when the model has no attention)."""
    try:
        raw = json.loads(_props(model).get(ATTENTION_MAP_KEY, "{}"))
        return {module: AttentionRef(module=module, qk=str(e["qk"]), softmax=str(e["softmax"]), pv=str(e["pv"]))
                for module, e in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DenoqError(f"the model's '{ATTENTION_MAP_KEY}' metadata is malformed ({exc!r}); "
                         "re-export the model with denoq.export") from exc


def write_layer_map(model: onnx.ModelProto, layer_map: dict[str, dict], key: str = LAYER_MAP_KEY) -> None:
    """Store `layer_map` (module → entry dict) in `model`'s metadata under `key` (the layer map, or
    ATTENTION_MAP_KEY), replacing an earlier one."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    for k, value in [*keep, (key, json.dumps(layer_map, sort_keys=True))]:
        model.metadata_props.add(key=k, value=value)
