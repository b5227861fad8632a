"""The schedulers and samplers denoq knows by name, and the checks on them.

Torch-free, so that reading an artifact (`denoq inspect`) names its scheduler without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from denoq.errors import DenoqError

SAMPLERS = ("ddpm", "ddim")
#: flow matching: diffusers' scheduler class and denoq's sampler that reproduces it (`denoq.sampling.flow`)
FLOW_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
FLOW_SAMPLER = "flow-euler"
#: every sampler denoq runs: DDPM / DDIM on a beta schedule, the Euler step on a flow-matching one
ALL_SAMPLERS = (*SAMPLERS, FLOW_SAMPLER)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")
#: the diffusers schedulers denoq's own sampler implements (`SAMPLERS`), to float rounding
SAMPLER_CLASSES = ("DDPMScheduler", "DDIMScheduler", FLOW_SCHEDULER_CLASS)
#: discrete-time schedulers whose configs hold the same training noise schedule (betas) as DDPM's: a model trained
#: with it is calibrated on denoq's DDPM/DDIM trajectories, and sampled with them through diffusers (the drop-in)
BETA_SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                          "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                          "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "LMSDiscreteScheduler",
                          "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                          "DEISMultistepScheduler", "LCMScheduler", "TCDScheduler", "DDIMParallelScheduler",
                          "DDPMParallelScheduler")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def check_sampler(sampler: str) -> str:
    """Return `sampler` if it is one of `ALL_SAMPLERS`, else raise a `DenoqError`."""
    if sampler not in ALL_SAMPLERS:
        raise DenoqError(f"unknown sampler {sampler!r}: choose one of {', '.join(ALL_SAMPLERS)}")
    return sampler


def is_flow(cfg: Mapping[str, Any]) -> bool:
    """Whether a scheduler config is flow matching (its model predicts the velocity)."""
    return scheduler_class(cfg) == FLOW_SCHEDULER_CLASS


def default_sampler(cfg: Mapping[str, Any]) -> str:
    """The sampler a command uses when none is named: flow-euler for flow matching, else ddim."""
    return FLOW_SAMPLER if is_flow(cfg) else "ddim"


def check_sampler_for(cfg: Mapping[str, Any], sampler: str) -> str:
    """`sampler` if it runs the model of scheduler config `cfg` (flow-euler for flow matching, DDPM / DDIM for a
    beta schedule), else a one-line DenoqError naming the one to use."""
    check_sampler(sampler)
    if is_flow(cfg) != (sampler == FLOW_SAMPLER):
        fix = FLOW_SAMPLER if is_flow(cfg) else " or ".join(SAMPLERS)
        kind = "a flow-matching" if is_flow(cfg) else "a DDPM-family (beta schedule)"
        raise DenoqError(f"sampler {sampler} cannot run {kind} model ({scheduler_class(cfg)}); use {fix} (--sampler "
                         f"{fix.split()[0]}, calib.sampler={fix.split()[0]})")
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
