"""The noise schedule of a diffusion model, read from a diffusers scheduler config.

The forward process (Ho et al. 2020, eq. 2 and 4) is fixed by the betas:
`q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 − ᾱ_t) I)` with `α_t = 1 − β_t` and `ᾱ_t = ∏_{s≤t} α_s`.
Everything here is computed exactly as diffusers' `DDPMScheduler` / `DDIMScheduler` compute it (float32, same op
order), so that our samplers reproduce diffusers' to float rounding. Only the numbers live here; the update rules are in
`ddpm.py` and `ddim.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from denoq.errors import DenoqError

SAMPLERS = ("ddpm", "ddim")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def check_sampler(sampler: str) -> str:
    """Return `sampler` if it is one of `SAMPLERS`, else raise a `DenoqError`."""
    if sampler not in SAMPLERS:
        raise DenoqError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    return sampler


def _betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule (Nichol & Dhariwal 2021, eq. 17), `squaredcos_cap_v2` in diffusers, computed as they do."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_train_timesteps):
        t1 = i / num_train_timesteps
        t2 = (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1 (diffusers' `rescale_zero_terminal_snr`): shift and scale sqrt(ᾱ) so ᾱ_T = 0."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    s0 = alphas_bar_sqrt[0].clone()
    s_last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= s_last
    alphas_bar_sqrt *= s0 / (s0 - s_last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def _choice(cfg: Mapping[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = cfg.get(key, default)
    if value not in allowed:
        raise DenoqError(f"scheduler config: {key}={value!r} is not supported; denoq supports {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class NoiseSchedule:
    """β_t, α_t, ᾱ_t (float32, length T) and the scheduler options that the DDPM/DDIM steps read.

    Build it with `NoiseSchedule.from_config(cfg)` from a diffusers scheduler config dict (the content of
    `scheduler/scheduler_config.json`). `set_alpha_to_one` is DDIM's option (diffusers' default: True) for the ᾱ used
    after the last step; the DDPM step always uses 1 there.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    num_train_timesteps: int
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> NoiseSchedule:
        """Read a diffusers DDPM/DDIM scheduler config; defaults are diffusers' own.

        Unsupported values (another beta schedule, prediction or variance type, timestep spacing, `thresholding`)
        raise a `DenoqError` naming the value and what is supported. Keys that do not change DDPM/DDIM sampling
        (`_class_name`, `_diffusers_version`, ...) are ignored.
        """
        if not isinstance(cfg, Mapping):
            raise DenoqError(f"scheduler config must be a dict, got {type(cfg).__name__}")
        T = cfg.get("num_train_timesteps", 1000)
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise DenoqError(f"scheduler config: num_train_timesteps={T!r} must be a positive integer")
        if cfg.get("thresholding", False):
            raise DenoqError("scheduler config: thresholding=True is not supported; set it to false")
        prediction_type = _choice(cfg, "prediction_type", "epsilon", PREDICTION_TYPES)
        variance_type = _choice(cfg, "variance_type", "fixed_small", VARIANCE_TYPES)
        spacing = _choice(cfg, "timestep_spacing", "leading", TIMESTEP_SPACINGS)

        trained = cfg.get("trained_betas")
        if trained is not None:
            betas = torch.tensor(trained, dtype=torch.float32)
            if betas.shape != (T,):
                raise DenoqError(f"scheduler config: trained_betas has {betas.numel()} values, expected {T}")
        else:
            schedule = _choice(cfg, "beta_schedule", "linear", BETA_SCHEDULES)
            beta_start = float(cfg.get("beta_start", 0.0001))
            beta_end = float(cfg.get("beta_end", 0.02))
            if schedule == "linear":
                betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
            elif schedule == "scaled_linear":
                betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
            else:
                betas = _betas_for_alpha_bar(T)
        if cfg.get("rescale_betas_zero_snr", False):
            betas = _rescale_zero_terminal_snr(betas)
        alphas = 1.0 - betas
        return cls(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=torch.cumprod(alphas, dim=0),
            num_train_timesteps=T,
            prediction_type=prediction_type,
            variance_type=variance_type,
            clip_sample=bool(cfg.get("clip_sample", True)),
            clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
            timestep_spacing=spacing,
            steps_offset=int(cfg.get("steps_offset", 0)),
            set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
        )

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        """DDIM's ᾱ for the step after t = 0: 1 with `set_alpha_to_one`, else ᾱ_0 (diffusers' `final_alpha_cumprod`)."""
        return torch.tensor(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    def check_steps(self, num_steps: int) -> int:
        """Return `num_steps` if it is an integer in [1, T], else raise a `DenoqError`."""
        T = self.num_train_timesteps
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
            raise DenoqError(f"steps={num_steps!r} is out of range: choose an integer from 1 to {T} (the model's T)")
        return int(num_steps)

    def timesteps(self, num_steps: int, sampler: str) -> torch.Tensor:
        """The descending int64 timesteps, as diffusers' `DDPMScheduler` / `DDIMScheduler.set_timesteps(num_steps)`.

        Both schedulers space timesteps the same way (`leading`: `arange(n) * (T // n) + steps_offset`; `trailing`:
        `round(arange(T, 0, -T/n)) - 1`; `linspace`: `round(linspace(0, T-1, n))`). One deviation: for some n (61,
        103, ... at T=1000) diffusers' float `arange` in `trailing` yields an extra n+1-th timestep −1, which it would
        then index as ᾱ[−1]; we keep the first n, which are diffusers' own.
        """
        check_sampler(sampler)
        n = self.check_steps(num_steps)
        T = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        elif self.timestep_spacing == "leading":
            step_ratio = T // n
            ts = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)
            ts += self.steps_offset
        else:  # trailing
            step_ratio = T / n
            ts = np.round(np.arange(T, 0, -step_ratio)).astype(np.int64)
            ts -= 1
            ts = ts[:n]
        if ts.min() < 0 or ts.max() >= T:
            raise DenoqError(
                f"timesteps {ts.min()}..{ts.max()} fall outside [0, {T - 1}] "
                f"(steps={n}, steps_offset={self.steps_offset}); lower steps_offset or the number of steps"
            )
        return torch.from_numpy(ts)

    def prev_timesteps(self, num_steps: int, sampler: str) -> torch.Tensor:
        """For each timestep of `timesteps(num_steps, sampler)`, the timestep the step lands on (−1: the end).

        DDPM (diffusers' `previous_timestep` once `set_timesteps` ran): the next entry of the list, −1 after the last.
        DDIM (diffusers' `DDIMScheduler.step`): `t − T // num_steps`, negative meaning "use `final_alpha_cumprod`".
        """
        ts = self.timesteps(num_steps, sampler)
        if sampler == "ddpm":
            return torch.cat([ts[1:], torch.tensor([-1], dtype=torch.int64)])
        return ts - self.num_train_timesteps // len(ts)
