"""OBQ and GPTQ weight rounding: Frantar & Alistarh, "Optimal Brain Compression" (OBC, NeurIPS 2022) and
Frantar et al., "GPTQ" (ICLR 2023). Our own implementation from the papers' equations.

A layer with weights W `[rows = out, cols]` and calibration inputs X `[cols, N]` (one column per input vector; a
Conv2d's input is unfolded into its kernel patches: the layer as a matrix, `layer_matrix.py`) is rounded to
minimize the output error

    E(Ŵ) = ‖WX − ŴX‖²_F / N = ½ tr(ΔW H ΔWᵀ),   ΔW = W − Ŵ,   H = 2XXᵀ / N                     (GPTQ eq. 1)

Rows are independent in E and share H. Fixing weight q of a row w to quant(w_q) while the weights F not yet fixed
absorb the error optimally (Optimal Brain Surgeon) costs δE_q and moves the free weights by δ_F:

    δE_q = ½ (w_q − quant(w_q))² / [H_F⁻¹]_qq                                                  (GPTQ eq. 2)
    δ_F  = −(w_q − quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:,q}                                    (GPTQ eq. 2)

(the ½ because H = 2XXᵀ/N carries the 2: δE is then in the units of E), and q leaves the free set by one step of
Gaussian elimination on the inverse Hessian

    H_{F∖q}⁻¹ = H_F⁻¹ − (H_F⁻¹)_{:,q} (H_F⁻¹)_{q,:} / [H_F⁻¹]_qq                               (GPTQ eq. 3, OBC Lemma 1)

- OBQ (OBC): each row greedily fixes the free weight of least δE_q, then applies δ_F and eq. 3. O(rows·cols³).
  The greedy order is myopic: it beats GPTQ's fixed order by a few percent on moderately correlated inputs, but
  on nearly low-rank H (a few directions plus little noise) it lost to GPTQ by 1.3–3× in our tests.
- GPTQ: all rows fix the columns in one order (left to right, or "act order": descending diag H), so eq. 3 is
  shared by the rows, and the rows of H_F⁻¹ it produces are the rows of the upper Cholesky factor U of
  H⁻¹ = UᵀU: U_{q,q:} = (H_F⁻¹)_{q,q:} / √[H_F⁻¹]_qq with F = {q, q+1, …}. δ_F is applied lazily in blocks of
  B columns (GPTQ Algorithm 1), which is exact: a column only needs the errors of the columns before it.

Each step is the exact optimum given the fixed weights, so the reported loss Σ δE_q equals E for the dampened
Hessian, `layer_output_error(W, Ŵ, H + λI)`, to float rounding (tested). Both solvers work in float64; the
rounding itself is the graph's float32 `round(w / s)` (docs/architecture.md, Quantizer semantics).

Quantizer: symmetric, zero point 0, integers in [−qmax, qmax], qmax = 2^(b−1) − 1 (TensorRT), scale per row and
input-channel group s = max|w| / qmax (1 for an all-zero group), as `quantizer.symmetric_weight_quant`. With
`format` fp8 the grid is E4M3 (qmax = 448); with fp4 it is NVFP4: E2M1 values (qmax = 6) in groups whose scale is
the two-level `fp8(max|w| / (6 · g)) · g` with g = max|W| / (6 · 448) per layer (`formats.nvfp4_block_scale`).
The rounding step is always the grid's own (`formats.to_grid`), so GPTQ's error feedback sees the non-uniform FP
grid as it is.
A group of `group_size` input channels is group_size·kh·kw columns of a Conv2d, so the scales are exactly the
plan's blocked layout `[out, in // group_size]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from denoq.calibrators.choices import WEIGHT_BITS
from denoq.calibrators.layer_matrix import check_module, from_matrix
from denoq.calibrators.quantizer import quantize
from denoq.errors import DenoqError
from denoq.formats import FP4_MAX, FP8_MAX, fp8_round, grid_max, nvfp4_block_scale
from denoq.layers import layer_op
from denoq.plan import LayerPlan


# -- settings and result ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GptqSettings:
    """Weight rounding settings.

    bits: one of `choices.WEIGHT_BITS`. group_size: 0 = one scale per output row, else the scale block along the
    input channels (in input channels; a Conv2d group spans group_size·kh·kw columns). damp: λ = damp · mean(diag H)
    is added to the diagonal. block: GPTQ's lazy batch B (does not change the result). act_order: GPTQ processes
    columns by descending diag H; this implies static groups, since scales must stay with contiguous input-channel
    groups.
    static_groups: group scales from the original W, before any error propagation (else GPTQ computes each group's
    scale from the updated weights when it reaches the group's first column, as the paper does).
    """

    bits: int
    group_size: int = 0
    damp: float = 0.01
    block: int = 128
    act_order: bool = False
    static_groups: bool = False
    format: str = "int"

    def __post_init__(self) -> None:
        if self.bits not in WEIGHT_BITS:
            raise DenoqError(f"weights.bits={self.bits} is not supported by GPTQ/OBQ rounding; use one of "
                             f"{', '.join(map(str, WEIGHT_BITS))}")
        if self.group_size < 0:
            raise DenoqError(f"weights.group_size={self.group_size} is negative; use 0 (per output channel) or a "
                             "divisor of the layers' input channels")
        if not self.damp >= 0:
            raise DenoqError(f"weights.damp={self.damp} must be ≥ 0; the usual value is 0.01")
        if self.block < 1:
            raise DenoqError(f"GPTQ block={self.block} must be ≥ 1; the usual value is 128")

    @property
    def qmax(self) -> float:
        return grid_max(self.format, self.bits)

    @property
    def uses_static_groups(self) -> bool:
        return self.group_size == 0 or self.static_groups or self.act_order


@dataclass
class WeightQuant:
    """Rounded weights: grid values `q` (float32 `[rows, cols]`: integers, E4M3 or E2M1 values), the scales they
    are multiplied by (float32 `[rows, n_groups]`, `[rows, 1]` for one per row; for NVFP4 the products s_b · g),
    NVFP4's `global_scale` g, and `loss` = Σ_q ½ (w_q − ŵ_q)² / [H_F⁻¹]_qq (GPTQ eq. 2 summed; None for `rtn`,
    which sees no H)."""

    q: torch.Tensor
    scale: torch.Tensor
    loss: float | None
    global_scale: float | None = None

    @property
    def columns_per_group(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantized(self) -> torch.Tensor:
        """Ŵ = q · s, each scale repeated over its group's columns, float32 `[rows, cols]`."""
        return self.q.to(torch.float32) * self.scale.repeat_interleave(self.columns_per_group, dim=1)


def group_columns(module: nn.Module, group_size: int) -> int:
    """Columns of `weight_matrix(module)` in one group of `group_size` input channels (0 stays 0)."""
    check_module(module)
    if group_size == 0:
        return 0
    cin = module.weight.shape[1]
    if cin % group_size:
        raise DenoqError(f"weights.group_size={group_size} does not divide this layer's {cin} input channels; "
                         f"choose a divisor of {cin} (e.g. a power of two that divides all layers) or 0")
    return group_size * module.weight[0, 0].numel()


def layer_plan(name: str, module: nn.Module, wq: WeightQuant, settings: GptqSettings) -> LayerPlan:
    """The QuantPlan entry of the rounded layer (activation quantizers left unset for the caller). NVFP4's block
    scales are stored as their FP8 numbers s_b (recovered exactly from the float32 products s_b · g)."""
    scale = wq.scale[:, 0] if settings.group_size == 0 else wq.scale
    if wq.global_scale is not None:
        scale = fp8_round(scale / wq.global_scale)
    values = from_matrix(module, wq.q).contiguous()
    return LayerPlan(name=name, op=layer_op(module), weight_bits=settings.bits,
                     weight_int=values.to(torch.int8 if settings.format == "int" else torch.float8_e4m3fn),
                     weight_scale=scale.contiguous(), block_size=settings.group_size, weight_format=settings.format,
                     weight_global_scale=wq.global_scale)


# -- shared pieces -------------------------------------------------------------------------------------------
def _group_width(w: torch.Tensor, settings: GptqSettings, columns_per_group: int | None) -> int:
    """Columns per scale; `columns_per_group` defaults to settings.group_size (right for Linear)."""
    cols = w.shape[1]
    cpg = settings.group_size if columns_per_group is None else columns_per_group
    if settings.group_size == 0:
        if cpg != 0:
            raise DenoqError(f"columns_per_group={cpg} given with group_size=0; pass group_columns(module, "
                             "settings.group_size)")
        return cols
    if cpg <= 0 or cpg % settings.group_size or cols % cpg:
        raise DenoqError(f"weights.group_size={settings.group_size} ({cpg} columns per group) does not divide this "
                         f"layer's {cols} weight columns; choose a divisor of its input channels, or 0")
    return cpg


def _global_scale(w: torch.Tensor, settings: GptqSettings) -> float | None:
    """NVFP4's per-layer g = max|W| / (6 · 448) (1 for an all-zero layer); None for the other grids."""
    if settings.format != "fp4":
        return None
    amax = float(w.detach().abs().max().to(torch.float32))
    return float(torch.tensor(amax / (FP4_MAX * FP8_MAX), dtype=torch.float32)) if amax > 0 else 1.0


def _scales(w: torch.Tensor, settings: GptqSettings, cpg: int, g: float | None) -> torch.Tensor:
    """s = max|w| / qmax per row and group of `cpg` columns, float32 `[rows, cols / cpg]`; 1 for all-zero groups;
    NVFP4's s_b · g when `g` is given."""
    amax = w.abs().reshape(w.shape[0], -1, cpg).amax(dim=2).to(torch.float32)
    if g is not None:
        return nvfp4_block_scale(amax, g)
    return torch.where(amax > 0, amax / settings.qmax, torch.ones_like(amax))


def _round(w: torch.Tensor, s: torch.Tensor, settings: GptqSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, ŵ = q·s): the float32 graph rounding q = grid(w / s) saturated to ±qmax; ŵ returned as float64."""
    q = quantize(w.to(torch.float32), s, 0, -settings.qmax, settings.qmax, settings.format)
    return q, (q * s).to(torch.float64)


def _prepare(w: torch.Tensor, h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 copies of W and the dampened H. Dead inputs (H_ii = 0: always zero) get H_ii = 1 and W_:i = 0,
    then H += λI with λ = damp · mean(diag H)."""
    if h.shape != (w.shape[1], w.shape[1]):
        raise DenoqError(f"Hessian of shape {tuple(h.shape)} does not match weights {tuple(w.shape)}; expected "
                         f"({w.shape[1]}, {w.shape[1]}) from this layer's HessianAccumulator")
    w = w.detach().to(torch.float64).clone()
    h = h.detach().to(w.device, torch.float64).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    return w, h


class HessianNotPositiveDefinite(DenoqError):
    """The dampened Hessian has no Cholesky factor (callers may retry with more dampening)."""


def _cholesky(h: torch.Tensor, upper: bool = False) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(h, upper=upper)
    if int(info) != 0:
        raise HessianNotPositiveDefinite("the layer Hessian is not positive definite after dampening; raise "
                                         "weights.damp (e.g. 0.1) or calibrate with more samples")
    return factor


# -- the algorithms ------------------------------------------------------------------------------------------
def rtn(w: torch.Tensor, settings: GptqSettings, columns_per_group: int | None = None) -> WeightQuant:
    """Round to nearest with the same scales as `gptq`/`obq` with static groups: q = clamp(round(w / s))."""
    cpg = _group_width(w, settings, columns_per_group)
    w32 = w.detach().to(torch.float32)
    g = _global_scale(w32, settings)
    scale = _scales(w32, settings, cpg, g)
    q = quantize(w32, scale.repeat_interleave(cpg, dim=1), 0, -settings.qmax, settings.qmax, settings.format)
    return WeightQuant(q=q, scale=scale, loss=None, global_scale=g)


def gptq(w: torch.Tensor, h: torch.Tensor, settings: GptqSettings,
         columns_per_group: int | None = None) -> WeightQuant:
    """GPTQ (Algorithm 1): columns in a fixed order, errors spread with the Cholesky rows of H⁻¹ (eq. 2, 3),
    lazily in blocks of `settings.block` columns. `columns_per_group`: see `group_columns` (Conv2d)."""
    cpg = _group_width(w, settings, columns_per_group)
    rows, cols = w.shape
    w, h = _prepare(w, h, settings.damp)
    block = settings.block
    g = _global_scale(w, settings)
    scale = _scales(w, settings, cpg, g)                            # static: from the original W
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if settings.act_order else \
        torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    s_col = scale.repeat_interleave(cpg, dim=1)[:, perm]           # the scale of each (permuted) column
    u = _cholesky(torch.cholesky_inverse(_cholesky(h)), upper=True)  # H⁻¹ = UᵀU
    q_all = torch.zeros(rows, cols, dtype=torch.float32, device=w.device)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=torch.float64, device=w.device)
        for j in range(i2 - i1):
            c = i1 + j
            if not settings.uses_static_groups and c % cpg == 0:
                # the group's scale from its current weights; those beyond this block still lack the lazy update
                end = c + cpg
                current = torch.cat([w1[:, j:min(end, i2) - i1], w[:, i2:end] - err1[:, :j] @ u[i1:c, i2:end]], 1)
                scale[:, c // cpg] = _scales(current, settings, cpg, g)[:, 0]
                s_col[:, c:end] = scale[:, c // cpg, None]
            q, wq = _round(w1[:, j], s_col[:, c], settings)
            q_all[:, c] = q
            err = (w1[:, j] - wq) / u[c, c]                       # (w_q − quant(w_q)) / √[H_F⁻¹]_qq
            loss += 0.5 * err.square().sum()                      # δE_q, eq. 2
            w1[:, j + 1:] -= err[:, None] * u[c, c + 1:i2][None, :]  # δ_F within the block, eq. 2
            err1[:, j] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]                          # δ_F of the whole block, lazily
    q_all = q_all[:, torch.argsort(perm)]
    return WeightQuant(q=q_all, scale=scale, loss=float(loss), global_scale=g)


def obq(w: torch.Tensor, h: torch.Tensor, settings: GptqSettings,
        columns_per_group: int | None = None) -> WeightQuant:
    """OBQ (OBC): per row, greedily fix the free weight of least δE_q (eq. 2), update the free weights by δ_F and
    remove q from H_F⁻¹ (eq. 3). Static group scales, as the order is data dependent. O(rows·cols³): small layers.
    Rows are processed together in chunks, each with its own copy of H_F⁻¹."""
    cpg = _group_width(w, settings, columns_per_group)
    rows, cols = w.shape
    w, h = _prepare(w, h, settings.damp)
    g = _global_scale(w, settings)
    scale = _scales(w, settings, cpg, g)
    s_col = scale.repeat_interleave(cpg, dim=1)
    hinv = torch.cholesky_inverse(_cholesky(h))
    q_all = torch.zeros(rows, cols, dtype=torch.float32, device=w.device)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    chunk = max(1, 2**22 // cols**2)
    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        wr, sr, n = w[r0:r1].clone(), s_col[r0:r1], r1 - r0
        hi = hinv.expand(n, cols, cols).clone()                    # H_F⁻¹ of each row
        free = torch.ones(n, cols, dtype=torch.bool, device=w.device)
        ar = torch.arange(n, device=w.device)
        for _ in range(cols):
            q, wq = _round(wr, sr, settings)
            d = hi.diagonal(dim1=1, dim2=2)                         # [H_F⁻¹]_qq
            p = torch.where(free, (wr - wq).square() / d, torch.inf).argmin(dim=1)  # least δE_q
            dp = d[ar, p]
            err = (wr[ar, p] - wq[ar, p]) / dp
            loss += 0.5 * (err.square() * dp).sum()                 # δE_q, eq. 2
            q_all[r0 + ar, p] = q[ar, p]
            col = hi[ar, :, p] * free                               # (H_F⁻¹)_{:,q}, zero on fixed weights
            wr -= err[:, None] * col                                # δ_F, eq. 2
            hi.baddbmm_(col[:, :, None], (col / dp[:, None])[:, None, :], alpha=-1)  # eq. 3, in place
            free[ar, p] = False
    return WeightQuant(q=q_all, scale=scale, loss=float(loss), global_scale=g)


def layer_output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """E = ½ tr((W − Ŵ) H (W − Ŵ)ᵀ), which for H = 2XXᵀ/N is exactly ‖WX − ŴX‖²_F / N (summed over outputs,
    averaged over the N input vectors). In float64."""
    d = (w.detach().to(torch.float64) - w_hat.detach().to(torch.float64))
    return 0.5 * float(((d @ h.to(torch.float64)) * d).sum())
