"""The number grids quantized values live on, and the rounding onto them (docs/architecture.md, Quantizer semantics).

- `int`: two's-complement integers of `bits` bits, `round_half_to_even`, saturated to [−2^(b−1), 2^(b−1) − 1]
  (symmetric weights use [−qmax, qmax]); unsigned [0, 2^b − 1].
- `fp8`: OCP FP8 E4M3FN (ONNX `float8e4m3fn`), the grid of TensorRT's FP8 on Hopper: round to nearest even,
  saturated to ±448 (ONNX QuantizeLinear's default `saturate=1`).
- `fp4`: OCP FP4 E2M1 (ONNX `float4e2m1`, opset 23), the element type of NVFP4 on Blackwell: the values
  ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, round to nearest even (ties go to the even code), saturated to ±6.

`to_grid(v, fmt)` rounds already-scaled values (`v = x / s`) onto a grid and returns them as float32; every
calibrator and the simulation round through it, so the PyTorch side reproduces ONNX's QuantizeLinear exactly
(tested against `onnx.reference` and ONNX Runtime).

NVFP4 (`fp4` with blocks of 16): the scale of each block is itself an FP8 E4M3 number times one float32 scale per
tensor, `s_b = fp8(amax_b / (6 · g)) · g` (two-level scaling; `nvfp4_block_scale`).
"""

from __future__ import annotations

import torch

FORMATS = ("int", "fp8", "fp4")
FP8_MAX = 448.0
FP4_MAX = 6.0
NVFP4_BLOCK = 16
#: The ONNX opset whose QuantizeLinear / DequantizeLinear take float4e2m1.
FP4_OPSET = 23
#: The smallest positive FP8 E4M3 number (a subnormal): NVFP4 block scales are kept at or above it, so that an
#: all-zero block divides by a positive scale instead of 0.
FP8_TINY = 2.0**-9
#: A dynamic integer block's amax is at least this, so an all-zero block divides by a positive scale.
BLOCK_AMAX_FLOOR = 2.0**-24


def grid_max(fmt: str, bits: int) -> float:
    """The largest magnitude a symmetric quantizer of `fmt` represents: 2^(b−1) − 1, 448 or 6."""
    if fmt == "int":
        return float(2 ** (bits - 1) - 1)
    if fmt == "fp8":
        return FP8_MAX
    if fmt == "fp4":
        return FP4_MAX
    raise ValueError(f"unknown number format {fmt!r}; expected one of {FORMATS}")


def fp8_round(v: torch.Tensor) -> torch.Tensor:
    """`v` rounded to E4M3FN (nearest even) and saturated to ±448, as float32."""
    return v.to(torch.float32).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def fp4_round(v: torch.Tensor) -> torch.Tensor:
    """`v` rounded to E2M1 (nearest even) and saturated to ±6, as float32.

    Within each binade the E2M1 values are evenly spaced (0.5 below 2, 1 in [2, 4), 2 in [4, 6]) and the parity of
    a value's multiple of that spacing is the parity of its code, so `torch.round` (half to even) on `v / spacing`
    is exactly round-to-nearest-even on the codes.
    """
    v = v.to(torch.float32)
    a = v.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.copysign(torch.clamp(torch.round(a / step) * step, max=FP4_MAX), v)


def to_grid(v: torch.Tensor, fmt: str, qmin: float, qmax: float) -> torch.Tensor:
    """Scaled values `v` on the grid of `fmt`: integers round half to even and saturate to [qmin, qmax]; the
    floating-point grids round to nearest even and saturate to their own range."""
    if fmt == "int":
        return torch.clamp(torch.round(v), qmin, qmax)
    if fmt == "fp8":
        return fp8_round(v)
    if fmt == "fp4":
        return fp4_round(v)
    raise ValueError(f"unknown number format {fmt!r}; expected one of {FORMATS}")


def nvfp4_block_scale(amax: torch.Tensor, global_scale: torch.Tensor | float) -> torch.Tensor:
    """NVFP4's two-level block scale `s_b = fp8(max(amax_b / 6 / g, FP8_TINY)) · g` (float32), computed in the
    graph's order: Div(amax, 6), Div(·, g) inside QuantizeLinear, DequantizeLinear's multiply by g."""
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=amax.device)
    ratio = torch.clamp((amax.to(torch.float32) / FP4_MAX) / g, min=FP8_TINY)
    return fp8_round(ratio) * g
