"""PTQD's statistics: the correlated part, the bias and the residual variance of the quantization noise per step.

He et al., "PTQD: Accurate Post-Training Quantization for Diffusion Models" (NeurIPS 2023, arXiv 2305.10657)
write the quantized model's noise prediction at timestep t as the FP prediction plus a quantization noise that is
partly correlated with it:

    Δ = ε_q − ε = k·ε + Δ′,      i.e.   ε_q = (1 + k)·ε + Δ′                                               (1)

with Δ′ uncorrelated with ε. Their correction then (i) removes the correlated part by dividing by (1 + k),
(ii) subtracts the residual's mean (the bias, per channel) and (iii) absorbs the residual's remaining variance
into the sampler's variance schedule (VSC); the residual is nearly Gaussian, which the paper's supplement checks
with D'Agostino and Pearson's test. This module measures, per sampler step t, on paired predictions of the FP and
the quantized model at the same FP-trajectory inputs (`collect_pairs`), the numbers (i)–(iii) need. With the
channel index c and b_c the channel's mean of Δ′, the model (1) fitted by least squares is

    Δ = k·ε + b_c + ρ,   ρ zero-mean per channel and uncorrelated with ε:                                   (2)
        k    = Σ_c Σ (ε − ε̄_c)(Δ − Δ̄_c) / Σ_c Σ (ε − ε̄_c)²,   clamped at k ≥ 0 (the official code's ReLU)
        b_c  = mean_c(r),   r = Δ − k·ε = ε_q − (1 + k)·ε                                                   (3)
        σ²   = mean over all N·C·H·W elements of (r − b_c)²    (= the mean over channels of each channel's
                                                                   population variance of r)                  (4)

Sums over the N predictions and the pixels, in float64. (2) is the common-slope fit with one intercept per channel:
the slope that minimizes the residual variance (4) left once the bias is subtracted, which is the quantity PTQD
corrects; when ε has zero mean per channel (ε̄_c = 0) it is ⟨Δ, ε⟩ / ⟨ε, ε⟩. (The official code regresses Δ on ε
with one global intercept and takes the bias as the mean of Δ, not of r; with ε̄_c ≈ 0 they agree.) The graph
head then computes (docs/architecture.md, Correction head)

    ε̂ = (ε_q − b_c) / (1 + k) = ε + ρ / (1 + k),                                                          (5)

so the noise left in ε̂ has variance σ² / (1 + k)² (`PtqdStats.corrected_var`): what the sampler absorbs.

Velocity prediction (flow matching, x_σ = (1 − σ) x₀ + σ ε, v = ε − x₀, Euler step x_σ' = x_σ + (σ' − σ) v̂).
Nothing in (1)–(5) uses what the output means: with v in place of ε, v_q = (1 + k)·v + b_c + ρ is fitted the same
way and the head v̂ = (v_q − b_c)/(1 + k) = v + ρ/(1 + k) removes the correlated part and the bias exactly as for ε.
What does not carry over is (iii): VSC absorbs σ²/(1 + k)² into the noise a DDPM step injects, and the Euler step
injects none, so the residual passes to x as (σ' − σ)·ρ/(1 + k) with nothing to absorb it; the same holds for DDIM
with η = 0. The compiler refuses `ptqd.enabled` for flow-matching models until (i)–(ii) are tested there: their
tables are indexed by the nearest training timestep, which Flux's t / 1000 inputs would collapse to rows 0 and 1.

Tables are indexed by the scheduler's training timestep t ∈ [0, T) (docs/architecture.md, QuantPlan); the steps that
were measured fill the others by `nearest_measured`. Everything is computed from streaming sums, batch by batch, so a
CalibrationSet of any size fits; the normality test runs on a deterministic subsample of the residual that does
not depend on how the predictions were split into batches (`StepSums`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats as scipy_stats

from denoq.calibrators.calibset import CalibrationSet
from denoq.calibrators.distributed import active, all_gather_objects, all_reduce
from denoq.errors import DenoqError
from denoq.log import bar
from denoq.sampling import EpsFn
from denoq.sampling.names import SAMPLERS

#: At most this many residual values per step go to the normality test (D'Agostino–Pearson wants ≥ 20).
NORMALITY_SAMPLES = 4096
MIN_NORMALITY_SAMPLES = 20
_HASH_MULT = 2654435761  # Knuth's multiplicative hash: spreads consecutive element indices over [0, 2^32)
_TENSOR_KEYS = ("ptqd.k", "ptqd.bias", "ptqd.residual_var", "ptqd.normality_p")


# -- one step ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepFit:
    """The fit (2)–(4) of one step: `k` ≥ 0, `slope` the unclamped least-squares k, `bias` b_c `[C]`,
    `residual_var` σ² of (4), `normality_p` D'Agostino–Pearson's p of the residual r − b_c (NaN with fewer than 20
    sampled values or a constant residual), `count` the elements per channel (N·H·W)."""

    k: float
    slope: float
    bias: torch.Tensor
    residual_var: float
    normality_p: float
    count: int

    @property
    def residual_std(self) -> float:
        return math.sqrt(self.residual_var)


class StepSums:
    """Streaming sums of one step's paired predictions, float64: per channel Σε, ΣΔ, Σε², ΣεΔ, ΣΔ² and the count.

    The normality subsample keeps element i (its flat index in the concatenation of all batches along N) iff
    h(i) = (i · 2654435761) mod 2³² < 2³² / 2^level, with the smallest level leaving at most `max_samples` values:
    deterministic, spread over samples, channels and pixels, and independent of the batch split.
    """

    def __init__(self, max_samples: int = NORMALITY_SAMPLES) -> None:
        self.max_samples = max_samples
        self.count = 0
        self.channels: int | None = None
        self.sums: torch.Tensor | None = None  # [5, C]: Σε, ΣΔ, Σε², ΣεΔ, ΣΔ²
        self._seen = 0
        self._level = 0
        self._kept = torch.empty(5, 0, dtype=torch.float64)  # rows: ε, Δ, channel, hash, element index

    def add(self, eps_fp: torch.Tensor, eps_q: torch.Tensor, where: str = "", rows: torch.Tensor | None = None) -> None:
        """Accumulate one batch of paired predictions `[N, C, ...]` (FP and quantized, same inputs); `rows`: the
        global indices of its N trajectories when they are one rank's shard (data-parallel calibration), else the
        batch follows the previous ones."""
        if eps_fp.shape != eps_q.shape or eps_fp.dim() < 2:
            raise DenoqError(f"PTQD{where}: FP and quantized predictions must have the same shape [N, C, ...], got "
                             f"{tuple(eps_fp.shape)} and {tuple(eps_q.shape)}; pass both models' outputs on the same "
                             "inputs")
        if self.channels is not None and eps_fp.shape[1] != self.channels:
            raise DenoqError(f"PTQD{where}: predictions with {eps_fp.shape[1]} channels after {self.channels}; every "
                             "batch of a step must come from the same model")
        e = eps_fp.detach().to(torch.float64).transpose(0, 1).reshape(eps_fp.shape[1], -1)  # [C, N·H·W]
        d = eps_q.detach().to(torch.float64).transpose(0, 1).reshape(eps_fp.shape[1], -1) - e
        for name, v in (("FP", e), ("quantized", d)):
            if not bool(torch.isfinite(v).all()):
                raise DenoqError(f"PTQD{where}: the {name} model's prediction is not finite (NaN/Inf); check that "
                                 "model on the calibration inputs before fitting its quantization noise")
        batch = torch.stack([e.sum(1), d.sum(1), (e * e).sum(1), (e * d).sum(1), (d * d).sum(1)]).cpu()
        self.channels = eps_fp.shape[1]
        self.sums = batch if self.sums is None else self.sums + batch
        self.count += e.shape[1]
        self._sample(eps_fp.detach(), eps_q.detach(), rows)

    def _sample(self, eps_fp: torch.Tensor, eps_q: torch.Tensor, rows: torch.Tensor | None) -> None:
        n = eps_fp.numel()
        if rows is None:
            idx = torch.arange(self._seen, self._seen + n, dtype=torch.int64)
        else:
            per_row = n // eps_fp.shape[0]
            idx = (rows[:, None] * per_row + torch.arange(per_row)).reshape(-1)
        self._seen += n
        h = torch.bitwise_and(idx * _HASH_MULT, 0xFFFFFFFF)  # low 32 bits survive int64 wrap-around
        pos = torch.nonzero(h < (1 << 32) >> self._level).squeeze(1)
        per_channel = eps_fp[0, 0].numel()
        on_device = pos.to(eps_fp.device)
        e = eps_fp.reshape(-1)[on_device].cpu().to(torch.float64)
        d = eps_q.reshape(-1)[on_device].cpu().to(torch.float64) - e
        c = ((pos // per_channel) % eps_fp.shape[1]).to(torch.float64)
        kept = torch.stack([e, d, c, h[pos].to(torch.float64), idx[pos].to(torch.float64)])
        self._kept = torch.cat([self._kept, kept], dim=1)
        self._thin()

    def _thin(self) -> None:
        while self._kept.shape[1] > self.max_samples:
            self._level += 1
            self._kept = self._kept[:, self._kept[3] < (1 << 32) >> self._level]

    def all_reduce(self) -> None:
        """Data-parallel calibration: the sums and counts of every rank's predictions, and the normality
        subsample one process keeps from them all (gathered, in element order, thinned to the final level)."""
        if not active():
            return
        self.count = int(all_reduce(torch.tensor([self.count], dtype=torch.float64), "sum", "PTQD counts"))
        self.sums = all_reduce(self.sums, "sum", "PTQD moments")
        parts = all_gather_objects((self._level, self._kept), "PTQD normality samples")
        self._level = max(level for level, _ in parts)
        kept = torch.cat([k for _, k in parts], dim=1)
        kept = kept[:, torch.argsort(kept[4])]
        self._kept = kept[:, kept[3] < (1 << 32) >> self._level]
        self._thin()

    def finish(self, where: str = "", correlated: bool = True) -> StepFit:
        """The fit (2)–(4) from the sums, and the normality test on the subsampled residual r − b_c. With
        `correlated` False, k = 0 (PTQD's bias correction alone): b_c is the channel mean of Δ and σ² its variance
        (`slope` still reports the least-squares k)."""
        if self.sums is None or self.count == 0:
            raise DenoqError(f"PTQD{where}: no predictions to fit; the calibration set is empty")
        n = float(self.count)
        se, sd, see, sed, sdd = self.sums
        cee, ced, cdd = see - se * se / n, sed - se * sd / n, sdd - sd * sd / n  # centered per channel
        den = float(cee.sum())
        slope = float(ced.sum()) / den if den > 0 else 0.0
        k = max(slope, 0.0) if correlated else 0.0
        bias = (sd - k * se) / n
        var = float(((cdd - 2 * k * ced + k * k * cee) / n).clamp_min(0).mean())
        e, d, c = self._kept[:3]
        residual = (d - k * e - bias[c.long()]).numpy()
        return StepFit(k=k, slope=slope, bias=bias, residual_var=var, normality_p=normality_p(residual),
                       count=self.count)


def normality_p(values: np.ndarray) -> float:
    """D'Agostino and Pearson's omnibus test (`scipy.stats.normaltest`): p of the hypothesis "drawn from a normal
    distribution". NaN when it cannot be computed (fewer than 20 values, or all equal)."""
    if values.size < MIN_NORMALITY_SAMPLES or float(np.ptp(values)) == 0.0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(scipy_stats.normaltest(values).pvalue)


def fit_step(eps_fp: torch.Tensor, eps_q: torch.Tensor, correlated: bool = True) -> StepFit:
    """PTQD's fit (2)–(4) of one step's paired predictions `[N, C, H, W]`: ε_q = (1 + k)·ε + b_c + ρ (k = 0 with
    `correlated` False)."""
    sums = StepSums()
    sums.add(eps_fp, eps_q)
    return sums.finish(correlated=correlated)


# -- the tables ----------------------------------------------------------------------------------------------------
def nearest_measured(steps: list[int], num_train_timesteps: int) -> torch.Tensor:
    """For every training timestep t ∈ [0, T) the index into the sorted `steps` of its nearest measured step,
    ties going to the smaller one (int64, length T). This is the rule of denoq's timestep-group tables
    (`timegroups.segment_of_timestep` with one measured step per segment): between measured steps a < b, the
    timesteps up to ⌊(a + b) / 2⌋ take a's values, the rest b's; below / above all measured steps, the first / last.
    """
    if not steps:
        raise DenoqError("PTQD: no measured steps to build the timestep tables from; run the calibration first")
    s = torch.tensor(steps, dtype=torch.int64)
    t = torch.arange(num_train_timesteps, dtype=torch.int64)
    return torch.argmin((t[:, None] - s[None, :]).abs(), dim=1)  # argmin returns the first minimum: smaller step


@dataclass
class PtqdStats:
    """PTQD's tables, indexed by the training timestep t ∈ [0, T), float32:
    `k` [T] (k ≥ 0 of (2)), `bias` [T, C] (b_c of (3)), `residual_var` [T] (σ² of (4): the variance of one element
    of the bias-free residual r − b_c, the population variances of the C channels averaged). Measured at the sorted
    training timesteps `steps` of a `sampler` run with `num_steps` steps; the other timesteps hold their nearest
    measured step's values (`nearest_measured`). `normality_p` [S] (float64) is the D'Agostino–Pearson p of each
    measured step's residual (NaN where not computable)."""

    num_train_timesteps: int
    sampler: str
    num_steps: int
    steps: list[int]
    k: torch.Tensor
    bias: torch.Tensor
    residual_var: torch.Tensor
    normality_p: torch.Tensor

    @property
    def channels(self) -> int:
        return int(self.bias.shape[1])

    @property
    def residual_std(self) -> torch.Tensor:
        """σ of (4) at each measured step, [S] float32."""
        return self.residual_var[self.steps].sqrt()

    @property
    def inv_one_plus_k(self) -> torch.Tensor:
        """1 / (1 + k) [T] float32: the graph head's multiplier (5)."""
        return (1.0 / (1.0 + self.k.double())).float()

    @property
    def corrected_var(self) -> torch.Tensor:
        """σ² / (1 + k)² [T] float32: the variance of the noise left in the corrected ε̂ of (5), for the sampler."""
        return (self.residual_var.double() / (1.0 + self.k.double()) ** 2).float()

    @classmethod
    def from_fits(cls, fits: dict[int, StepFit], num_train_timesteps: int, sampler: str,
                  num_steps: int) -> PtqdStats:
        """Tables of length T from the per-step fits (keys: training timesteps)."""
        steps = sorted(fits)
        owner = nearest_measured(steps, num_train_timesteps)
        k = torch.tensor([fits[t].k for t in steps], dtype=torch.float64)
        bias = torch.stack([fits[t].bias for t in steps])
        var = torch.tensor([fits[t].residual_var for t in steps], dtype=torch.float64)
        stats = cls(num_train_timesteps=num_train_timesteps, sampler=sampler, num_steps=num_steps, steps=steps,
                    k=k[owner].float(), bias=bias[owner].float(), residual_var=var[owner].float(),
                    normality_p=torch.tensor([fits[t].normality_p for t in steps], dtype=torch.float64))
        return cls.from_tensors(stats.to_tensors(), stats.meta())  # validated like a loaded one

    # -- storage (plan.safetensors + manifest) ---------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"ptqd.k": self.k.contiguous(), "ptqd.bias": self.bias.contiguous(),
                "ptqd.residual_var": self.residual_var.contiguous(), "ptqd.normality_p": self.normality_p.contiguous()}

    def meta(self) -> dict[str, Any]:
        return {"num_train_timesteps": self.num_train_timesteps, "channels": self.channels, "sampler": self.sampler,
                "num_steps": self.num_steps, "steps": list(self.steps)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> PtqdStats:
        """The statistics from `to_tensors` / `meta`, validated: DenoqError (one line) naming what is wrong."""
        fix = "the artifact is corrupt or from another denoq version; recompile it"
        try:
            T, C = int(meta["num_train_timesteps"]), int(meta["channels"])
            sampler, num_steps, steps = meta["sampler"], int(meta["num_steps"]), [int(t) for t in meta["steps"]]
            k, bias, var, p = (tensors[key].detach().cpu() for key in _TENSOR_KEYS)
        except (KeyError, TypeError, ValueError) as exc:
            raise DenoqError(f"PTQD statistics lack or garble {exc}; {fix}") from exc
        if sampler not in SAMPLERS or num_steps < 1 or T < 1 or C < 1:
            raise DenoqError(f"PTQD statistics name sampler {sampler!r} with {num_steps} steps, T = {T}, {C} "
                             f"channels; {fix}")
        if not steps or steps != sorted(set(steps)) or steps[0] < 0 or steps[-1] >= T:
            raise DenoqError(f"PTQD statistics' measured steps {steps} are not sorted distinct timesteps in [0, {T}); "
                             f"{fix}")
        for name, v, shape in (("k", k, (T,)), ("bias", bias, (T, C)), ("residual_var", var, (T,)),
                               ("normality_p", p, (len(steps),))):
            if tuple(v.shape) != shape:
                raise DenoqError(f"PTQD table {name} has shape {tuple(v.shape)}, expected {shape} (T = {T} = the "
                                 f"scheduler's num_train_timesteps); {fix}")
        for name, v in (("k", k), ("bias", bias), ("residual_var", var)):
            if not bool(torch.isfinite(v).all()):
                raise DenoqError(f"PTQD table {name} holds NaN/Inf; {fix}")
        for name, v in (("k", k), ("residual_var", var)):
            if bool((v < 0).any()):
                t = int(torch.nonzero(v < 0)[0])
                raise DenoqError(f"PTQD table {name} is {float(v[t])!r} < 0 at timestep {t}; {fix}")
        if bool(((p < 0) | (p > 1)).any()):
            raise DenoqError(f"PTQD normality p-values outside [0, 1]; {fix}")
        return cls(num_train_timesteps=T, sampler=sampler, num_steps=num_steps, steps=steps, k=k.float(),
                   bias=bias.float(), residual_var=var.float(), normality_p=p.double())


def check_matches(meta: dict[str, Any], sampler: str, num_steps: int) -> None:
    """Refuse to sample with statistics measured for another sampler or number of steps (the per-step noise, and so
    k, b and σ², belong to the steps that were measured): DenoqError naming both and the two ways out."""
    have_sampler, have_steps = meta.get("sampler"), meta.get("num_steps")
    if have_sampler != sampler or have_steps != num_steps:
        raise DenoqError(f"PTQD statistics computed for {have_sampler} {have_steps} steps, sampling with {sampler} "
                         f"{num_steps} steps; recompile with --set calib.sampler={sampler} --set calib.steps="
                         f"{num_steps} or sample with --sampler {have_sampler} --steps {have_steps}")


# -- measuring -----------------------------------------------------------------------------------------------------
def collect_pairs(fp_eps: EpsFn, q_eps: EpsFn, trajectory: CalibrationSet, batch_size: int
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(t, ε, ε_q) per batch of the FP trajectory inputs, in the set's step order: both backends (`eps(x, t, cond)`)
    on the same (x_t, t, cond). On guided trajectories both are guided at each trajectory's scale (one doubled
    model call each), so the statistics are taken on the guidance-combined output, as PTQD does."""
    total = sum(-(-xi.shape[0] // batch_size) for xi in trajectory.x)
    with torch.no_grad():
        for x, t, cond, scales in bar(trajectory.guided_batches(batch_size), total=total, desc="PTQD statistics",
                                      unit="batch"):
            yield (int(t[0]), trajectory.guided_eps(fp_eps, scales)(x, t, cond),
                   trajectory.guided_eps(q_eps, scales)(x, t, cond))


def fit(pairs: Iterable[tuple[int, torch.Tensor, torch.Tensor]], num_train_timesteps: int, sampler: str,
        num_steps: int, correlated: bool = True, rows: Iterable[torch.Tensor] | None = None) -> PtqdStats:
    """PTQD's tables from paired predictions (t, ε, ε_q), any number of batches per timestep (streaming sums).
    `correlated` False fits the bias alone (k = 0 at every step): the "bias correction only" ablation. `rows`
    (data-parallel calibration): beside the pairs, each batch's global trajectory indices
    (`CalibrationSet.batch_rows`); the sums are then reduced over the ranks."""
    if sampler not in SAMPLERS:
        raise DenoqError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    sums: dict[int, StepSums] = {}
    batch_rows = iter(rows) if rows is not None else None
    for t, eps_fp, eps_q in pairs:
        if not 0 <= t < num_train_timesteps:
            raise DenoqError(f"PTQD: timestep {t} lies outside [0, {num_train_timesteps}) = the scheduler's "
                             "num_train_timesteps; calibrate with the model's own scheduler config")
        sums.setdefault(t, StepSums()).add(eps_fp, eps_q, where=f" at timestep {t}",
                                           rows=None if batch_rows is None else next(batch_rows))
    for t in sorted(sums):
        sums[t].all_reduce()
    channels = {s.channels for s in sums.values()}
    if len(channels) > 1:
        raise DenoqError(f"PTQD: predictions with different channel counts {sorted(channels)} across timesteps; "
                         "every pair must come from the same two models")
    fits = {t: s.finish(where=f" at timestep {t}", correlated=correlated) for t, s in sums.items()}
    return PtqdStats.from_fits(fits, num_train_timesteps, sampler, num_steps)
