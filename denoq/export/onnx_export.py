"""torch → FP ONNX with the module → node → weight map (docs/architecture.md, Contracts: Names; Interfaces).

The graph is exported with `torch.onnx.export(..., dynamo=True)` at opset 21 with dynamic axes (below). Inputs are
named as diffusers' own ONNX exports and TensorRT's demo name them: `sample` (the latent, whatever the forward calls
it), `timestep` float32 `[B]` — the values the pipeline passes —, then the conditioning inputs under the forward's
argument names (`denoq.sampling.cond`: `encoder_hidden_states` with a dynamic token length, SDXL's `text_embeds`
and `time_ids`, `class_labels`, PixArt's `encoder_attention_mask`, SD3's and Flux's `pooled_projections`, Flux's
`img_ids` / `txt_ids` / `guidance`), and the output is `out_sample`. A UNet's and SD3's latent height and width are
dynamic (multiples of the total downsampling or patch factor), as is Flux's packed token count; DiT and PixArt keep
the resolution they were exported at (their patch embedding switches between a stored and a recomputed position
table on a shape test, which an exported graph cannot carry).

Two exporter gaps are closed here: attention with a key-padding mask (PixArt's T5 mask) runs, for the export only,
through `MaskedAttention` — AttnProcessor2_0's arithmetic with the mask broadcast over heads and queries rather
than repeated and re-viewed, which torch.export cannot size —, and a `Squeeze` the exporter emits for a
`squeeze(dim)` that was a no-op in PyTorch (input and output of the same rank) becomes an `Identity`.

The dynamo exporter keeps Conv/Gemm weight names but turns attention projections into MatMul with a transposed
`[in, out]` weight under a generated name. Each node's `pkg.torch.onnx.name_scopes` metadata names the modules it
came from, so the map is built from that metadata: for every Conv / Gemm / MatMul whose weight (input 1) is an
initializer, the deepest scope that is a quantizable module owns it. Every quantizable weight initializer is
renamed `<module>.weight` and the map is stored in the model's `metadata_props["denoq.layer_map"]` (JSON):

    {module: {"node": str, "op_type": "Conv"|"Gemm"|"MatMul", "weight": "<module>.weight",
              "weight_axis": int, "transposed": bool}}

`weight_axis` is the output-channel axis of the ONNX initializer (0 for Conv and Gemm transB=1, 1 for a MatMul's
`[in, out]` weight); `transposed` says the initializer is the transpose of the PyTorch weight. A quantizable module
with no node is an error: passes would silently skip it.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from denoq.errors import DenoqError
from denoq.layermap import ATTENTION_MAP_KEY, write_layer_map
from denoq.layers import attention_modules, quantizable_layers
from denoq.onnxio import save_model
from denoq.sampling.cond import TEXT_INPUT, Cond, call_denoiser, denoiser_kwargs, feeds

OPSET = 21
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# the exporter warns that torchvision's ops cannot be registered when torchvision is absent (it is, on purpose)
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


@dataclass(frozen=True)
class GraphInputs:
    """Example inputs for export: `timestep` float32 [B] (the scheduler's own values); `cond` for conditional
    models, one tensor named `cond_name` (`encoder_hidden_states`, `class_labels`) or a `Conditioning` (its names);
    `resolution_multiple` > 0 makes the sample's height and width dynamic in multiples of it."""

    sample: torch.Tensor
    timestep: torch.Tensor
    cond: Cond = None
    cond_name: str = "encoder_hidden_states"
    resolution_multiple: int = 0

    def cond_feeds(self) -> dict[str, torch.Tensor]:
        return feeds(self.cond, self.cond_name)

    def names(self) -> list[str]:
        return ["sample", "timestep", *self.cond_feeds()]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.sample, self.timestep, *self.cond_feeds().values())

    def dynamic_shapes(self) -> tuple[Any, ...]:
        """Batch everywhere but on Flux's position ids; the text's token length (`encoder_hidden_states`, PixArt's
        mask, Flux's `txt_ids`); height and width of the sample, or the token count of a packed one ([B, S, C],
        with Flux's `img_ids`)."""
        batch = torch.export.Dim("batch", min=1, max=4096)
        tokens = torch.export.Dim("tokens", min=1, max=4096)
        seq = torch.export.Dim("seq", min=2, max=65536)
        sample: dict[int, Any] = {0: batch}
        if self.sample.dim() == 3:
            sample[1] = seq
        elif self.resolution_multiple:
            k = self.resolution_multiple
            h, w = (torch.export.Dim(n, min=1, max=max(1, 16384 // k)) for n in ("height", "width"))
            sample.update({2: k * h, 3: k * w})
        axes = {"encoder_attention_mask": {0: batch, 1: tokens}, "txt_ids": {0: tokens}, "img_ids": {0: seq}}
        conds = []
        for name, value in self.cond_feeds().items():
            spec = axes.get(name, {0: batch})
            if name == TEXT_INPUT and value.dim() == 3:
                spec = {0: batch, 1: tokens}
            conds.append(spec)
        return (sample, {0: batch}, *((tuple(conds),) if conds else ()))  # the wrapper's (sample, timestep, *conds)


class EpsWrapper(nn.Module):
    """`(sample, timestep, *cond tensors) → out_sample` around a diffusers denoiser, called as diffusers'
    pipelines call it (`call_denoiser`); the module's own submodule names stay under the `model.` prefix, which
    `layer_map_from_graph` strips."""

    PREFIX = "model."

    def __init__(self, model: nn.Module, cond_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.cond_names = cond_names

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *conds: torch.Tensor) -> torch.Tensor:
        if len(conds) > 1:  # no Conditioning here: its batch-size check would pin the exported batch axis
            named = dict(zip(self.cond_names, conds, strict=True))
            return self.model(sample, timestep=timestep, **denoiser_kwargs(named)).sample
        return call_denoiser(self.model, sample, timestep, conds[0] if conds else None)


class MaskedAttention:
    """diffusers' `AttnProcessor2_0` for an `Attention` without spatial or group norm and without a cross norm,
    with its attention mask — a bias [B, 1, L] over the keys, as PixArt passes its T5 mask — broadcast as
    [B, 1, 1, L] over heads and queries: the same arithmetic, in a form torch.export can size."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **unused: Any) -> torch.Tensor:
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head = key.shape[-1] // attn.heads
        query, key, value = (z.view(batch, -1, attn.heads, head).transpose(1, 2) for z in (query, key, value))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        mask = None if attention_mask is None else attention_mask.unsqueeze(1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, attn.heads * head)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def exportable_attention(model: nn.Module) -> Iterator[None]:
    """For the export: every `Attention` of a PixArt transformer (the model whose attention takes a key mask)
    runs `MaskedAttention`; its own processors are put back after."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    swapped = {}
    if type(model).__name__ == "PixArtTransformer2DModel":
        for name, module in model.named_modules():
            if isinstance(module, Attention) and type(module.processor) is AttnProcessor2_0 and \
                    module.spatial_norm is None and module.group_norm is None and not module.norm_cross:
                swapped[name] = module.processor
                module.set_processor(MaskedAttention())
    try:
        yield
    finally:
        modules = dict(model.named_modules())
        for name, processor in swapped.items():
            modules[name].set_processor(processor)


def identity_noop_squeezes(proto: onnx.ModelProto) -> None:
    """`Squeeze` nodes whose input and output have the same rank (a PyTorch `squeeze(dim)` of a dimension that
    is not 1, which ONNX's Squeeze refuses) become `Identity`."""
    graph = proto.graph
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.value_info, *graph.input, *graph.output]
            if v.type.tensor_type.HasField("shape")}
    for node in graph.node:
        if node.op_type == "Squeeze" and rank.get(node.input[0], -1) == rank.get(node.output[0], -2):
            node.op_type = "Identity"
            del node.input[1:]


def export_fp(model: nn.Module, inputs: GraphInputs, path: Path) -> dict[str, dict]:
    """Export `model` (eval mode, float32) to `path` and return the layer map written into the file."""
    wrapper = EpsWrapper(model, inputs.names()[2:]).eval()
    with warnings.catch_warnings(), torch.no_grad(), exportable_attention(model):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, inputs.tensors(), dynamo=True, opset_version=OPSET, verbose=False,
                                    input_names=inputs.names(), output_names=["out_sample"],
                                    dynamic_shapes=inputs.dynamic_shapes(), report=False)
    proto = program.model_proto
    identity_noop_squeezes(proto)
    layer_map = map_and_rename_weights(proto, model)
    write_layer_map(proto, layer_map)
    write_layer_map(proto, map_attention(proto, model), ATTENTION_MAP_KEY)
    save_model(proto, path)  # external data beside it above 2 GB
    return layer_map


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            return list(ast.literal_eval(prop.value))
    return []


def map_and_rename_weights(proto: onnx.ModelProto, model: nn.Module) -> dict[str, dict]:
    """Build the layer map from name-scope metadata and rename weight initializers to `<module>.weight` in place."""
    layers = quantizable_layers(model)
    inits = {init.name: init for init in proto.graph.initializer}
    owners: dict[str, onnx.NodeProto] = {}
    for node in proto.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        scopes = [s.removeprefix(EpsWrapper.PREFIX) for s in _scopes(node)]
        owner = next((s for s in reversed(scopes) if s in layers), None)
        if owner is None:
            continue
        if owner in owners:
            raise DenoqError(f"export: module {owner} maps to two ONNX nodes ({owners[owner].name}, {node.name}); "
                             "denoq quantizes a layer used once per forward only")
        owners[owner] = node

    missing = sorted(set(layers) - set(owners))
    if missing:
        raise DenoqError(f"export: quantizable module(s) {', '.join(missing[:5])} have no ONNX node carrying their "
                         "weight; the exporter changed the graph shape (report this with the model config)")

    renames: dict[str, str] = {}
    layer_map: dict[str, dict] = {}
    for name in sorted(owners):
        node, module = owners[name], layers[name]
        init = inits[node.input[1]]
        weight = module.weight.detach().cpu().numpy()
        onnx_w = numpy_helper.to_array(init)
        transposed = _is_transposed(node, onnx_w, weight, name)
        new = f"{name}.weight"
        if init.name != new:
            renames[init.name] = new
            init.name = new
        layer_map[name] = {"node": node.name, "op_type": node.op_type, "weight": new,
                           "weight_axis": 1 if transposed else 0, "transposed": transposed}
    for node in proto.graph.node:
        for i, inp in enumerate(node.input):
            if inp in renames:
                node.input[i] = renames[inp]
    return layer_map


def map_attention(proto: onnx.ModelProto, model: nn.Module) -> dict[str, dict]:
    """The attention map (`denoq.layermap.AttentionRef`): for every diffusers Attention module, the Softmax its name
    scope owns, the MatMul producing the Softmax's input (Q·Kᵀ) and the MatMul reading its output (P·V). A module
    whose attention did not export as MatMul → Softmax → MatMul is left out (its matmuls cannot be quantized)."""
    modules = attention_modules(model)
    producer = {o: n for n in proto.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    found: dict[str, dict] = {}
    for node in proto.graph.node:
        if node.op_type != "Softmax":
            continue
        scopes = [s.removeprefix(EpsWrapper.PREFIX) for s in _scopes(node)]
        owner = next((s for s in reversed(scopes) if s in modules), None)
        qk = producer.get(node.input[0])
        pv = readers.get(node.output[0], [])
        if owner is None or qk is None or qk.op_type != "MatMul" or len(pv) != 1 or pv[0].op_type != "MatMul":
            continue
        if owner in found:
            raise DenoqError(f"export: attention module {owner} maps to two softmaxes ({found[owner]['softmax']}, "
                             f"{node.name}); denoq quantizes an attention used once per forward only")
        found[owner] = {"qk": qk.name, "softmax": node.name, "pv": pv[0].name}
    return dict(sorted(found.items()))


def _is_transposed(node: onnx.NodeProto, onnx_w: np.ndarray, weight: np.ndarray, name: str) -> bool:
    """Whether the ONNX initializer holds the transpose of the PyTorch weight; checks the values either way."""
    if node.op_type == "MatMul":
        transposed = True
    elif node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        transposed = trans_b == 0
    else:
        transposed = False
    expected = weight.T if transposed else weight
    if onnx_w.shape != expected.shape or not np.array_equal(onnx_w, expected):
        raise DenoqError(f"export: the ONNX weight of {name} (node {node.name}, shape {onnx_w.shape}) does not hold "
                         f"the module's weight {weight.shape}; the layer map would be wrong")
    return transposed

