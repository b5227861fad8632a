"""Step-aware mixed precision: which of several quantized models runs each denoising step.

PTQD (He et al., NeurIPS 2023, arXiv 2305.10657, section "Step-aware mixed precision") observes that the
quantization noise matters most where the diffusion process itself leaves little noise: late in sampling, the
signal-to-noise ratio of x_t is high and the quantized model's noise prediction is relatively poor. It compares,
per step, the signal-to-noise ratio of the quantized prediction

    SNR_Q(t) = Σ ‖ε(x_t, t)‖² / Σ ‖ε̂_q(x_t, t) − ε(x_t, t)‖²                                                 (1)

(ε the FP model's prediction, ε̂_q the quantized one as deployed, i.e. after the PTQD correction head when it has
one; sums over the calibration trajectories' inputs at step t, all-reduced over the ranks under torchrun) with that
of the diffusion process

    SNR_F(t) = ᾱ_t / (1 − ᾱ_t)                                                                               (2)

and spends more bits where the quantized one falls below it. Our rule, for a set of candidate models with costs
(BOPs per call, `denoq.bops`): at each step take the cheapest candidate with SNR_Q(t) ≥ SNR_F(t); where none
reaches it, the candidate with the highest SNR_Q(t). (The paper states the criterion for its two bit widths and
draws the switch from its SNR curves; the any-number-of-candidates form is ours.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from denoq.calibrators.calibset import CalibrationSet
from denoq.calibrators.distributed import sum_tables
from denoq.errors import DenoqError
from denoq.figures import figure_png
from denoq.sampling import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def diffusion_snr(schedule: NoiseSchedule, t: int) -> float:
    """SNR_F(t) = ᾱ_t / (1 − ᾱ_t) of (2)."""
    a = float(schedule.alphas_cumprod[t].double())
    return a / max(1.0 - a, 1e-300)


def quantization_snr(fp_eps: EpsFn, candidates: dict[str, EpsFn], trajectory: CalibrationSet, batch_size: int
                     ) -> dict[str, dict[int, float]]:
    """SNR_Q(t) of (1) for every candidate at every step of `trajectory` (the FP trajectories' inputs), all
    candidates on the same (x_t, t, cond) as the FP model."""
    if not candidates:
        raise DenoqError("step-aware precision needs at least one candidate model")
    signal: dict[int, float] = {}
    noise: dict[str, dict[int, float]] = {name: {} for name in candidates}
    with torch.no_grad():
        for x, t, cond in trajectory.progress_batches(batch_size, "SNR per step"):
            step = int(t[0])
            ref = fp_eps(x, t, cond).double()
            signal[step] = signal.get(step, 0.0) + float(ref.pow(2).sum())
            for name, eps in sorted(candidates.items()):
                err = float((eps(x, t, cond).double() - ref).pow(2).sum())
                noise[name][step] = noise[name].get(step, 0.0) + err
    # every rank holds rows at every step (the shard rule splits trajectories, not steps): the sums of (1) over ranks
    summed = sum_tables({None: signal, **noise}, "the step-precision SNR sums")
    signal, noise = summed.pop(None), summed
    return {name: {t: signal[t] / max(e, 1e-300) for t, e in sorted(errs.items())}
            for name, errs in sorted(noise.items())}


def choose_precision(snr_q: dict[str, dict[int, float]], snr_f: dict[int, float],
                     cost: dict[str, float]) -> dict[int, str]:
    """Per step, the cheapest candidate with SNR_Q ≥ SNR_F, else the one with the highest SNR_Q (ties: cheaper,
    then name)."""
    missing = sorted(set(snr_q) - set(cost))
    if missing:
        raise DenoqError(f"step-aware precision: no cost for candidate(s) {missing}")
    choice = {}
    for t in sorted(snr_f):
        if any(t not in table for table in snr_q.values()):
            raise DenoqError(f"step-aware precision: timestep {t} was not measured for every candidate")
        passing = [n for n in snr_q if snr_q[n][t] >= snr_f[t]]
        choice[t] = (min(passing, key=lambda n: (cost[n], n)) if passing
                     else min(snr_q, key=lambda n: (-snr_q[n][t], cost[n], n)))
    return choice


def precision_png(snr_q: dict[str, dict[int, float]], snr_f: dict[int, float], choice: dict[int, str],
                  title: str) -> bytes:
    """SNR_Q of each candidate and SNR_F over the steps (log scale, x descending as sampling runs), with the
    chosen candidate per step as a colored band underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377"]
    names = sorted(snr_q)
    color = {n: colors[i % len(colors)] for i, n in enumerate(names)}
    t = sorted(snr_f)
    fig, (ax, band) = plt.subplots(2, 1, figsize=(7, 4.2), sharex=True, gridspec_kw={"height_ratios": [5, 1]})
    for n in names:
        ax.semilogy(t, [snr_q[n][s] for s in t], marker=".", color=color[n], label=f"SNR_Q {n}")
    ax.semilogy(t, [snr_f[s] for s in t], color="black", linestyle="--", label="SNR_F = ᾱ/(1−ᾱ)")
    ax.set_ylabel("signal-to-noise ratio")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    width = (max(t) - min(t)) / max(len(t) - 1, 1)
    for s in t:
        band.bar(s, 1, width=width, color=color[choice[s]], edgecolor="none")
    band.set_yticks([])
    band.set_ylabel("runs", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[n]) for n in names]
    band.legend(handles, names, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.invert_xaxis()
    band.set_xlabel("timestep t")
    fig.suptitle(title, fontsize=10)
    return figure_png(fig)
