"""Variance schedule calibration (VSC) for the DDPM and DDIM (η > 0) steps, after PTQD.

PTQD (He et al., "PTQD: Accurate Post-Training Quantization for Diffusion Models", NeurIPS 2023, arXiv 2305.10657)
writes the quantized noise prediction as ε_q = (1 + k)·ε + Δ′ (its quantization-noise model). The correction
head (`denoq.passes.ptqd_head`) computes ε̂ = (ε_q − μ)/(1 + k) = ε + r with r = (Δ′ − μ)/(1 + k): zero mean,
uncorrelated with ε, nearly Gaussian (the paper's normality test), variance

    σ_q²(t)  :=  Var(r)  =  Var(Δ′) / (1 + k_t)²    per element.

(This module's `residual_var` is that variance *after* the division by 1 + k, i.e. the paper's σ_q² / (1 + k)²;
`PtqdStats.corrected_var` of `denoq.calibrators.ptqd`, not its `residual_var`, which is before the division.)
A step is linear in its model output, so the residual reaches x_{t−1} as c_t·r, where c_t := ∂x_{t−1}/∂ε̂ is the
step's ε coefficient, and adds c_t²·σ_q² to the variance of x_{t−1} on top of the σ_t² the sampler adds on purpose.
VSC (the paper's correction of the residual, uncorrelated noise) lowers the added noise so that the total matches
the FP sampler's:

    σ′_t² = σ_t² − c_t²·σ_q²(t)    if that is ≥ 0,   else   σ′_t = 0,

which for DDPM is the paper's σ′_t² = σ_t² − β_t² / (α_t (1 − ᾱ_t)) · σ_q²/(1 + k)². Where the clamp binds, the
variance of x_{t−1} stays above the FP one by c_t²σ_q² − σ_t² (nothing subtracts noise that was not added).

**DDPM ancestral step** (Ho et al. 2020, eq. 11; diffusers' `DDPMScheduler.step`, `ddpm.py`). With t′ the previous
timestep, α_t := ᾱ_t/ᾱ_{t′}, β_t := 1 − α_t, the step is μ̃ = √ᾱ_{t′} β_t/(1 − ᾱ_t)·x̂_0 + √α_t (1 − ᾱ_{t′})/(1 − ᾱ_t)·x_t
with x̂_0 = (x_t − √(1 − ᾱ_t)·ε̂)/√ᾱ_t. Substituting, and ᾱ_t = α_t ᾱ_{t′},

    x_{t−1} = (x_t − β_t/√(1 − ᾱ_t) · ε̂)/√α_t + σ_t z    ⇒    c_t = −β_t / (√α_t · √(1 − ᾱ_t)).

**DDIM step** (Song et al. 2021, eq. 12; `ddim.py`): x_{t′} = √ᾱ_{t′}·x̂_0 + √(1 − ᾱ_{t′} − σ_t²)·ε̂ + σ_t z, so

    c_t = √(1 − ᾱ_{t′} − σ_t²) − √ᾱ_{t′} · √(1 − ᾱ_t)/√ᾱ_t.

With η = 1 (σ_t² = β̃_t = (1 − ᾱ_{t′})/(1 − ᾱ_t)·β_t) this is exactly the DDPM coefficient; with η = 0 the step adds
no noise (σ_t = 0, diffusers draws none) and VSC has nothing to lower: it is a no-op, as the paper notes.

**Other prediction types.** For a `sample` or `v_prediction` model the head's residual is on that output, and the
same derivation holds with c_t = ∂x_{t−1}/∂(model output) = √ᾱ_{t′}·∂x̂_0/∂out + √(1 − ᾱ_{t′} − σ_t²)·∂ε̂/∂out
(DDIM; DDPM: its x̂_0 coefficient times ∂x̂_0/∂out), with (∂x̂_0/∂out, ∂ε̂/∂out) = (−√(1−ᾱ_t)/√ᾱ_t, 1) for `epsilon`,
(1, −√ᾱ_t/√(1−ᾱ_t)) for `sample` and (−√(1−ᾱ_t), √ᾱ_t) for `v_prediction` (see `step.predict_x0`).

**x̂_0 clipping** (`clip_sample`, diffusers' default for DDPM). Clipping makes the step piecewise linear: where
|x̂_0| < `clip_sample_range` the coefficient is c_t above; where an element of x̂_0 is clipped, x̂_0 no longer depends
on ε̂ and the residual reaches x_{t−1} only through the ε̂ term (DDIM: √(1 − ᾱ_{t′} − σ_t²); DDPM: 0). VSC uses the
unclipped c_t for every element (σ_t is one number per step, as in the paper): for clipped elements it removes
slightly more noise than the residual added there. The statistics (σ_q²) come from the model output, not from x̂_0,
so they are unaffected.

With `residual_var` None (or 0 at a step) the steps are unchanged bit for bit, and the sampler still matches
diffusers.
"""

from __future__ import annotations

import torch

from denoq.errors import DenoqError
from denoq.sampling.schedule import NoiseSchedule

__all__ = ["check_residual_var", "ddim_eps_coefficient", "ddpm_eps_coefficient", "vsc_sigma"]


def _output_derivatives(schedule: NoiseSchedule, alpha_prod_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂x̂_0/∂out, ∂ε̂/∂out) of `step.predict_x0` without clipping, for the schedule's prediction type."""
    beta_prod_t = 1 - alpha_prod_t
    if schedule.prediction_type == "epsilon":
        return -(beta_prod_t**0.5) / alpha_prod_t**0.5, torch.ones_like(alpha_prod_t)
    if schedule.prediction_type == "sample":
        return torch.ones_like(alpha_prod_t), -(alpha_prod_t**0.5) / beta_prod_t**0.5
    return -(beta_prod_t**0.5), alpha_prod_t**0.5  # v_prediction


def ddpm_eps_coefficient(schedule: NoiseSchedule, t: int, prev_t: int) -> torch.Tensor:
    """c_t = ∂x_{t′}/∂(model output) of `ddpm_step(schedule, ·, t, prev_t, x)`, clipping ignored (module docstring).

    For ε-prediction c_t = −β_t / (√α_t √(1 − ᾱ_t)) with α_t = ᾱ_t/ᾱ_{t′} (ᾱ_{t′} = 1 after the last step).
    A 0-d float32 tensor, computed with the step's own float32 quantities.
    """
    t, prev_t = int(t), int(prev_t)
    alpha_prod_t = schedule.alphas_cumprod[t]
    alpha_prod_t_prev = schedule.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    pred_x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / (1 - alpha_prod_t)  # eq. 7's x̂_0 coefficient
    dx0, _ = _output_derivatives(schedule, alpha_prod_t)
    return pred_x0_coeff * dx0


def ddim_eps_coefficient(schedule: NoiseSchedule, t: int, prev_t: int, eta: float) -> torch.Tensor:
    """c_t = ∂x_{t′}/∂(model output) of `ddim_step(schedule, ·, t, prev_t, x, eta)`, clipping ignored.

    For ε-prediction c_t = √(1 − ᾱ_{t′} − σ_t²) − √ᾱ_{t′}·√(1 − ᾱ_t)/√ᾱ_t with σ_t = η·(Song et al. eq. 16) and
    ᾱ_{t′} = `final_alpha_cumprod` for t′ < 0. A 0-d float32 tensor.
    """
    t, prev_t = int(t), int(prev_t)
    alpha_prod_t = schedule.alphas_cumprod[t]
    alpha_prod_t_prev = schedule.alphas_cumprod[prev_t] if prev_t >= 0 else schedule.final_alpha_cumprod
    variance = ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    dx0, deps = _output_derivatives(schedule, alpha_prod_t)
    return alpha_prod_t_prev ** (0.5) * dx0 + (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * deps


def vsc_sigma(sigma_t: torch.Tensor | float, c_t: torch.Tensor | float,
              residual_var_t: torch.Tensor | float) -> torch.Tensor:
    """PTQD's calibrated noise level σ′_t = sqrt(max(σ_t² − c_t²·σ_q²(t), 0)) (module docstring), float32 0-d.

    `residual_var_t` is σ_q²(t), the per-element variance of the head's residual after the division by 1 + k.
    When c_t²·σ_q² is 0 (no residual), σ_t is returned as it is, bit for bit.
    """
    sigma = torch.as_tensor(sigma_t, dtype=torch.float32)
    c = torch.as_tensor(c_t, dtype=torch.float32)
    var = torch.as_tensor(residual_var_t, dtype=torch.float32)
    if not bool(torch.all(torch.isfinite(var) & (var >= 0))):
        raise DenoqError(f"residual variance {var.tolist()} must be finite and >= 0; recompute the PTQD statistics")
    carried = c**2 * var
    lowered = torch.sqrt(torch.clamp(sigma**2 - carried, min=0.0))
    return torch.where(carried == 0, sigma, lowered)


def check_residual_var(residual_var: torch.Tensor | None, num_train_timesteps: int) -> torch.Tensor | None:
    """`residual_var` as a float32 CPU tensor [T] (σ_q²(t) per training timestep), or None; DenoqError when it is
    not 1-D of length T, finite and ≥ 0."""
    if residual_var is None:
        return None
    var = torch.as_tensor(residual_var).detach().to(device="cpu", dtype=torch.float32)
    if var.dim() != 1 or var.shape[0] != num_train_timesteps:
        raise DenoqError(f"residual_var has shape {tuple(var.shape)}, expected [{num_train_timesteps}] (one variance "
                         "per training timestep); recompute the PTQD statistics for this scheduler")
    bad = ~(torch.isfinite(var) & (var >= 0))
    if bool(bad.any()):
        t = int(torch.nonzero(bad)[0, 0])
        raise DenoqError(f"residual_var[{t}] = {float(var[t])} must be finite and "
                         ">= 0; recompute the PTQD statistics")
    return var
