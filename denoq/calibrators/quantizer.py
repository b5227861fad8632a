"""ONNX quantizer semantics in PyTorch (docs/architecture.md, Quantizer semantics).

QuantizeLinear:   q = saturate(round_half_to_even(x / s) + z)
DequantizeLinear: x̂ = (q − z) · s

computed in the graph's own op order: a true division by the scale (not a multiply by its reciprocal as
`torch.fake_quantize_*` does), rounding onto the number grid (`denoq.formats`: `torch.round` half to even for
integers, E4M3 / E2M1 round to nearest even for the floating-point grids), then saturation. Every calibrator and
the simulation quantize through these functions only.
"""

from __future__ import annotations

import torch

from denoq.errors import DenoqError
from denoq.formats import BLOCK_AMAX_FLOOR, nvfp4_block_scale, to_grid
from denoq.plan import ActQuant, qrange


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, qmin: float,
             qmax: float, fmt: str = "int") -> torch.Tensor:
    """QuantizeLinear, returning the grid values as a float tensor: clamp(round(x / s) + z, qmin, qmax) for
    integers; the E4M3 / E2M1 value of x / s for `fmt` fp8 / fp4 (zero point 0)."""
    if fmt == "int":
        return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return to_grid(x / scale, fmt, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int) -> torch.Tensor:
    """DequantizeLinear: (q − z) · s."""
    return (q - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, qmin: float,
                  qmax: float, fmt: str = "int") -> torch.Tensor:
    """DequantizeLinear(QuantizeLinear(x)): the value a Q/DQ pair passes on."""
    return dequantize(quantize(x, scale, zero_point, qmin, qmax, fmt), scale, zero_point)


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


def block_amax(x: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """max |x| over each block of `block` consecutive elements along `axis`, kept in place as a size-1 dimension
    after the block index: `[…, C / block, 1, …]` (the graph's Reshape → Abs → ReduceMax)."""
    axis = axis % x.dim()
    shape = x.shape
    if shape[axis] % block:
        raise DenoqError(f"dynamic block quantization needs the {shape[axis]} channels to be a multiple of the "
                         f"block size {block}; choose a block size that divides every quantized layer's inputs")
    xb = x.reshape(*shape[:axis], shape[axis] // block, block, *shape[axis + 1:])
    return xb.abs().amax(dim=axis + 1, keepdim=True)


def fake_quant_blocks(x: torch.Tensor, q: ActQuant, table: torch.Tensor, axis: int) -> torch.Tensor:
    """`q`'s dynamic block quantizer (`ActQuant.block_size` > 0) on `x`, blocks along `axis` (the channels):
    s = max(amax, BLOCK_AMAX_FLOOR) / qmax per block (`int`), or NVFP4's `fp8(amax / (6 · g)) · g` (`fp4`, with g
    = `table`, the quantizer's table row of each sample `[B]`), then `DQ(Q(x; s))` on the grid."""
    axis = axis % x.dim()
    amax = block_amax(x, axis, q.block_size)
    qmin, qmax = q.qrange
    if q.format == "fp4":
        scale = nvfp4_block_scale(amax, table.to(x.device, torch.float32).view(-1, *([1] * (amax.dim() - 1))))
    else:
        scale = torch.clamp(amax, min=BLOCK_AMAX_FLOOR) / qmax
    xb = x.reshape((*amax.shape[:axis + 1], q.block_size, *x.shape[axis + 1:]))
    return fake_quantize(xb, scale, 0, qmin, qmax, q.format).reshape(x.shape)


def fake_quant_act(x: torch.Tensor, q: ActQuant, scale: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """`x` through the activation quantizer `q` with `scale` (broadcastable to `x`, or `[B]` per sample for a
    block quantizer's global scale): a per-tensor Q/DQ on `q`'s grid, or its dynamic blocks along `axis`."""
    if q.block_size:
        return fake_quant_blocks(x, q, scale, axis)
    qmin, qmax = q.qrange
    return fake_quantize(x, scale, q.zero_point, qmin, qmax, q.format)
