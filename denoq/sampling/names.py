"""The schedulers and samplers denoq knows by name, and the checks on them.

Torch-free, so that reading an artifact (`denoq inspect`) names its scheduler without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from denoq.errors import DenoqError

SAMPLERS = ("ddpm", "ddim")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
#: the diffusers schedulers denoq's own sampler implements (`SAMPLERS`), to float rounding
SAMPLER_CLASSES = ("DDPMScheduler", "DDIMScheduler")
#: discrete-time schedulers whose configs hold the same training noise schedule (betas) as DDPM's: a model trained
#: with it is calibrated on denoq's DDPM/DDIM trajectories, and sampled with them through diffusers (the drop-in)
BETA_SCHEDULER_CLASSES = (*SAMPLER_CLASSES, "PNDMScheduler", "EulerDiscreteScheduler",
                          "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                          "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "LMSDiscreteScheduler",
                          "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                          "DEISMultistepScheduler", "LCMScheduler", "TCDScheduler", "DDIMParallelScheduler",
                          "DDPMParallelScheduler")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def check_sampler(sampler: str) -> str:
    """Return `sampler` if it is one of `SAMPLERS`, else raise a `DenoqError`."""
    if sampler not in SAMPLERS:
        raise DenoqError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    return sampler


def scheduler_class(cfg: Mapping[str, Any]) -> str:
    """The scheduler class a config was saved from (`_class_name`; DDPMScheduler when absent)."""
    return str(cfg.get("_class_name") or "DDPMScheduler")


def check_sampler_class(cfg: Mapping[str, Any]) -> None:
    """Refuse, in one line, to sample with denoq's own DDPM/DDIM a model whose pipeline ships another scheduler
    (denoq never substitutes one silently)."""
    name = scheduler_class(cfg)
    if name not in SAMPLER_CLASSES:
        raise DenoqError(f"the model's scheduler is {name}, which denoq's own sampler does not implement (it "
                         f"implements {' and '.join(SAMPLER_CLASSES)}); sample through diffusers with "
                         "pipe.unet = denoq.load(ART), or save a DDIMScheduler into the pipeline and recompile")
