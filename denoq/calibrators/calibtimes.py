"""Which recorded trajectory steps calibrate the activation quantizers (recipe key `activations.calib_timesteps`).

The FP calibration trajectories are recorded at the P steps of the calibration sampler: the pool, which is also
the distribution of timesteps the deployed sampler visits. Calibration uses K of them (`calib.timesteps`). The
rules return indices into the pool, ascending; every rule is deterministic.

- `uniform`: evenly spaced, i_k = round(k·(P − 1)/(K − 1)).
- `normal`: PTQ4DM's normally distributed time-step calibration (Shang et al., "Post-training Quantization on
  Diffusion Models", CVPR 2023, §4.3): timesteps drawn from N(μ, σ²), which weights the middle and late
  (small-t) steps more than uniform sampling does. Here μ = 0.4·T, σ = 0.4·T and the draw is the K normal
  quantiles t_k = μ + σ·Φ⁻¹((k + ½)/K), each mapped to the nearest pool step not taken yet.
- `srm`: ADP-DM's calibration-timestep selection by structural risk minimization (Wang et al., "Towards Accurate
  Post-training Quantization for Diffusion Models", CVPR 2024, arXiv 2305.18723, §3.3): the calibration steps
  S should make the quantizers accurate on S (empirical risk) *and* be distributed like the deployment steps P
  (the capacity term that bounds the generalization gap). We minimize

      J(S) = R̂(S) / R̂(P) + λ · MMD²(φ_S, φ_P),   |S| = K                                                  (1)

  R̂(S) = (1/L) Σ_l Σ_{t∈S} ‖Q_{l,S}(X_{l,t}) − X_{l,t}‖² / Σ_{t∈S} ‖X_{l,t}‖²: the relative error of each
  layer's input quantizer fitted (min-max, the recipe's bits) on the steps of S, measured on those steps;
  normalized by R̂(P) so that λ (`activations.srm_lambda`) is unitless.
  φ(t) = (log(max X_{l,t} − min X_{l,t}))_l: a step's activation ranges over the L layers; MMD² between the
  empirical distributions of φ over S and over P with the Gaussian kernel k(a, b) = exp(−‖a − b‖² / (2h²)),
  h the median pairwise distance over P:

      MMD² = mean_{S×S} k + mean_{P×P} k − 2 mean_{S×P} k                                                    (2)

  The exact search over all (P choose K) subsets is intractable; J is minimized greedily (add the step that
  lowers J most, ties to the smaller index). The statistics come from a probe of a few trajectories at every
  pool step (`probe_samples`), so the full calibration budget is spent on the K chosen steps only.
"""

from __future__ import annotations

import math

import torch

from denoq.calibrators.observers import qparams
from denoq.calibrators.quantizer import fake_quantize
from denoq.calibrators.stats import LayerStats, strided
from denoq.errors import DenoqError
from denoq.plan import qrange

STRATEGIES = ("uniform", "normal", "srm")
NORMAL_MEAN = 0.4  # μ / T
NORMAL_STD = 0.4  # σ / T
PROBE_SAMPLES = 8
RISK_VALUES = 512  # values per (layer, step) the risk evaluates: evenly strided from the probe's sample


def check_count(strategy: str, pool: int, k: int) -> None:
    """A non-uniform rule needs 1 ≤ K < P: with K = 0 or K ≥ P every recorded step calibrates."""
    if strategy not in STRATEGIES:
        raise DenoqError(f"activations.calib_timesteps = {strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
    if strategy != "uniform" and not 0 < k < pool:
        raise DenoqError(f"activations.calib_timesteps = {strategy} picks calib.timesteps of the {pool} recorded "
                         f"steps, but calib.timesteps = {k}; set calib.timesteps between 1 and {pool - 1}")


def uniform_steps(pool: int, k: int) -> list[int]:
    """K evenly spaced pool indices (all P of them when K is 0 or ≥ P)."""
    if k <= 0 or k >= pool:
        return list(range(pool))
    return sorted(set(torch.linspace(0, pool - 1, k).round().long().tolist()))


def normal_steps(pool_t: list[int], k: int, num_train_timesteps: int) -> list[int]:
    """PTQ4DM's normal rule (module docstring): K distinct pool indices nearest the normal quantiles."""
    normal = torch.distributions.Normal(NORMAL_MEAN * num_train_timesteps, NORMAL_STD * num_train_timesteps)
    targets = normal.icdf((torch.arange(k, dtype=torch.float64) + 0.5) / k).tolist()
    taken: set[int] = set()
    for target in targets:
        free = [i for i in range(len(pool_t)) if i not in taken]
        taken.add(min(free, key=lambda i: (abs(pool_t[i] - target), i)))
    return sorted(taken)


# -- srm -----------------------------------------------------------------------------------------------------------
def step_features(probe: dict[str, LayerStats], pool_t: list[int]) -> torch.Tensor:
    """φ(t) of eq. (2): [P, L] float64, the log input range of every layer (sorted by name) at every pool step."""
    names = sorted(probe)
    missing = [t for t in pool_t if t not in probe[names[0]].input.amax]
    if missing:
        raise DenoqError(f"the srm probe has no statistics at timestep {missing[0]}; probe every recorded step")
    return torch.tensor([[math.log(max(probe[n].input.amax[t] - probe[n].input.amin[t], 1e-12)) for n in names]
                         for t in pool_t], dtype=torch.float64)


def mmd2(kernel: torch.Tensor, subset: list[int]) -> float:
    """Eq. (2) from the [P, P] kernel matrix over the pool, for the empirical measure on `subset` vs the pool."""
    s = torch.tensor(subset)
    return float(kernel[s][:, s].mean() + kernel.mean() - 2 * kernel[s].mean())


def gaussian_kernel(features: torch.Tensor) -> torch.Tensor:
    """k(a, b) = exp(−‖a − b‖² / (2h²)) over the pool, h the median of the nonzero pairwise distances."""
    dist = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")  # exact zeros on the diagonal
    nonzero = dist[dist > 0]
    h = float(nonzero.median()) if nonzero.numel() else 1.0
    return torch.exp(-dist.pow(2) / (2 * h * h))


class EmpiricalRisk:
    """R̂(S) of eq. (1) from probe statistics: per layer, the min-max quantizer of the recipe's bits fitted on the
    steps of S, its squared error over those steps relative to their energy, averaged over the layers."""

    def __init__(self, probe: dict[str, LayerStats], pool_t: list[int], bits: int, signed: bool) -> None:
        self.bits, self.signed = bits, signed
        self.qmin, self.qmax = qrange(bits, signed)
        self.layers = []
        for name in sorted(probe):
            st = probe[name].input
            self.layers.append(([strided(torch.cat(st.values[t]), RISK_VALUES) for t in pool_t],
                                [st.amin[t] for t in pool_t], [st.amax[t] for t in pool_t]))

    def __call__(self, subset: list[int]) -> float:
        total = 0.0
        for values, amin, amax in self.layers:
            scale, zp = qparams(min(amin[i] for i in subset), max(amax[i] for i in subset), self.bits, self.signed)
            x = torch.cat([values[i] for i in subset])
            err = (fake_quantize(x, torch.tensor(scale), zp, self.qmin, self.qmax) - x).pow(2).sum()
            total += float(err / x.pow(2).sum().clamp_min(1e-30))
        return total / len(self.layers)


def srm_steps(probe: dict[str, LayerStats], pool_t: list[int], k: int, bits: int, signed: bool,
              lam: float) -> tuple[list[int], dict[str, float]]:
    """Greedy minimization of eq. (1). Returns the K pool indices and the terms of J at the chosen set."""
    kernel = gaussian_kernel(step_features(probe, pool_t))
    risk = EmpiricalRisk(probe, pool_t, bits, signed)
    all_steps = list(range(len(pool_t)))
    risk_pool = max(risk(all_steps), 1e-30)

    def objective(subset: list[int]) -> float:
        return risk(subset) / risk_pool + lam * mmd2(kernel, subset)

    chosen: list[int] = []
    for _ in range(k):
        candidates = [sorted([*chosen, i]) for i in all_steps if i not in chosen]
        chosen = min(candidates, key=lambda subset: (objective(subset), subset))
    uniform = uniform_steps(len(pool_t), k)
    return chosen, {"risk": risk(chosen) / risk_pool, "mmd2": mmd2(kernel, chosen),
                    "risk_uniform": risk(uniform) / risk_pool, "mmd2_uniform": mmd2(kernel, uniform)}
