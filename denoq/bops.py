"""Bit operations (BOPs) of one model call: the cost measure of PTQD's and IGQ-ViT's tables.

BOPs = Σ over the quantizable layers (Conv2d, Linear) of MACs × weight bits × activation bits (van Baalen et al.,
"Bayesian Bits", 2020; the count PTQD's step-aware mixed precision reports), plus, for a layer whose input has G
IGQ-ViT groups, (G − 1) float multiply-adds per output element that rescale and sum the groups' partial sums
(`group_bops`), and for a layer with SVDQuant's rank-r branch its MACs, P·r·(in·kh·kw + out) for P output
positions, at BRANCH_BITS × BRANCH_BITS (the float16 branch TensorRT runs). A layer kept in floating point, or
whose activations stay in floating point, counts FLOAT_BITS for them: the graphs denoq runs are FP32. Other ops
(normalizations, softmax, the attention matmuls between activations, elementwise ops) are not counted. MACs are
counted by forward hooks on one call of the model with a batch of one; bottom layer (torch and the plan type only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from denoq.layers import quantizable_layers
from denoq.plan import QuantPlan

FLOAT_BITS = 32
BRANCH_BITS = 16


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    """MACs of one Conv2d / Linear call producing `out` (batch included)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw
    return out.numel() * module.in_features


def layer_macs(model: nn.Module, call: Callable[[], object]) -> dict[str, int]:
    """MACs of every quantizable layer of `model` in one `call()` (run it with a batch of one), sorted by name.
    A layer the call does not reach counts 0; a layer called twice counts both calls."""
    layers = quantizable_layers(model)
    macs = dict.fromkeys(layers, 0)
    handles = [m.register_forward_hook(lambda mod, args, out, n=name: macs.__setitem__(n, macs[n] + _macs(mod, out)))
               for name, m in layers.items()]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return macs


def layer_bits(plan: QuantPlan, name: str) -> tuple[int, int]:
    """(weight bits, activation bits) of a layer as the plan quantizes it; FLOAT_BITS where it does not."""
    lp = plan.layers.get(name)
    if lp is None:
        return FLOAT_BITS, FLOAT_BITS
    return lp.weight_bits, FLOAT_BITS if lp.input is None else lp.input.bits


def group_bops(macs: int, outputs: int, weight_bits: int, act_bits: int, groups: int) -> int:
    """BOPs of one layer call with `groups` activation groups (module docstring)."""
    return macs * weight_bits * act_bits + (groups - 1) * outputs * FLOAT_BITS * FLOAT_BITS


def plan_bops(macs: dict[str, int], plan: QuantPlan | None) -> int:
    """BOPs of one model call: Σ MACs × weight bits × activation bits (+ the IGQ group term; `plan` None = the FP
    model)."""
    if plan is None:
        return sum(macs.values()) * FLOAT_BITS * FLOAT_BITS
    total = 0
    for name, m in macs.items():
        wb, ab = layer_bits(plan, name)
        lp = plan.layers.get(name)
        groups = 1 if lp is None or lp.input_groups is None else lp.input_groups.groups
        outputs = 0 if lp is None else m // max(int(lp.weight_int[0].numel()), 1)
        total += group_bops(m, outputs, wb, ab, groups)
        if lp is not None and lp.rank:
            out_channels, per_output = lp.weight_int.shape[0], int(lp.weight_int[0].numel())
            positions = outputs // out_channels
            total += positions * lp.rank * (per_output + out_channels) * BRANCH_BITS * BRANCH_BITS
    return total
