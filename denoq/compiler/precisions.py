"""The layers' plans by precision: the recipe's number formats turned into the weight stage's and the observers'
settings, and each group of layers calibrated with its own (docs/recipes.md, Number formats).

A recipe quantizes its layers in one precision, except that `layers.conv_format=fp8` puts the convolutions in FP8
E4M3 weights and per-tensor activations (TensorRT's FP4 path runs GEMMs only). For each group: SVDQuant's smoothing
and low-rank branch where `svdquant.*` asks (`denoq.calibrators.svdquant`: the weight stage and the statistics then
run on the model with the residual weights and smoothed inputs), the weight stage (`weights.method`), the
activation statistics and quantizers (per tensor with timestep groups, or dynamic blocks).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from denoq.calibrators.baseline import BaselineSettings, activation_signed, build_baseline_plan
from denoq.calibrators.calibset import CalibrationSet
from denoq.calibrators.gptq import GptqSettings
from denoq.calibrators.observers import ObserverSettings
from denoq.calibrators.stats import LayerStats, collect_stats
from denoq.calibrators.svdquant import SvdQuantSettings, smoothed_model
from denoq.calibrators.timegroups import Segment
from denoq.calibrators.weights import WeightSettings, round_weights
from denoq.compiler.backends import torch_eps
from denoq.compiler.recipe import Recipe
from denoq.errors import DenoqError
from denoq.plan import QuantPlan

log = logging.getLogger("denoq")

#: The recipe's format names → the plan's number grids (`denoq.formats`).
GRIDS = {"int": "int", "fp8": "fp8", "nvfp4": "fp4"}
#: What `layers.conv_format=fp8` sets for the convolutions.
FP8_KEYS = {"weights.format": "fp8", "weights.bits": 8, "weights.group_size": 0, "activations.format": "fp8",
            "activations.bits": 8, "activations.block_size": 0, "svdquant.rank": 0, "svdquant.alpha": 0.0}


def observer_settings(recipe: Recipe) -> ObserverSettings:
    """The activation observer of the recipe (its method on the recipe's activation grid)."""
    a = recipe.config.activations
    return ObserverSettings(method=a.observer, bits=a.bits, signed=activation_signed(recipe.config.target),
                            percentile=a.percentile, lm_rho=a.lm_rho, format=GRIDS[a.format])


def attention_observer(recipe: Recipe) -> ObserverSettings:
    """The observer of the attention matmuls' per-tensor quantizers: the recipe's, or with dynamic activation blocks
    its 8-bit per-tensor counterpart (FP8 for NVFP4, as TensorRT's FP4 recipes keep FP8 attention; else int8)."""
    a = recipe.config.activations
    if not a.block_size:
        return observer_settings(recipe)
    fmt = "fp8" if a.format == "nvfp4" else a.format
    return observer_settings(Recipe(recipe.name, {**recipe.values, "activations.bits": 8, "activations.format": fmt}))


def weight_settings(recipe: Recipe, method: str) -> WeightSettings:
    """The weight stage's settings for `method` (the recipe's rounding, grid and Hessian sampling)."""
    w = recipe.config.weights
    rounding = GptqSettings(bits=w.bits, group_size=w.group_size, damp=w.damp, act_order=w.act_order,
                            format=GRIDS[w.format])
    return WeightSettings(method, rounding, w.sequential, w.hessian_samples, conv_blocks=w.conv_blocks)


def precision_groups(recipe: Recipe, layers: dict[str, nn.Module]) -> list[tuple[Recipe, dict[str, nn.Module]]]:
    """The layers by the recipe they are calibrated with: the recipe itself, and with `layers.conv_format=fp8`
    the convolutions under the recipe with `FP8_KEYS`. Empty groups are left out."""
    c = recipe.config
    if c.layers.conv_format != "fp8":
        fp4 = sorted(n for n, m in layers.items() if isinstance(m, nn.Conv2d)) if "nvfp4" in (
            c.weights.format, c.activations.format) else []
        if fp4:
            raise DenoqError(f"NVFP4 on convolution {fp4[0]} (and {len(fp4) - 1} more): TensorRT's FP4 path runs "
                             "GEMMs only; set layers.conv_format=fp8 (or keep them in float with layers.keep_fp)")
        return [(recipe, layers)]
    convs = {n: m for n, m in layers.items() if isinstance(m, nn.Conv2d)}
    rest = {n: m for n, m in layers.items() if n not in convs}
    fp8 = Recipe(recipe.name, {**recipe.values, **FP8_KEYS})
    return [(r, group) for r, group in ((recipe, rest), (fp8, convs)) if group]


def _weights(model: nn.Module, recipe: Recipe, layers: dict[str, nn.Module], calib: CalibrationSet
             ) -> tuple[dict, dict[str, Any]]:
    """Round the weights: `weights.method` (adaround starts from `accuquant.init`'s rounding)."""
    w = recipe.config.weights
    method = ("gptq" if recipe.config.accuquant.init == "gptq" else "rtn") if w.method == "adaround" else w.method
    weights, info = round_weights(model, layers, calib, weight_settings(recipe, method))
    if info["per_channel_layers"]:
        log.info("weights.group_size=%d: %d layer(s) use per-output-channel scales (convolutions without "
                 "weights.conv_blocks, or input channels the group size does not divide; manifest "
                 "calibration.weights.per_channel_layers)", w.group_size, len(info["per_channel_layers"]))
    for name, why in info.get("fallbacks", {}).items():
        log.info("weights of %s: %s", name, why)
    return weights, info


def group_plan(model: nn.Module, recipe: Recipe, layers: dict[str, nn.Module], calib: CalibrationSet,
               num_train_timesteps: int, seed: int
               ) -> tuple[QuantPlan, dict[str, list[Segment]], dict[str, Any], dict[str, LayerStats]]:
    """One precision group's plan (module docstring), each layer's timestep groups, what the weight stage and
    SVDQuant report, and the activation statistics the quantizers came from."""
    c = recipe.config
    info: dict[str, Any] = {}
    parts: dict = {}
    if c.svdquant.rank or c.svdquant.alpha:
        model, layers, parts = smoothed_model(model, layers, calib, SvdQuantSettings(c.svdquant.rank,
                                                                                     c.svdquant.alpha))
        info["svdquant"] = {"rank": c.svdquant.rank, "alpha": c.svdquant.alpha, "layers": len(parts)}
    weights, info["weights"] = _weights(model, recipe, layers, calib)
    stats = {} if c.activations.bits > 8 else collect_stats(torch_eps(model), layers, calib,
                                                            outputs=c.target == "ort-cpu", seed=seed)
    settings = BaselineSettings(c.target, observer_settings(recipe), c.activations.timestep_groups,
                                c.activations.block_size)
    plan, groups = build_baseline_plan(layers, stats, settings, num_train_timesteps, weights)
    for name, part in sorted(parts.items()):
        plan.layers[name] = part.attach(plan.layers[name])
    return plan, groups, info, stats
