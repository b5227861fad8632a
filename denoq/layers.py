"""Which modules of a model are quantizable layers, by their PyTorch module names (docs/architecture.md, Names).

Shared by calibrators (which quantize them) and export (which maps each to its ONNX node); bottom layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


def match_layers(names: Iterable[str], patterns: Sequence[str], key: str) -> list[str]:
    """The `names` (module names) that match any of the fnmatch `patterns` of the recipe key `key`, in order.

    A pattern that matches no name is a DenoqError naming `key`: a typo would otherwise silently select nothing.
    """
    names = list(names)
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            raise DenoqError(f"{key} pattern {pattern!r} matches no Conv2d/Linear of this model; use module names "
                             "such as conv_in or up_blocks.*.conv_shortcut (denoq inspect lists the layers)")
    return [name for name in names if any(fnmatchcase(name, p) for p in patterns)]


def select_layers(layers: dict[str, nn.Module], patterns: Sequence[str]) -> tuple[dict[str, nn.Module], list[str]]:
    """Split `layers` into (quantized, kept in floating point) by the `layers.keep_fp` fnmatch `patterns`.

    A pattern that matches no layer is an error (`match_layers`), and so are patterns that keep every layer: an
    artifact with nothing quantized would only pretend to be quantized.
    """
    kept = match_layers(layers, patterns, "layers.keep_fp")
    quantized = {name: m for name, m in layers.items() if name not in kept}
    if not quantized:
        raise DenoqError(f"layers.keep_fp={','.join(patterns)} keeps all {len(layers)} Conv2d/Linear layers in "
                         "floating point, leaving nothing to quantize; keep fewer layers, e.g. --set "
                         "layers.keep_fp=@in,@out (the default)")
    return quantized, kept
