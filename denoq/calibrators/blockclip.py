"""The clipping ratio of dynamic INT4 activation blocks: each block's scale is `c · amax / qmax` rather than
`amax / qmax`, with one c ∈ (0, 1] per layer chosen on the calibration inputs.

At 4 bits a block's 15 levels are spread over [−amax, amax], so a single large value starves the rest; clipping it
(QuaRot's and Atom's fixed ratio of 0.9 for their dynamic per-token quantizers) trades a saturated outlier for a
finer grid. Here the ratio is the one of `CLIP_GRID` that minimizes the mean squared error of the fake-quantized
layer input over a subset of the calibration batches (the input as the deployed layer sees it: after SVDQuant's
smoothing where there is one). In the graph it is one constant Mul on the block amax (`denoq.passes.blockquant`).
"""

from __future__ import annotations

import torch
from torch import nn

from denoq.calibrators.calibset import CalibrationSet, run_hooked
from denoq.calibrators.quantizer import fake_quant_blocks
from denoq.plan import ActQuant

CLIP_GRID = tuple(round(0.5 + 0.05 * i, 2) for i in range(11))  # 0.50, 0.55, …, 1.00
BATCHES = 8  # calibration batches of 64 inputs each whose layer inputs are scored


def clip_ratios(model: nn.Module, layers: dict[str, nn.Module], calib: CalibrationSet,
                quants: dict[str, ActQuant]) -> dict[str, float]:
    """The ratio of CLIP_GRID of least fake-quantization MSE for each layer of `quants` (dynamic int blocks)."""
    errors = {name: torch.zeros(len(CLIP_GRID), dtype=torch.float64) for name in quants}
    ratios = torch.tensor(CLIP_GRID, dtype=torch.float32)

    def hook(name: str, axis: int):
        def pre(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().to(torch.float32)
            for i, c in enumerate(ratios):
                q = fake_quant_blocks(x, quants[name], c.expand(x.shape[0]), axis)
                errors[name][i] += float((q - x).pow(2).sum())
        return pre

    subset = calib.take(_evenly(len(calib.t), BATCHES), None)
    run_hooked(model, subset, [layers[n].register_forward_pre_hook(hook(n, 1 if isinstance(layers[n], nn.Conv2d)
                                                                           else -1)) for n in sorted(quants)])
    return {name: CLIP_GRID[int(torch.argmin(err))] for name, err in errors.items()}


def _evenly(n: int, k: int) -> list[int]:
    """k evenly spaced indices of range(n) (all of them when n ≤ k)."""
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(min(k, n))})
