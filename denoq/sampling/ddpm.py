"""The DDPM ancestral step (Ho et al. 2020), as diffusers' `DDPMScheduler.step` computes it.

The model gives x̂_0 (see `step.predict_x0`); the step samples the forward-process posterior
(Ho et al. 2020, eq. 6/7)

    q(x_{t'} | x_t, x̂_0) = N(μ̃, β̃ I),
    μ̃ = sqrt(ᾱ_{t'}) β_t / (1 − ᾱ_t) · x̂_0  +  sqrt(α_t) (1 − ᾱ_{t'}) / (1 − ᾱ_t) · x_t,
    β̃ = (1 − ᾱ_{t'}) / (1 − ᾱ_t) · β_t,

where t' is the previous timestep of the (possibly shortened) schedule and, as in diffusers, the single-step
quantities are taken between t and t': α_t := ᾱ_t / ᾱ_{t'}, β_t := 1 − α_t (ᾱ_{t'} = 1 after the last step).
`fixed_small` is σ_t² = β̃ (clamped at 1e-20); `fixed_small_log` is the same variance through exp(½ log β̃).

With a residual variance σ_q² (PTQD's variance schedule calibration, `vsc.py`) the noise level becomes
σ′_t = sqrt(max(σ_t² − c_t² σ_q², 0)), c_t = −β_t/(√α_t √(1 − ᾱ_t)) the step's ε coefficient.
"""

from __future__ import annotations

import torch

from denoq.errors import DenoqError
from denoq.sampling.schedule import NoiseSchedule
from denoq.sampling.step import StepOut, predict_x0
from denoq.sampling.vsc import ddpm_eps_coefficient, vsc_sigma


def ddpm_step(schedule: NoiseSchedule, model_output: torch.Tensor, t: int, prev_t: int, x: torch.Tensor, *,
              residual_var: torch.Tensor | float | None = None,
              predicted_variance: torch.Tensor | None = None) -> StepOut:
    """One DDPM step x_t → x_{prev_t}: the posterior mean μ̃ and std sqrt(β̃) of eq. 6/7, kept apart.

    `t`, `prev_t` are ints from `NoiseSchedule.timesteps` / `prev_timesteps` (`prev_t = -1` after the last step).
    `std` is None at t = 0, where diffusers adds (and draws) no noise; otherwise the caller adds `std · z`.
    `residual_var`: σ_q²(t), the variance of the model output's residual at this step (PTQD, after the correction
    head); when given, `std` is the calibrated σ′_t = `vsc.vsc_sigma(σ_t, c_t, σ_q²)` (0, not None, where the clamp
    binds, so the caller still draws z). None (default): diffusers' step, unchanged.
    `predicted_variance`: the variance channels v ∈ [−1, 1] of a learned-variance model (Nichol & Dhariwal 2021,
    eq. 15; `variance_type="learned_range"`): σ_t² = exp(f log β_t + (1 − f) log β̃_t) with f = (v + 1) / 2, per
    element.
    """
    learned = schedule.variance_type == "learned_range"
    if learned != (predicted_variance is not None):
        raise DenoqError("the model predicts its variance but the scheduler's variance_type is "
                         f"{schedule.variance_type}; set variance_type=learned_range or sample with ddim"
                         if predicted_variance is not None else
                         "variance_type=learned_range needs a model that predicts its variance (out_channels = 2 × "
                         "in_channels); set the scheduler's variance_type to fixed_small")
    if learned and residual_var is not None:
        raise DenoqError("PTQD's variance schedule calibration assumes a fixed σ_t; it does not apply to a learned "
                         "variance")
    t, prev_t = int(t), int(prev_t)
    alpha_prod_t = schedule.alphas_cumprod[t]
    alpha_prod_t_prev = schedule.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t

    pred_x0, _ = predict_x0(schedule, model_output, x, alpha_prod_t)

    # μ̃ (eq. 7)
    pred_x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    mean = pred_x0_coeff * pred_x0 + current_sample_coeff * x

    std = None
    if t > 0:
        # β̃ (eq. 7), the `fixed_small` variance
        variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t
        variance = torch.clamp(variance, min=1e-20)
        if learned:
            frac = (predicted_variance + 1) / 2
            std = torch.exp(0.5 * (frac * torch.log(current_beta_t) + (1 - frac) * torch.log(variance)))
        elif schedule.variance_type == "fixed_small_log":
            std = torch.exp(0.5 * torch.log(variance))
        elif schedule.variance_type == "fixed_large":  # β_t, the upper bound of eq. 6's σ_t² (diffusers' choice)
            std = current_beta_t**0.5
        else:
            std = variance**0.5
        if residual_var is not None:
            std = vsc_sigma(std, ddpm_eps_coefficient(schedule, t, prev_t), residual_var)
    return StepOut(mean=mean, std=std, pred_x0=pred_x0)
