"""The backbone calibration: the rounded weights plus observed activation ranges.

Weights: rounded by the weight stage (`weights.py`: RTN, OBQ or GPTQ; symmetric, per output channel or blocked).
Activations: each layer's input gets a per-timestep scale table of length T (docs/architecture.md, QuantPlan). With
`timestep_groups` G = 1 it is one (scale, zero point) from the observer over all calibration timesteps; with G > 1
the calibrated timesteps are split into the G contiguous groups of least quantization error and each group gets
its own scale (ADP-DM, `timegroups.py`). For the `ort-cpu` target the output of conv and 2-D linear layers, which
ORT fuses as QLinearConv / QGemm, is quantized too with one range (not for the layer producing the model's output:
quantizing ε itself costs quality and buys no fusion that matters).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from denoq.calibrators.observers import MIN_RANGE, ObserverSettings, observe_qparams
from denoq.calibrators.stats import LayerStats, TensorStats
from denoq.calibrators.timegroups import Segment, grouped_act_quant
from denoq.formats import FP4_MAX, FP8_MAX
from denoq.layers import layer_op
from denoq.log import bar
from denoq.plan import ActQuant, LayerPlan, QuantPlan


@dataclass(frozen=True)
class BaselineSettings:
    """`block_size` > 0: dynamic block activation quantizers instead of the observer's per-tensor ones."""

    target: str
    activations: ObserverSettings
    timestep_groups: int = 1
    block_size: int = 0

    @property
    def quantize_outputs(self) -> bool:
        return self.target == "ort-cpu"


def activation_signed(target: str) -> bool:
    """int8 symmetric activations for TensorRT, uint8 asymmetric for ORT's CPU integer kernels."""
    return target == "trt"


def _act_quant(stats: TensorStats, settings: ObserverSettings, num_train_timesteps: int) -> ActQuant:
    values, amin, amax = stats.pooled()
    scale, zp = observe_qparams(values, amin, amax, settings)
    table = torch.full((num_train_timesteps,), scale, dtype=torch.float32)
    return ActQuant(bits=settings.bits, signed=settings.signed, zero_point=zp, scale=table, format=settings.format)


def block_act_quant(stats: TensorStats, settings: ObserverSettings, block_size: int, channels: int,
                    num_train_timesteps: int) -> ActQuant:
    """A dynamic block quantizer (`ActQuant.block_size`): blocks of `block_size` channels, or of gcd(block_size, C)
    where C is not a multiple of it. Its table: NVFP4's global scale g = amax / (6 · 448) of the pooled input (the
    largest block scale is then the largest FP8 number); 1 for integer blocks, whose table is not read."""
    g = 1.0
    if settings.format == "fp4":
        amin, amax = min(stats.amin.values()), max(stats.amax.values())
        g = max(amax, -amin, MIN_RANGE) / (FP4_MAX * FP8_MAX)
    return ActQuant(bits=settings.bits, signed=True, zero_point=0, format=settings.format,
                    block_size=math.gcd(block_size, channels),
                    scale=torch.full((num_train_timesteps,), g, dtype=torch.float32))


def build_baseline_plan(layers: dict[str, nn.Module], stats: dict[str, LayerStats], settings: BaselineSettings,
                        num_train_timesteps: int, weights: dict[str, LayerPlan]
                        ) -> tuple[QuantPlan, dict[str, list[Segment]]]:
    """A QuantPlan for `layers`: the rounded `weights` (`weights.round_weights`, weight-only plans) plus activation
    quantizers from the statistics (see module docstring; none with 16-bit activations, i.e. W4A16), and each
    layer's input timestep groups as (first, last) calibrated timestep."""
    plan = QuantPlan(num_train_timesteps=num_train_timesteps, target=settings.target)
    groups: dict[str, list[Segment]] = {}
    quantize_acts = settings.activations.bits <= 8
    desc = f"activation ranges ({settings.timestep_groups} timestep group(s))"
    for name, module in bar(layers.items(), desc=desc, unit="layer", total=len(layers) if quantize_acts else 0):
        st = stats.get(name)
        in_q = out_q = None
        groups[name] = []
        if quantize_acts and st is not None:
            if (settings.quantize_outputs and st.output.values and not st.is_model_output
                    and (layer_op(module) == "conv" or st.input_ndim == 2)):
                out_q = _act_quant(st.output, settings.activations, num_train_timesteps)
            if settings.block_size:
                in_q = block_act_quant(st.input, settings.activations, settings.block_size,
                                       module.weight.shape[1] * getattr(module, "groups", 1),
                                       num_train_timesteps)
            else:
                in_q, groups[name] = grouped_act_quant(st.input, settings.timestep_groups, settings.activations,
                                                       num_train_timesteps)
        plan.add(dataclasses.replace(weights[name], input=in_q, output=out_q))
    return plan, groups
