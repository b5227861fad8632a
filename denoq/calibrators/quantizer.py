"""ONNX quantizer semantics in PyTorch (docs/architecture.md, Quantizer semantics).

QuantizeLinear:   q = saturate(round_half_to_even(x / s) + z)
DequantizeLinear: x̂ = (q − z) · s

computed in the graph's own op order: a true division by the scale (not a multiply by its reciprocal as
`torch.fake_quantize_*` does), `torch.round` (half to even), then saturation to the integer range. Every
calibrator and the simulation quantize through these functions only.
"""

from __future__ import annotations

import torch

from denoq.plan import qrange


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, qmin: int,
             qmax: int) -> torch.Tensor:
    """QuantizeLinear, returning the integers as a float tensor: clamp(round(x / s) + z, qmin, qmax)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int) -> torch.Tensor:
    """DequantizeLinear: (q − z) · s."""
    return (q - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, qmin: int,
                  qmax: int) -> torch.Tensor:
    """DequantizeLinear(QuantizeLinear(x)): the value a Q/DQ pair passes on."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)


def straight_through(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`value` in the forward pass (exactly: `x − x.detach()` is 0), the identity in `x` in the backward pass (the
    straight-through estimator)."""
    return value.detach() + (x - x.detach())


def symmetric_weight_quant(w: torch.Tensor, bits: int, clip: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric per-output-channel weights: s_c = max|w_c| / (2^(b-1) − 1).

    Returns (int8 integers in PyTorch layout, float32 scales `[out]`). `clip` optionally replaces max|w_c|.
    Channels that are all zero get scale 1 (their integers are 0 either way).
    """
    _, qmax = qrange(bits, signed=True)
    amax = w.detach().abs().flatten(1).amax(dim=1) if clip is None else clip
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).to(torch.float32)
    # symmetric weights use [-qmax, qmax] (zero point 0), as TensorRT requires
    q = quantize(w.detach().to(torch.float32), scale.view(-1, *([1] * (w.dim() - 1))), 0, -qmax, qmax)
    return q.to(torch.int8), scale
