"""What a reverse step returns, the model-output → x̂_0 conversion that DDPM and DDIM share, and the noise draw
every sampler shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from denoq.sampling.schedule import NoiseSchedule


def randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """`torch.randn` as diffusers' `randn_tensor` draws it: on the generator's device, then moved to `device`."""
    rand_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=torch.float32).to(device)


@dataclass(frozen=True)
class StepOut:
    """One reverse step x_t → x_{t_prev}, split into its deterministic and its random part.

    `x_{t_prev} = mean + std · z`, `z ~ N(0, I)`. `std` is a 0-d float32 tensor, or None where the step adds no noise
    (and diffusers draws none: DDPM at t = 0, DDIM with η = 0); the loop draws `z` only when `std` is not None, which
    keeps the generator in step with diffusers'. Keeping `std` apart lets a caller lower the added variance, as PTQD's
    variance schedule calibration does, before the loop adds `std · z`.
    """

    mean: torch.Tensor
    std: torch.Tensor | None
    pred_x0: torch.Tensor


def predict_x0(
    schedule: NoiseSchedule, model_output: torch.Tensor, x: torch.Tensor, alpha_prod_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂_0 (clipped if the config says so) and ε̂ from the model output, as diffusers' DDPM/DDIM `step` compute them.

    - `epsilon`: x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t) (Ho et al. 2020, eq. 15; Song et al. 2021, eq. 12).
    - `sample`: x̂_0 = output, ε̂ = (x_t − sqrt(ᾱ_t) x̂_0) / sqrt(1 − ᾱ_t).
    - `v_prediction` (Salimans & Ho 2022): x̂_0 = sqrt(ᾱ_t) x_t − sqrt(1 − ᾱ_t) v, ε̂ = sqrt(ᾱ_t) v + sqrt(1 − ᾱ_t) x_t.

    ε̂ is computed from the unclipped x̂_0 (diffusers' `use_clipped_model_output=False`).
    """
    beta_prod_t = 1 - alpha_prod_t
    if schedule.prediction_type == "epsilon":
        pred_x0 = (x - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_eps = model_output
    elif schedule.prediction_type == "sample":
        pred_x0 = model_output
        pred_eps = (x - alpha_prod_t ** (0.5) * pred_x0) / beta_prod_t ** (0.5)
    else:  # v_prediction; from_config admits nothing else
        pred_x0 = (alpha_prod_t**0.5) * x - (beta_prod_t**0.5) * model_output
        pred_eps = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * x
    if schedule.clip_sample:
        pred_x0 = pred_x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    return pred_x0, pred_eps
