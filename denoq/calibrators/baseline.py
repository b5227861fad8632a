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
from dataclasses import dataclass

import torch
from torch import nn

from denoq.calibrators.observers import ObserverSettings, observe_qparams
from denoq.calibrators.stats import LayerStats, TensorStats
from denoq.calibrators.timegroups import Segment, grouped_act_quant
from denoq.layers import layer_op
from denoq.log import bar
from denoq.plan import ActQuant, LayerPlan, QuantPlan


@dataclass(frozen=True)
class BaselineSettings:
    target: str
    activations: ObserverSettings
    timestep_groups: int = 1

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
    return ActQuant(bits=settings.bits, signed=settings.signed, zero_point=zp, scale=table)


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
            in_q, groups[name] = grouped_act_quant(st.input, settings.timestep_groups, settings.activations,
                                                   num_train_timesteps)
        plan.add(dataclasses.replace(weights[name], input=in_q, output=out_q))
    return plan, groups
