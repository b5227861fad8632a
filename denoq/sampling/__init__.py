"""Sampling: noise schedules, DDPM / DDIM steps and the loop over any backend `eps(x, t, cond)`.

The bottom layer of denoq (imports torch and numpy only). With corrections off, the samplers reproduce diffusers'
`DDPMScheduler` / `DDIMScheduler` and their pipelines to float rounding, random numbers included.
"""

from denoq.sampling.ddim import ddim_step
from denoq.sampling.ddpm import ddpm_step
from denoq.sampling.loop import Callback, EpsFn, module_eps, sample
from denoq.sampling.schedule import SAMPLERS, NoiseSchedule, check_sampler
from denoq.sampling.step import StepOut, predict_x0

__all__ = [
    "SAMPLERS",
    "Callback",
    "EpsFn",
    "NoiseSchedule",
    "StepOut",
    "check_sampler",
    "ddim_step",
    "ddpm_step",
    "module_eps",
    "predict_x0",
    "sample",
]
