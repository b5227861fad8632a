"""The noise schedule of a diffusion model, read from a diffusers scheduler config.

The forward process (Ho et al. 2020, eq. 2 and 4) is fixed by the betas:
`q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 − ᾱ_t) I)` with `α_t = 1 − β_t` and `ᾱ_t = ∏_{s≤t} α_s`.
The betas, ᾱ and the timestep spacing are read from diffusers' own `DDPMScheduler` built from the config (DDIM's
`DDIMScheduler` computes them identically), so our samplers reproduce diffusers' to float rounding. Only the numbers
live here; the update rules are in `ddpm.py` and `ddim.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from denoq.errors import DenoqError
from denoq.sampling.names import (
    BETA_SCHEDULER_CLASSES,
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    VARIANCE_TYPES,
    check_sampler,
    scheduler_class,
)


def _diffusers_scheduler(cfg: Mapping[str, Any]) -> Any:
    """diffusers' own `DDPMScheduler` of the config (the betas, ᾱ and timestep spacing come from it; the DDPM and
    DDIM steps in `ddpm.py` / `ddim.py` read them). Keys that DDPM does not take (DDIM's `set_alpha_to_one`) are
    read by `NoiseSchedule` itself."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr", "timestep_spacing", "steps_offset")
    return DDPMScheduler(**{k: cfg[k] for k in keys if k in cfg})


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
        name = scheduler_class(cfg)
        if name not in BETA_SCHEDULER_CLASSES:
            raise DenoqError(f"scheduler {name} has no DDPM noise schedule (betas) denoq can calibrate with; denoq "
                             f"takes the discrete-time schedulers {', '.join(BETA_SCHEDULER_CLASSES)}")
        T = cfg.get("num_train_timesteps", 1000)
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise DenoqError(f"scheduler config: num_train_timesteps={T!r} must be a positive integer")
        if cfg.get("thresholding", False):
            raise DenoqError("scheduler config: thresholding=True is not supported; set it to false")
        prediction_type = _choice(cfg, "prediction_type", "epsilon", PREDICTION_TYPES)
        variance_type = _choice(cfg, "variance_type", "fixed_small", VARIANCE_TYPES) \
            if name == "DDPMScheduler" else "fixed_small"  # the others' variance_type means something else
        spacing = _choice(cfg, "timestep_spacing", "leading", TIMESTEP_SPACINGS)

        trained = cfg.get("trained_betas")
        if trained is not None and len(trained) != T:
            raise DenoqError(f"scheduler config: trained_betas has {len(trained)} values, expected {T}")
        if trained is None:
            _choice(cfg, "beta_schedule", "linear", BETA_SCHEDULES)
        scheduler = _diffusers_scheduler(cfg)
        return cls(
            betas=scheduler.betas,
            alphas=scheduler.alphas,
            alphas_cumprod=scheduler.alphas_cumprod,
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
        scheduler = _diffusers_scheduler({"num_train_timesteps": T, "timestep_spacing": self.timestep_spacing,
                                          "steps_offset": self.steps_offset})
        scheduler.set_timesteps(n)
        ts = scheduler.timesteps.numpy().astype(np.int64)[:n]
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
