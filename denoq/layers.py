"""Which modules of a model are quantizable layers, by their PyTorch module names (DESIGN.md, Names).

Shared by calibrators (which quantize them) and export (which maps each to its ONNX node); bottom layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

from denoq.errors import DenoqError

QUANTIZABLE_TYPES: dict[type[nn.Module], str] = {nn.Conv2d: "conv", nn.Linear: "linear"}


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d and Linear of `model`, keyed by module name, in sorted name order."""
    found = {name: m for name, m in model.named_modules() if type(m) in QUANTIZABLE_TYPES}
    return dict(sorted(found.items()))


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every diffusers `Attention` module of `model` (whose matmuls `attention.quantize` quantizes), by module name,
    in sorted order."""
    from diffusers.models.attention_processor import Attention

    return dict(sorted((name, m) for name, m in model.named_modules() if isinstance(m, Attention)))


def layer_op(module: nn.Module) -> str:
    """The QuantPlan op of a quantizable module: "conv" or "linear"."""
    return QUANTIZABLE_TYPES[type(module)]


def select_layers(layers: dict[str, nn.Module], patterns: Sequence[str]) -> tuple[dict[str, nn.Module], list[str]]:
    """Split `layers` into (quantized, kept in floating point) by the fnmatch `patterns`.

    A pattern that matches no layer is an error: a typo would otherwise silently quantize the layer.
    """
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in layers):
            raise DenoqError(f"layers.keep_fp pattern {pattern!r} matches no Conv2d/Linear of this model; use module "
                             "names such as conv_in or up_blocks.*.conv_shortcut (denoq inspect lists the layers)")
    kept = [name for name in layers if any(fnmatchcase(name, p) for p in patterns)]
    return {name: m for name, m in layers.items() if name not in kept}, kept
