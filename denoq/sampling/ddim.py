"""The DDIM step with η (Song et al. 2021), as diffusers' `DDIMScheduler.step` computes it.

Song et al. 2021, eq. 12:

    x_{t'} = sqrt(ᾱ_{t'}) x̂_0  +  sqrt(1 − ᾱ_{t'} − σ_t²) · ε̂  +  σ_t z,

with eq. 16 for the noise level

    σ_t = η · sqrt((1 − ᾱ_{t'}) / (1 − ᾱ_t)) · sqrt(1 − ᾱ_t / ᾱ_{t'}).

η = 0 is the deterministic DDIM sampler, η = 1 the DDPM posterior variance. As in diffusers, t' = t − T // n for n
inference steps, and for t' < 0 ᾱ_{t'} is `final_alpha_cumprod` (1 with `set_alpha_to_one`, else ᾱ_0). ε̂ is the
model's own (`use_clipped_model_output=False`).

With a residual variance σ_q² (PTQD's variance schedule calibration, `vsc.py`) and η > 0 the noise level becomes
σ′_t = sqrt(max(σ_t² − c_t² σ_q², 0)), c_t = √(1 − ᾱ_{t'} − σ_t²) − √ᾱ_{t'} √(1 − ᾱ_t)/√ᾱ_t the step's ε
coefficient; the mean keeps σ_t (the direction term is the sampler's, the calibration only lowers the added noise).
At η = 0 nothing changes.
"""

from __future__ import annotations

import torch

from denoq.sampling.schedule import NoiseSchedule
from denoq.sampling.step import StepOut, predict_x0
from denoq.sampling.vsc import ddim_eps_coefficient, vsc_sigma


def ddim_step(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    t: int,
    prev_t: int,
    x: torch.Tensor,
    eta: float = 0.0,
    *,
    residual_var: torch.Tensor | float | None = None,
) -> StepOut:
    """One DDIM step x_t → x_{prev_t} (eq. 12) with σ_t = η · (eq. 16), mean and noise std kept apart.

    `mean` is eq. 12 without the σ_t z term; `std` is σ_t, or None when η = 0 (diffusers then draws no noise).
    `residual_var`: σ_q²(t) of the model output's residual (PTQD); with η > 0, `std` is the calibrated
    σ′_t = `vsc.vsc_sigma(σ_t, c_t, σ_q²)` (0, not None, where the clamp binds). None (default) or η = 0: unchanged.
    """
    t, prev_t = int(t), int(prev_t)
    alpha_prod_t = schedule.alphas_cumprod[t]
    alpha_prod_t_prev = schedule.alphas_cumprod[prev_t] if prev_t >= 0 else schedule.final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev

    pred_x0, pred_eps = predict_x0(schedule, model_output, x, alpha_prod_t)

    # σ_t (eq. 16)
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)

    # eq. 12: "predicted x_0" + "direction pointing to x_t"
    direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_eps
    mean = alpha_prod_t_prev ** (0.5) * pred_x0 + direction
    std = None
    if eta > 0:
        std = std_dev_t
        if residual_var is not None:
            std = vsc_sigma(std_dev_t, ddim_eps_coefficient(schedule, t, prev_t, eta), residual_var)
    return StepOut(mean=mean, std=std, pred_x0=pred_x0)
