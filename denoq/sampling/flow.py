"""Flow matching: the sigma schedule and the Euler sampler of rectified-flow models (SD3, Flux).

The forward process interpolates data and noise, `x_σ = (1 − σ) x_0 + σ ε` for σ ∈ [0, 1] (Lipman et al. 2023;
Esser et al. 2024, eq. 3 with a_t = 1 − t, b_t = t); the model predicts the velocity `v = ε − x_0`, and the Euler
step integrates `dx/dσ = v` from σ to the next σ': `x_σ' = x_σ + (σ' − σ) v̂`. The model's timestep input is
`t = 1000 σ` (the training timestep scale; Flux's transformer divides it by 1000 itself).

The sigmas are read from diffusers' own `FlowMatchEulerDiscreteScheduler` built from the config, so the sampler
equals diffusers' to float rounding: a static shift `σ ← sσ / (1 + (s − 1)σ)` (SD3: s = 3), or with
`use_dynamic_shifting` the resolution-dependent shift `σ ← e^μ / (e^μ + 1/σ − 1)` with μ linear in the number of
image tokens between `base_shift` and `max_shift` (Flux; `FlowSchedule.mu`). Config options that bend the schedule
otherwise (Karras / exponential / beta sigmas, a terminal stretch, inverted or stochastic sampling) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from denoq.errors import DenoqError
from denoq.log import bar
from denoq.sampling.cond import backend_output
from denoq.sampling.names import FLOW_SAMPLER, FLOW_SCHEDULER_CLASS
from denoq.sampling.step import randn

#: config keys that must keep diffusers' default for the plain Euler sampler to be the scheduler's
_UNSUPPORTED = {"invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
                "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False}


@dataclass(frozen=True)
class FlowSchedule:
    """A flow-matching scheduler config, checked. `sigmas(steps, mu)` gives the model timesteps and the sigmas."""

    config: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> FlowSchedule:
        name = str(cfg.get("_class_name") or "")
        if name != FLOW_SCHEDULER_CLASS:
            raise DenoqError(f"scheduler {name or 'without _class_name'} is not {FLOW_SCHEDULER_CLASS}; flow "
                             "matching needs its config")
        for key, default in _UNSUPPORTED.items():
            if cfg.get(key) and cfg.get(key) != default:
                raise DenoqError(f"scheduler config: {key}={cfg[key]!r} is not supported by denoq's flow-matching "
                                 f"Euler sampler; set it to {default!r} or sample through diffusers")
        shift_type = cfg.get("time_shift_type", "exponential")
        if shift_type not in ("exponential", "linear"):
            raise DenoqError(f"scheduler config: time_shift_type={shift_type!r}; choose exponential or linear")
        T = cfg.get("num_train_timesteps", 1000)
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise DenoqError(f"scheduler config: num_train_timesteps={T!r} must be a positive integer")
        return cls(dict(sorted(cfg.items())))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))

    @property
    def dynamic(self) -> bool:
        """Whether the shift depends on the resolution (then `sigmas` needs `mu`)."""
        return bool(self.config.get("use_dynamic_shifting", False))

    def mu(self, image_tokens: int) -> float:
        """The dynamic shift μ for `image_tokens` latent tokens: linear from `base_shift` at `base_image_seq_len`
        to `max_shift` at `max_image_seq_len` (diffusers' Flux pipeline, `calculate_shift`)."""
        c = self.config
        lo_n, hi_n = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        lo, hi = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        slope = (hi - lo) / (hi_n - lo_n)
        return float(image_tokens * slope + lo - slope * lo_n)

    def mu_for(self, sample_shape: Sequence[int], patch: int = 1) -> float | None:
        """μ for samples of `sample_shape` — (C, H, W) in `patch` × `patch` tokens, or packed (tokens, channels) —
        as the pipelines derive it from the resolution; None when the schedule does not shift by resolution."""
        if not self.dynamic:
            return None
        if len(sample_shape) == 2:
            return self.mu(int(sample_shape[0]))
        return self.mu((int(sample_shape[1]) // patch) * (int(sample_shape[2]) // patch))

    def _scheduler(self) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        keys = {k: v for k, v in self.config.items() if not k.startswith("_")}
        return FlowMatchEulerDiscreteScheduler.from_config(keys)

    def sigmas(self, steps: int, mu: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps float32 [steps], sigmas float32 [steps + 1] ending at 0) for `steps` Euler steps."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise DenoqError(f"steps={steps!r} must be a positive integer")
        if self.dynamic and mu is None:
            raise DenoqError("this flow-matching schedule shifts by resolution (use_dynamic_shifting): give mu, "
                             "FlowSchedule.mu(image_tokens)")
        sched = self._scheduler()
        sched.set_timesteps(steps, mu=mu)
        return sched.timesteps.to(torch.float32), sched.sigmas.to(torch.float32)


def flow_euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """`x_σ' = x_σ + (σ' − σ) v̂`, in float32 as diffusers' `FlowMatchEulerDiscreteScheduler.step` (σ' − σ taken
    in float32 too)."""
    dt = torch.tensor(sigma_next, dtype=torch.float32) - torch.tensor(sigma, dtype=torch.float32)
    return x.to(torch.float32) + dt.to(x.device) * v


def sample_flow(eps: Any, schedule: FlowSchedule, *, steps: int, shape: Sequence[int] | None = None,
                generator: torch.Generator | None = None, x_T: torch.Tensor | None = None, cond: Any = None,
                mu: float | None = None, callback: Any = None, desc: str | None = None) -> torch.Tensor:
    """Integrate from noise (σ = 1) to data (σ = 0) with `steps` Euler steps and return x_0.

    `eps(x, t, cond)` is the backend (the velocity v̂), called with `t` = the scheduler's timesteps (1000 σ,
    float32 [B]). x_T = randn(shape) from `generator` unless given (the pipelines' `prepare_latents`, unpacked).
    `callback(step_index, t, x_t, v̂)` each step, before the update."""
    timesteps, sigmas = schedule.sigmas(steps, mu)
    if x_T is None:
        if shape is None:
            raise DenoqError("sample_flow() needs the shape of x_T or x_T itself")
        x_T = randn(shape, generator, generator.device if generator is not None else torch.device("cpu"))
    x = x_T.to(torch.float32)
    with torch.no_grad():
        for i in bar(range(len(timesteps)), desc=desc or f"{FLOW_SAMPLER} {steps}", leave=False):
            t_b = timesteps[i].expand(x.shape[0]).to(x.device)
            v = backend_output(eps, x, t_b, cond)
            if v.shape[1] != x.shape[1]:
                raise DenoqError(f"the backend returned {v.shape[1]} channels for {x.shape[1]}: a flow-matching "
                                 "model predicts the velocity only, no variance")
            if callback is not None:
                callback(i, t_b, x, v)
            x = flow_euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
    return x
