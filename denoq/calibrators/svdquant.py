"""SVDQuant: Li et al., "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models" (ICLR
2025). Our own implementation from the paper's equations.

For a layer Y = XW (W as the matrix `[out, in·kh·kw]` of `layer_matrix`, X its input; channel j of X meets the
columns of input channel j):

1. Smoothing (§3, eq. 3, SmoothQuant's migration): λ_j = max|X_j|^α / max|W_:,j|^(1−α), so that
   X̂ = X · diag(λ)⁻¹ and Ŵ = W · diag(λ) compute the same product with the activation outliers moved into the
   weights. α = `svdquant.alpha`; λ is clamped to [1e-4, 1e4] (a dead channel keeps λ = 1).
2. Low-rank branch (eq. 5): the truncated SVD Ŵ ≈ L1 L2 with L1 = U_r Σ_r `[out, r]`, L2 = V_rᵀ `[r, in·kh·kw]`,
   both rounded to float16 (the branch runs in 16 bits), takes the weights' largest singular directions.
3. Residual: R = Ŵ − L1 L2 (from the rounded branch, so branch + residual rebuild Ŵ) is what the weight stage
   quantizes to 4 bits (RTN or GPTQ, whose Hessians then see X̂).

`smoothed_model` returns a copy of the model in which each such layer holds R and computes `layer_R(X̂) +
L2/L1 branch(X̂)` (forward hooks): the weight stage and the activation statistics run on it unchanged, and what they
observe is exactly what the deployed layer sees. `Decomposition.attach` then puts the smoothing factors diag(λ)⁻¹
(`LayerPlan.input_factors`) and the branch into the layer's plan.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from denoq.calibrators.calibset import CalibrationSet, run_hooked
from denoq.calibrators.distributed import all_reduce
from denoq.calibrators.layer_matrix import from_matrix, weight_matrix
from denoq.log import bar
from denoq.plan import LayerPlan

LAMBDA_RANGE = (1e-4, 1e4)


@dataclass(frozen=True)
class SvdQuantSettings:
    """`rank` r of the low-rank branch (0: smoothing only) and the smoothing strength `alpha` (0: no smoothing)."""

    rank: int
    alpha: float


@dataclass
class Decomposition:
    """One layer's smoothing factors diag(λ)⁻¹ `[in]` and branch (L2 in the weight's layout, L1 `[out, r]`)."""

    factors: torch.Tensor
    down: torch.Tensor | None
    up: torch.Tensor | None

    def attach(self, lp: LayerPlan) -> LayerPlan:
        """`lp` with the smoothing factors and the branch (float32 holding float16 numbers)."""
        return dataclasses.replace(lp, input_factors=self.factors.clone(),
                                   lowrank_down=None if self.down is None else self.down.clone(),
                                   lowrank_up=None if self.up is None else self.up.clone())


class _Smooth:
    """Forward pre-hook: the layer's input times its smoothing factors (channel axis 1 for Conv2d, else last)."""

    def __init__(self, factors: torch.Tensor, conv: bool) -> None:
        self.factors = factors.view(-1, 1, 1) if conv else factors

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (args[0] * self.factors.to(args[0].device), *args[1:])


class _Branch:
    """Forward hook: the low-rank branch on the (smoothed) input added to the layer's output."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(out.device)
        if isinstance(module, nn.Conv2d):
            return out + nn.functional.conv2d(args[0], w, None, module.stride, module.padding, module.dilation)
        return out + nn.functional.linear(args[0], w)


def channel_amax(model: nn.Module, layers: dict[str, nn.Module], calib: CalibrationSet) -> dict[str, torch.Tensor]:
    """max |X_j| per input channel j of every layer over the calibration inputs (float32 `[in]`)."""
    amax: dict[str, torch.Tensor] = {}

    def hook(name: str, conv: bool):
        def pre(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().abs()
            m = x.transpose(0, 1).flatten(1).amax(1) if conv else x.flatten(0, -2).amax(0)
            amax[name] = m.float() if name not in amax else torch.maximum(amax[name], m.float())
        return pre

    run_hooked(model, calib, [m.register_forward_pre_hook(hook(n, isinstance(m, nn.Conv2d)))
                              for n, m in layers.items()])
    return {n: all_reduce(a, "max", "SVDQuant channel maxima") for n, a in sorted(amax.items())}  # every rank's


def decompose(module: nn.Module, x_amax: torch.Tensor, settings: SvdQuantSettings
              ) -> tuple[Decomposition, torch.Tensor]:
    """The layer's smoothing and branch (module docstring, steps 1-2) and its residual R in the weight's layout."""
    w = weight_matrix(module).detach().to(torch.float64)
    per_channel = w.shape[1] // x_amax.numel()  # kh·kw columns per input channel
    w_amax = w.abs().view(w.shape[0], -1, per_channel).amax(dim=(0, 2))
    lam = torch.ones_like(w_amax)
    if settings.alpha > 0:
        alive = (x_amax > 0) & (w_amax > 0)
        lam[alive] = (x_amax.double()[alive] ** settings.alpha / w_amax[alive] ** (1 - settings.alpha))
        lam = lam.clamp(*LAMBDA_RANGE)
    factors = (1.0 / lam).to(torch.float32)
    lam = (1.0 / factors.double())  # the graph multiplies by the float32 factors: fold their exact inverse
    w_hat = w * lam.repeat_interleave(per_channel)[None, :]
    rank = min(settings.rank, *w.shape)
    down = up = None
    residual = w_hat
    if rank > 0:
        u, s, vh = torch.linalg.svd(w_hat, full_matrices=False)
        up = (u[:, :rank] * s[:rank]).to(torch.float16).to(torch.float32)
        down2d = vh[:rank].to(torch.float16).to(torch.float32)
        residual = w_hat - up.double() @ down2d.double()
        down = down2d.view(rank, *module.weight.shape[1:])
    return Decomposition(factors, down, up), from_matrix(module, residual.to(torch.float32))


def smoothed_model(model: nn.Module, layers: dict[str, nn.Module], calib: CalibrationSet,
                   settings: SvdQuantSettings) -> tuple[nn.Module, dict[str, nn.Module], dict[str, Decomposition]]:
    """A copy of `model` whose `layers` hold their residuals R and compute `R(X̂) + branch(X̂)` (module docstring),
    its layers by name, and each layer's decomposition. Only nn.Conv2d with groups = 1 and nn.Linear take part."""
    amax = channel_amax(model, layers, calib)
    work = copy.deepcopy(model).eval()
    modules = dict(work.named_modules())
    parts: dict[str, Decomposition] = {}
    for name in bar(sorted(layers), desc="svdquant smoothing + low rank", unit="layer"):
        module = modules[name]
        if name not in amax or (isinstance(module, nn.Conv2d) and module.groups != 1):
            continue
        part, residual = decompose(module, amax[name], settings)
        with torch.no_grad():
            module.weight.copy_(residual)
        module.register_forward_pre_hook(_Smooth(part.factors, isinstance(module, nn.Conv2d)))
        if part.up is not None and part.down is not None:
            branch = (part.up @ part.down.flatten(1)).view(part.up.shape[0], *part.down.shape[1:])
            module.register_forward_hook(_Branch(branch))
        parts[name] = part
    return work, {name: modules[name] for name in layers}, parts
