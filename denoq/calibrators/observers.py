"""Activation observers: a clipping interval [lo, hi] from observed values, then ONNX scale and zero point.

- `minmax`: the observed extremes.
- `percentile`: the p-th percentile of |x| (symmetric) or the (100−p, p) percentiles (asymmetric).
- `mse`: the clipping that minimizes the mean squared fake-quantization error over the observed values
  (grid over shrink factors of the min-max interval).
- `large_magnitude`: the interval of Kim et al., "Toward INT4 Fixed-Point Training via Exploring Quantization
  Error for Gradients" (ECCV 2024): clip so that the saturated fraction of values equals ρ / (2^b − 1), i.e. the
  quantile at 1 − ρ/(2^b − 1) of |x| (split over both tails when asymmetric). Large-magnitude values keep
  their precision while the bulk is not starved of levels.

Signed activations are symmetric with zero point 0 (the `trt` target); unsigned ones are asymmetric uint8. On a
floating-point grid (`format` fp8; `denoq.formats`) the interval is symmetric and s = max|[lo, hi]| / 448: with
`minmax` that is the amax calibration FP8 recipes use; `mse` searches the clipping on the FP8 grid itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from denoq.calibrators.quantizer import fake_quantize
from denoq.formats import grid_max
from denoq.plan import qrange

OBSERVERS = ("minmax", "percentile", "mse", "large_magnitude")
MIN_RANGE = 1e-8
MSE_GRID = 100


@dataclass(frozen=True)
class ObserverSettings:
    """What an observer needs: method, bits, signedness and the method's parameter."""

    method: str = "mse"
    bits: int = 8
    signed: bool = True
    percentile: float = 99.99
    lm_rho: float = 1.0
    format: str = "int"


def grid_range(s: ObserverSettings) -> tuple[float, float]:
    """The saturation range of the quantizers `s` describes: the integer range, or ±(the grid's largest value)."""
    if s.format == "int":
        return qrange(s.bits, s.signed)
    return -grid_max(s.format, s.bits), grid_max(s.format, s.bits)


def qparams(lo: float, hi: float, bits: int, signed: bool, fmt: str = "int") -> tuple[float, int]:
    """(scale, zero point) for the interval [lo, hi] (widened to contain 0, as a zero point must exist).

    Signed (and every floating-point grid): symmetric, s = max(|lo|, |hi|) / qmax with qmax = 2^(b−1) − 1 or the
    grid's largest value, z = 0. Unsigned: s = (hi − lo) / (2^b − 1), z = qmin − round(lo / s) saturated to the
    range.
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if signed or fmt != "int":
        return max(max(-lo, hi), MIN_RANGE) / grid_max(fmt, bits), 0
    qmin, qmax = qrange(bits, signed)
    scale = max(hi - lo, MIN_RANGE) / (qmax - qmin)
    zp = int(min(max(qmin - round(lo / scale), qmin), qmax))
    return scale, zp


def _quantile(values: torch.Tensor, q: float) -> float:
    return float(torch.quantile(values.double(), min(max(q, 0.0), 1.0)))


def clip_range(values: torch.Tensor, amin: float, amax: float, s: ObserverSettings) -> tuple[float, float]:
    """The clipping interval [lo, hi] chosen by observer `s.method` on sampled `values` with exact extremes."""
    if s.method == "minmax":
        return (-max(-amin, amax), max(-amin, amax)) if s.signed else (amin, amax)
    if s.method in ("percentile", "large_magnitude"):
        tail = 1.0 - s.percentile / 100.0 if s.method == "percentile" else s.lm_rho / (2**s.bits - 1)
        if s.signed:
            c = _quantile(values.abs(), 1.0 - tail)
            return -c, c
        return _quantile(values, tail / 2), _quantile(values, 1.0 - tail / 2)
    if s.method == "mse":
        return _mse_range(values, amin, amax, s)
    raise ValueError(f"unknown observer {s.method!r}")


def _mse_range(values: torch.Tensor, amin: float, amax: float, s: ObserverSettings) -> tuple[float, float]:
    signed = s.signed or s.format != "int"
    lo0, hi0 = clip_range(values, amin, amax, ObserverSettings("minmax", s.bits, signed, format=s.format))
    qmin, qmax = grid_range(s)
    best, best_err = (lo0, hi0), float("inf")
    for alpha in torch.linspace(1.0 / MSE_GRID, 1.0, MSE_GRID).tolist():
        scale, zp = qparams(lo0 * alpha, hi0 * alpha, s.bits, s.signed, s.format)
        err = float((fake_quantize(values, torch.tensor(scale), zp, qmin, qmax, s.format)
                     - values).pow(2).mean())
        if err < best_err:
            best, best_err = (lo0 * alpha, hi0 * alpha), err
    return best


def observe_qparams(values: torch.Tensor, amin: float, amax: float, s: ObserverSettings) -> tuple[float, int]:
    """Observer + `qparams`: the (scale, zero point) of one activation tensor."""
    lo, hi = clip_range(values, amin, amax, s)
    return qparams(lo, hi, s.bits, s.signed, s.format)
