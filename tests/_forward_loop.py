"""A user's own sampling loop for `forward_loop` tests: diffusers' DDIM scheduler over seeded noise."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler

from denoq.compiler.load import ModelSpec


def ddim_loop(spec: ModelSpec, seed: int, samples: int = 8, steps: int = 4) -> Callable[[torch.nn.Module], None]:
    """`forward_loop(model)`: `samples` trajectories of `steps` DDIM steps from noise drawn with `seed`, in two
    batches (the model called per batch and step, as a pipeline run per batch calls it)."""
    def loop(model: torch.nn.Module) -> None:
        scheduler = DDIMScheduler.from_config(spec.scheduler_config)
        scheduler.set_timesteps(steps)
        noise = torch.randn(samples, *spec.sample_shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for x in noise.split(samples // 2):
                for t in scheduler.timesteps:
                    x = scheduler.step(model(x, t).sample, t, x).prev_sample

    return loop
