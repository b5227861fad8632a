"""Sampling: noise schedules, DDPM / DDIM steps and the loop over any backend `eps(x, t, cond)`.

The bottom layer of denoq (imports torch and numpy only). With corrections off, the samplers reproduce diffusers'
`DDPMScheduler` / `DDIMScheduler` and their pipelines to float rounding, random numbers included. The names below
load on first use (PEP 562), so that the torch-free `denoq.sampling.names` can be imported on its own.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "SAMPLERS": "names",
    "check_sampler": "names",
    "NoiseSchedule": "schedule",
    "FlowSchedule": "flow",
    "schedule_from_config": "loop",
    "ddim_step": "ddim",
    "ddpm_step": "ddpm",
    "Callback": "loop",
    "EpsFn": "loop",
    "module_eps": "loop",
    "sample": "loop",
    "StepOut": "step",
    "predict_x0": "step",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'denoq.sampling' has no attribute {name!r}")
    return getattr(importlib.import_module(f"denoq.sampling.{_HOME[name]}"), name)
