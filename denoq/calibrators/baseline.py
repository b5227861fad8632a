"""The backbone calibration: round-to-nearest per-channel weights and observed activation ranges.

Weights: int8 symmetric per output channel, s_c = max|w_c| / 127 (`quantizer.symmetric_weight_quant`).
Activations: each layer's input gets a per-timestep scale table of length T (DESIGN.md, QuantPlan). With
`timestep_groups` G = 1 it is one (scale, zero point) from the observer over all calibration timesteps; with G > 1
the calibrated timesteps are split into the G contiguous groups of least quantization error and each group gets
its own scale (ADP-DM, `timegroups.py`). For the `ort-cpu` target the output of conv and 2-D linear layers, which
ORT fuses as QLinearConv / QGemm, is quantized too with one range (not for the layer producing the model's output:
quantizing ε itself costs quality and buys no fusion that matters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from denoq.calibrators.observers import ObserverSettings, observe_qparams
from denoq.calibrators.quantizer import symmetric_weight_quant
from denoq.calibrators.stats import LayerStats, TensorStats
from denoq.calibrators.timegroups import Segment, grouped_act_quant
from denoq.layers import layer_op
from denoq.plan import ActQuant, LayerPlan, QuantPlan


@dataclass(frozen=True)
class BaselineSettings:
    target: str
    weight_bits: int
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
                        num_train_timesteps: int, progress: bool = False
                        ) -> tuple[QuantPlan, dict[str, list[Segment]]]:
    """A QuantPlan for `layers` from their activation statistics (see module docstring), and each layer's input
    timestep groups as (first, last) calibrated timestep."""
    plan = QuantPlan(num_train_timesteps=num_train_timesteps, target=settings.target)
    groups: dict[str, list[Segment]] = {}
    desc = f"weights and ranges ({settings.timestep_groups} timestep group(s))"
    for name, module in tqdm(layers.items(), desc=desc, unit="layer", disable=not progress):
        w_int, w_scale = symmetric_weight_quant(module.weight, settings.weight_bits)
        st = stats[name]
        out_q = None
        if (settings.quantize_outputs and st.output.values and not st.is_model_output
                and (layer_op(module) == "conv" or st.input_ndim == 2)):
            out_q = _act_quant(st.output, settings.activations, num_train_timesteps)
        in_q, groups[name] = grouped_act_quant(st.input, settings.timestep_groups, settings.activations,
                                               num_train_timesteps)
        plan.add(LayerPlan(name=name, op=layer_op(module), weight_bits=settings.weight_bits, weight_int=w_int,
                           weight_scale=w_scale, input=in_q, output=out_q))
    return plan, groups
