"""PTQD's statistics in one picture (`ptqd.png` of the artifact): k_t, the bias and the residual σ with its
normality p-values per measured step, the quantities (2)–(4) of `ptqd.py`."""

from __future__ import annotations

import math

import numpy as np

from denoq.calibrators.ptqd import PtqdStats
from denoq.figures import figure_png

#: p below this marks a step's residual as not Gaussian in the pictures.
NORMALITY_ALPHA = 0.01


def ptqd_pictures(stats: PtqdStats, title: str = "PTQD statistics per step") -> bytes:
    """Three panels over the measured steps (x axis: timestep, descending as sampling runs): k_t; mean and max over
    channels of |b_c|; the residual std σ with the normality p-values on a log axis (steps with p < 0.01 marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = stats.steps
    absb = stats.bias[t].abs()
    p = stats.normality_p.numpy()
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    axes[0].plot(t, stats.k[t].numpy(), marker=".", color="#4477aa")
    axes[0].set_ylabel("k_t (ε_q = (1+k)ε + Δ′)")
    axes[1].plot(t, absb.mean(1).numpy(), marker=".", color="#228833", label="mean over channels")
    axes[1].plot(t, absb.amax(1).numpy(), marker=".", color="#ccbb44", label="max over channels")
    axes[1].set_ylabel("|bias| of Δ′")
    axes[1].legend(fontsize=7)
    std = stats.residual_std.numpy()
    axes[2].plot(t, std, marker=".", color="#cc6677", label="residual std σ")
    bad = [i for i, v in enumerate(p) if v < NORMALITY_ALPHA]
    if bad:
        axes[2].scatter([t[i] for i in bad], std[bad], marker="x", color="black", zorder=3,
                        label=f"not Gaussian (p < {NORMALITY_ALPHA:g})")
    axes[2].set_ylabel("residual std")
    twin = axes[2].twinx()
    ok = [i for i, v in enumerate(p) if not math.isnan(v)]
    twin.semilogy([t[i] for i in ok], np.maximum(p[ok], 1e-300), linestyle="none", marker="o", markersize=3,
                  color="#999999", label="normality p (D'Agostino–Pearson)")
    twin.axhline(NORMALITY_ALPHA, color="#999999", linestyle="--", linewidth=0.8)
    twin.set_ylim(top=2.0)
    twin.set_ylabel("normality p", color="#666666")
    lines, twin_lines = axes[2].get_legend_handles_labels(), twin.get_legend_handles_labels()
    twin.legend(lines[0] + twin_lines[0], lines[1] + twin_lines[1], fontsize=7, framealpha=0.9)  # on top of both
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].invert_xaxis()  # shared x: inverting once inverts every panel
    axes[2].set_xlabel("timestep t")
    fig.suptitle(f"{title} ({stats.sampler}, {stats.num_steps} steps)")
    return figure_png(fig)
