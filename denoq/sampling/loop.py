"""The sampling loop: DDPM or DDIM driving any backend `eps(x, t, cond)`.

A backend is a callable `eps(x: Tensor[B, C, H, W] float32, t: Tensor[B] int64, cond) -> Tensor[B, C, H, W]` that
returns the model output (ε̂, or x̂_0 / v for `sample` / `v_prediction` models). It can be the FP PyTorch model, the
quantization simulation, an ONNX Runtime session or a TensorRT engine; the loop neither knows nor cares which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from denoq.errors import DenoqError
from denoq.log import bar
from denoq.sampling.cond import backend_output, call_denoiser, split_variance
from denoq.sampling.ddim import ddim_step
from denoq.sampling.ddpm import ddpm_step
from denoq.sampling.flow import FlowSchedule, sample_flow
from denoq.sampling.names import FLOW_SAMPLER, SAMPLERS, check_sampler, is_flow
from denoq.sampling.schedule import NoiseSchedule
from denoq.sampling.step import randn
from denoq.sampling.vsc import check_residual_var

EpsFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]

__all__ = ["SAMPLERS", "Callback", "EpsFn", "module_eps", "sample", "schedule_from_config"]


def schedule_from_config(cfg: Any) -> NoiseSchedule | FlowSchedule:
    """The schedule a scheduler config describes: flow matching (`FlowSchedule`) or a beta schedule
    (`NoiseSchedule`); each refuses, in one line, what its sampler does not reproduce."""
    return FlowSchedule.from_config(cfg) if is_flow(cfg) else NoiseSchedule.from_config(cfg)


def module_eps(module: Any) -> EpsFn:
    """The backend of a PyTorch model, called as diffusers' pipelines call it (`cond.call_denoiser`). Gradients
    are left on; wrap the call in `torch.no_grad()` to sample."""

    def eps(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return call_denoiser(module, x, t, cond)

    return eps


def sample(
    eps: EpsFn,
    schedule: NoiseSchedule | FlowSchedule,
    *,
    sampler: str,
    steps: int,
    eta: float = 0.0,
    shape: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    x_T: torch.Tensor | None = None,
    cond: Any = None,
    callback: Callback | None = None,
    desc: str | None = None,
    device: torch.device | str | None = None,
    residual_var: torch.Tensor | None = None,
    mu: float | None = None,
) -> torch.Tensor:
    """Run the reverse process from x_T to x_0 and return x_0 (float32, model range, typically [-1, 1]).

    Random numbers come from `generator` in diffusers' order: x_T = randn(shape) first (unless `x_T` is given), then
    one randn(shape) per step exactly where diffusers draws one (DDPM: every step with t > 0; DDIM: every step when
    η > 0). So with the same seed the result equals `DDPMPipeline` / `DDIMPipeline`'s latents before their
    `(x / 2 + 0.5).clamp(0, 1)` (DDIM built as `DDIMScheduler.from_config(config)`, as `DDIMPipeline` does).

    Args:
        eps: the backend, called as `eps(x_t, t, cond)` with `t` an int64 tensor of shape [B] on x's device.
        schedule: the noise schedule (`NoiseSchedule.from_config`).
        sampler: "ddpm" (ancestral, Ho et al. 2020) or "ddim" (Song et al. 2021, with `eta`); "flow-euler" with a
            `FlowSchedule` (flow matching, `denoq.sampling.flow.sample_flow`: float timesteps, no η, no VSC).
        steps: number of inference steps, 1..T; timesteps spaced by the config's `timestep_spacing`.
        eta: DDIM's η ≥ 0 (0: deterministic); must be 0 for DDPM.
        shape: [B, C, H, W] of x_T to draw; not needed when `x_T` is given.
        x_T: the starting noise (then nothing is drawn for it).
        cond: passed through to `eps` (class labels, text embeddings, ...).
        callback: `callback(step_index, t, x_t, eps_out)` each step, before the update (t: int64 [B]).
        desc: the label of the progress bar over the steps (`denoq.log.bar`; default: the sampler's name), e.g.
            "quantized (ort) ddim 50".
        device: where x lives when it is drawn here (default: the generator's device, else CPU).
        residual_var: PTQD's variance schedule calibration (`denoq.sampling.vsc`): float [T], the variance σ_q²(t)
            per element of the backend's residual noise (after its correction head) per training timestep t; each
            step adds noise of std sqrt(max(σ_t² − c_t²·σ_q²(t), 0)) instead of σ_t. The same random numbers are
            drawn. None (default): no calibration, diffusers' sampler exactly. DDIM with η = 0 adds no noise, so
            there it changes nothing.
        mu: a flow-matching schedule's resolution-dependent shift (`FlowSchedule.mu` of the image token count),
            for a config with `use_dynamic_shifting` (Flux); refused for a beta schedule.
    """
    check_sampler(sampler)
    if isinstance(schedule, FlowSchedule) != (sampler == FLOW_SAMPLER):
        raise DenoqError(f"sampler {sampler} does not run a {type(schedule).__name__}; flow-matching schedules take "
                         f"{FLOW_SAMPLER}, beta schedules {' or '.join(SAMPLERS)}")
    if isinstance(schedule, FlowSchedule):
        if eta or residual_var is not None:
            raise DenoqError("the flow-matching Euler sampler is deterministic: it takes no eta and no variance table")
    elif mu is not None:
        raise DenoqError("mu shifts a flow-matching schedule; a beta schedule takes none")
    else:
        steps = schedule.check_steps(steps)
        residual_var = check_residual_var(residual_var, schedule.num_train_timesteps)
        eta = float(eta)
        if eta < 0:
            raise DenoqError(f"eta={eta} must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise)")
        if sampler == "ddpm" and eta != 0:
            raise DenoqError(f"eta={eta} only applies to the ddim sampler; use sampler='ddim' or eta=0")

    if x_T is not None:
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise DenoqError(f"shape {tuple(shape)} does not match x_T's shape {tuple(x_T.shape)}; pass only one")
        x = x_T.to(device=device if device is not None else x_T.device, dtype=torch.float32)
    elif shape is not None:
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        x = randn(shape, generator, torch.device(device))
    else:
        raise DenoqError("sample() needs the shape of x_T or x_T itself: pass shape=(B, C, H, W) or x_T=...")
    if x.dim() < 1:
        raise DenoqError(f"x_T must have a batch dimension, got shape {tuple(x.shape)}")
    if isinstance(schedule, FlowSchedule):
        return sample_flow(eps, schedule, steps=steps, x_T=x, cond=cond, mu=mu, callback=callback, desc=desc)

    timesteps = schedule.timesteps(steps, sampler).tolist()
    prev_timesteps = schedule.prev_timesteps(steps, sampler).tolist()
    batch = x.shape[0]
    with torch.no_grad():
        pairs = list(zip(timesteps, prev_timesteps, strict=True))
        for i, (t, prev_t) in enumerate(bar(pairs, desc=desc or sampler, leave=False)):
            t_b = torch.full((batch,), t, dtype=torch.int64, device=x.device)
            out = backend_output(eps, x, t_b, cond)
            if callback is not None:
                callback(i, t_b, x, out)
            var = None if residual_var is None else residual_var[t]
            model_out, predicted_variance = split_variance(out, x.shape[1])
            if sampler == "ddpm":
                step = ddpm_step(schedule, model_out, t, prev_t, x, residual_var=var,
                                 predicted_variance=predicted_variance)
            else:  # DDIM's σ_t comes from η: a learned variance goes unused, as in diffusers' DiTPipeline
                step = ddim_step(schedule, model_out, t, prev_t, x, eta, residual_var=var)
            x = step.mean
            if step.std is not None:
                x = x + step.std * randn(x.shape, generator, x.device)
    return x
