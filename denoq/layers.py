"""Which modules of a model are quantizable layers, by their PyTorch module names (DESIGN.md, Names).

Shared by calibrators (which quantize them) and export (which maps each to its ONNX node); bottom layer.
"""

from __future__ import annotations

from torch import nn

QUANTIZABLE_TYPES: dict[type[nn.Module], str] = {nn.Conv2d: "conv", nn.Linear: "linear"}


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d and Linear of `model`, keyed by module name, in sorted name order."""
    found = {name: m for name, m in model.named_modules() if type(m) in QUANTIZABLE_TYPES}
    return dict(sorted(found.items()))


def layer_op(module: nn.Module) -> str:
    """The QuantPlan op of a quantizable module: "conv" or "linear"."""
    return QUANTIZABLE_TYPES[type(module)]
