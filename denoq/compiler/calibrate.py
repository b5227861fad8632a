"""The calibrate stage: model + recipe → `Calibration` (the QuantPlan and what produced it).

Steps, each a calibrator of its own (docs/architecture.md, Flow): record FP sampling trajectories (or take the
inputs of a user's own loop) → pick the calibration timesteps → round the weights (RTN / GPTQ / OBQ) → activation
statistics → activation quantizers with timestep groups (ADP-DM) → attention quantizers → IGQ-ViT groups →
learned rounding and step sizes (AdaRound / AccuQuant) → PTQD's statistics of the quantized model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from denoq.bops import layer_macs
from denoq.calibrators import calibtimes
from denoq.calibrators.accuquant import AccuQuantSettings, reconstruct
from denoq.calibrators.attention import attention_plans, collect_attention_stats
from denoq.calibrators.baseline import activation_signed
from denoq.calibrators.calibset import CalibrationSet, record_trajectories
from denoq.calibrators.igq import IgqSettings, group_layers
from denoq.calibrators.observers import ObserverSettings
from denoq.calibrators.offload import offloaded
from denoq.calibrators.ptqd import PtqdStats, collect_pairs
from denoq.calibrators.ptqd import fit as fit_ptqd
from denoq.calibrators.simulate import simulated_in_place
from denoq.calibrators.stats import collect_stats
from denoq.calibrators.timegroups_search import search_groups
from denoq.compiler.backends import torch_eps
from denoq.compiler.data_parallel import check_ranks, check_same_plan, shard_pool
from denoq.compiler.load import ModelSpec
from denoq.compiler.parity import check_batch
from denoq.compiler.precisions import attention_observer, group_plan, observer_settings, precision_groups
from denoq.compiler.recipe import Recipe
from denoq.compiler.text_cond import text_condition
from denoq.errors import DenoqError
from denoq.export.onnx_export import GraphInputs
from denoq.layers import match_layers, quantizable_layers, select_layers
from denoq.memory import PeakMemory
from denoq.plan import QuantPlan
from denoq.sampling import NoiseSchedule, schedule_from_config
from denoq.sampling.cond import Cond
from denoq.sampling.flow import FlowSchedule
from denoq.sampling.names import check_sampler_for, default_sampler, is_flow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """What the calibrate stage hands on: the `plan`; the calibration set `calib` (the chosen steps); `pool`, every
    recorded step; `info`, the manifest's `calibration` section; and PTQD's statistics (None without ptqd)."""

    plan: QuantPlan
    calib: CalibrationSet
    pool: CalibrationSet
    info: dict[str, Any]
    ptqd: PtqdStats | None


def guidance_scales(spec: ModelSpec, recipe: Recipe) -> list[float]:
    """The classifier-free guidance scales of the calibration trajectories (`calib.guidance`), [] = unguided;
    DenoqError for text that is not a list of numbers ≥ 0, or guidance on an unconditional model."""
    text = recipe.config.calib.guidance.strip()
    if not text:
        return []
    try:
        scales = [float(v) for v in text.split(",")]
    except ValueError:
        scales = []
    if not scales or not all(np.isfinite(s) and s >= 0 for s in scales):
        raise DenoqError(f"calib.guidance={text!r} is not a comma-separated list of guidance scales ≥ 0; write e.g. "
                         "--set calib.guidance=1,2,4 (or leave it empty for unguided trajectories)")
    if spec.cond_input != "class_labels" and spec.text is None:
        raise DenoqError(f"calib.guidance={text} needs a class-conditional or text-to-image model; {spec.name} is "
                         "neither, leave calib.guidance empty")
    if spec.packed:
        raise DenoqError(f"calib.guidance={text}: Flux is guidance-distilled, FluxPipeline runs no classifier-free "
                         "guidance (Flux-dev's guidance is an input, calibrated at the pipeline's 3.5); leave "
                         "calib.guidance empty")
    return scales


def check_conditioning_keys(spec: ModelSpec, recipe: Recipe) -> None:
    """The `calib.*` conditioning keys fit the model: prompts need text encoders, embeddings and random
    conditioning a text model; a UNet folder without text encoders needs one of them."""
    c = recipe.config.calib
    if spec.text is None:
        if c.prompts or c.embeddings or c.conditioning == "random":
            raise DenoqError(f"calib.prompts / calib.embeddings / calib.conditioning=random are for text-to-image "
                             f"models; {spec.name} is not one, leave them unset")
    elif spec.text.pipeline_class is None and not (c.embeddings or c.conditioning == "random"):
        raise DenoqError(f"{spec.name} has no text encoders to encode prompts with; give the conditioning as "
                         "--set calib.embeddings=FILE.safetensors (what encode_prompt returns), or opt in to "
                         "unrepresentative --set calib.conditioning=random")


def resolve_sampler(spec: ModelSpec, recipe: Recipe) -> Recipe:
    """The recipe with `calib.sampler=auto` made the model's own sampler (`default_sampler`: flow-euler for a
    flow-matching scheduler, else ddim), as the artifact then records it."""
    if recipe["calib.sampler"] != "auto":
        return recipe
    return Recipe(recipe.name, {**recipe.values, "calib.sampler": default_sampler(spec.scheduler_config)})


def check_sampler_keys(spec: ModelSpec, recipe: Recipe, own_trajectories: bool = True) -> None:
    """`calib.sampler` runs the model's scheduler (`check_sampler_for`) when denoq records the trajectories
    (`own_trajectories`; a user's forward_loop brings its own); a flow-matching model (velocity
    prediction, float timesteps) calibrates with observers and GPTQ/RTN weights, one timestep group: PTQD's
    correction is derived for ε-prediction DDPM/DDIM steps, and AccuQuant reconstructs over DDPM/DDIM windows; a
    learned-variance model (ε and Σ) likewise, with timestep groups."""
    c = recipe.config
    if own_trajectories:
        check_sampler_for(spec.scheduler_config, c.calib.sampler)
    output_methods = (("ptqd.enabled=true", c.ptqd.enabled),
                      ("weights.method=adaround", c.weights.method == "adaround"),
                      ("precision.mixed", bool(c.precision.mixed)))
    if spec.learned_variance:
        refused = [k for k, on in output_methods if on]
        if refused:
            raise DenoqError(f"{spec.name} predicts its variance (out_channels = 2 × in_channels): "
                             f"{', '.join(refused)} model the ε output alone and are not implemented for it; "
                             "calibrate it with observers and rtn/gptq weights")
    if not is_flow(spec.scheduler_config):
        return
    refused = [k for k, on in (*output_methods,
                               ("activations.timestep_groups>1", c.activations.timestep_groups > 1)) if on]
    if refused:
        raise DenoqError(f"{spec.name} is a flow-matching model: {', '.join(refused)} are not implemented for "
                         "velocity prediction yet; calibrate it with observers and rtn/gptq weights")


def calibration_cond(spec: ModelSpec, recipe: Recipe, n: int, guided: bool) -> tuple[Cond, Cond, dict[str, Any]]:
    """(conditioning of the n calibration trajectories, the null conditioning of guidance, what they are for
    the manifest). Labels: their own stream (the recipe seed + 1), a real class when guided (the null label enters
    through the guidance's unconditional half). Text: prompts, embeddings or random (`text_cond`)."""
    c = recipe.config
    if spec.text is not None:
        check_conditioning_keys(spec, recipe)
        text = text_condition(spec, c.calib.prompts, c.calib.embeddings, c.calib.conditioning == "random", n,
                              c.seed + 1)
        info = {"source": text.source, "representative": text.representative, "prompts": len(set(text.prompts))}
        if not text.representative:
            log.warning("calibrating %s on random text embeddings (calib.conditioning=random): the quantization "
                        "ranges need not fit any prompt", spec.name)
        return text.cond, text.null, info
    check_conditioning_keys(spec, recipe)
    null = torch.tensor(spec.num_classes) if guided else None
    if guided:
        return torch.randint(0, int(spec.num_classes), (n,), generator=torch.Generator().manual_seed(c.seed + 1)), \
            null, {"source": "labels"}
    cond = spec.random_cond(n, c.seed + 1)
    return cond, null, {"source": "labels" if cond is not None else "none"}


def record_pool(spec: ModelSpec, recipe: Recipe) -> CalibrationSet:
    """The FP sampling trajectories the recipe asks for (`calib.*`, `seed`), every step recorded; with
    `calib.guidance`, trajectory i guided at scale i mod the number of scales. `pool.conditioning` says what
    conditioned them."""
    recipe = resolve_sampler(spec, recipe)
    c = recipe.config
    n = c.calib.samples
    scales = guidance_scales(spec, recipe)
    guidance = torch.tensor([scales[i % len(scales)] for i in range(n)]) if scales else None
    cond, null, info = calibration_cond(spec, recipe, n, bool(scales))
    schedule = schedule_from_config(spec.scheduler_config)
    mu = schedule.mu_for(spec.sample_shape, spec.patch) if isinstance(schedule, FlowSchedule) else None
    pool = record_trajectories(torch_eps(spec.module), schedule, sampler=c.calib.sampler, steps=c.calib.steps,
                               n_samples=n, sample_shape=spec.sample_shape, seed=c.seed, cond=cond, guidance=guidance,
                               null_cond=null if scales else None, mu=mu, timestep_scale=spec.timestep_scale,
                               sharded=True)
    pool.conditioning = info
    return pool


def calibration_set(spec: ModelSpec, recipe: Recipe, layers: dict[str, nn.Module],
                    pool: CalibrationSet | None = None) -> tuple[CalibrationSet, dict[str, Any], CalibrationSet]:
    """Record the FP trajectories (or take `pool`, the inputs of a user's own loop) and keep the steps
    `activations.calib_timesteps` picks (`calibtimes`).

    Returns the calibration set, what the rule reports (for the manifest) and every recorded step (PTQD's
    statistics need each step of the sampler)."""
    c = recipe.config
    pool = record_pool(spec, recipe) if pool is None else pool
    n = pool.trajectories
    strategy, k = c.activations.calib_timesteps, c.calib.timesteps
    calibtimes.check_count(strategy, len(pool.t), k)
    info: dict[str, Any] = {"strategy": strategy}
    if strategy == "uniform":
        steps = calibtimes.uniform_steps(len(pool.t), k)
    elif strategy == "normal":
        steps = calibtimes.normal_steps(pool.t, k, spec.num_train_timesteps)
    else:
        probe = pool.take(list(range(len(pool.t))), min(calibtimes.PROBE_SAMPLES, n))
        probe_stats = collect_stats(torch_eps(spec.module), layers, probe, outputs=False, seed=c.seed)
        steps, terms = calibtimes.srm_steps(probe_stats, pool.t, k, c.activations.bits,
                                            activation_signed(c.target), c.activations.srm_lambda)
        info.update({key: round(v, 6) for key, v in terms.items()})
    return pool.take(steps), info, pool


def accuquant_settings(recipe: Recipe) -> AccuQuantSettings:
    """The reconstruction settings of `recipe`'s `accuquant.*` keys and `seed`. `accuquant.init` rtn and gptq
    both start the learned rounding at the plan's integers (the weights were rounded by that method)."""
    a = recipe.config.accuquant
    return AccuQuantSettings(
        window=a.window, iters=a.iters, batch=a.batch, lr=a.lr, round_lambda=a.round_lambda,
        init="fp" if a.init == "fp" else "plan", backprop=a.backprop, gradient=a.gradient, start=a.start,
        perstep_iters=a.perstep_iters, objective=a.objective, granularity=a.granularity,
        block_inputs=a.block_inputs, seed=recipe.config.seed)


def check_inputs(spec: ModelSpec, calib: CalibrationSet) -> GraphInputs:
    """A small batch of real calibration inputs with mixed timesteps (export example and parity checks): `check_batch`
    rows."""
    batch = check_batch(sum(p.numel() for p in spec.module.parameters()))
    steps = np.linspace(0, len(calib.t) - 1, batch).round().astype(int)
    x, cond = calib.gather_states([(int(i), j % calib.trajectories) for i, j in zip(steps, range(batch),
                                                                                   strict=True)])
    t = torch.tensor([calib.t[i] for i in steps], dtype=torch.float32)  # the graph takes the scheduler's values
    return GraphInputs(x, t, cond, spec.cond_input or "encoder_hidden_states", spec.resolution_multiple)


def _check_user_loop(spec: ModelSpec, recipe: Recipe) -> None:
    c = recipe.config
    if c.ptqd.enabled or c.weights.method == "adaround" or guidance_scales(spec, recipe):
        raise DenoqError("PTQD, AdaRound/AccuQuant and calib.guidance calibrate on denoq's own trajectories of "
                         "calib.sampler; with a forward_loop set ptqd.enabled=false, another weights.method and no "
                         "calib.guidance, or pass calib=None")


def _attention(spec: ModelSpec, recipe: Recipe, plan: QuantPlan, calib: CalibrationSet,
               observer: ObserverSettings) -> None:
    """`attention.quantize`: add the attention matmuls' quantizers to `plan` (with `activations.igq_groups`, the
    softmax's token-wise groups too)."""
    c = recipe.config
    stats = collect_attention_stats(spec.module, torch_eps(spec.module), calib, seed=c.seed)
    if not stats:
        raise DenoqError(f"attention.quantize=true but {spec.name} has no diffusers Attention module; set "
                         "attention.quantize=false")
    for ap in attention_plans(stats, observer, spec.num_train_timesteps, c.activations.igq_groups,
                              c.attention.softmax_grid == "log2"):
        plan.add_attention(ap)


def _instance_groups(spec: ModelSpec, recipe: Recipe, plan: QuantPlan, layers: dict[str, nn.Module],
                     calib: CalibrationSet) -> tuple[QuantPlan, dict[str, Any]]:
    """`activations.igq_groups`: the plan with IGQ-ViT groups on its token layers, and what was chosen."""
    a = recipe.config.activations
    fp = torch_eps(spec.module)
    inputs = check_inputs(spec, calib)
    macs = layer_macs(spec.module, lambda: fp(inputs.sample[:1], inputs.timestep[:1],
                                              None if inputs.cond is None else inputs.cond[:1]))
    return group_layers(plan, spec.module, fp, layers, calib, macs, IgqSettings(
        a.igq_groups, a.igq_budget, a.bits, activation_signed(recipe.config.target), a.igq_mode))


def calibrate(spec: ModelSpec, recipe: Recipe, pool: CalibrationSet | None = None) -> Calibration:
    """Record the calibration set (or take `pool`: `record_calls` of a user's loop), build the QuantPlan the
    recipe asks for and, with `ptqd.enabled`, PTQD's statistics of the quantized model on every recorded step.
    The recipe's own rules were checked when it was loaded; what needs the model is checked here."""
    recipe = resolve_sampler(spec, recipe)
    c = recipe.config
    if pool is not None:
        _check_user_loop(spec, recipe)
    every_layer = quantizable_layers(spec.module)
    layers, kept_fp = select_layers(every_layer, spec.layer_patterns(c.layers.keep_fp))
    match_layers(every_layer, spec.layer_patterns(c.trt.fp32_layers), "trt.fp32_layers")  # typos, early
    guidance_scales(spec, recipe)
    check_sampler_keys(spec, recipe, own_trajectories=pool is None)
    check_ranks(spec, recipe, pool, bool(guidance_scales(spec, recipe)))
    pool = None if pool is None else shard_pool(pool)
    device = next(spec.module.parameters()).device
    with offloaded(spec.module, c.calib.offload, spec.checkpoint) as store, PeakMemory(device) as peak:
        cal = _calibrate(spec, recipe, pool, layers, kept_fp)
        if store is not None:
            cal.info["offload"] = store.summary()
    if peak.mb is not None:
        cal.info["memory_peak_mb"] = round(peak.mb, 1)
    check_same_plan(cal.plan, cal.ptqd)
    return cal


def _calibrate(spec: ModelSpec, recipe: Recipe, pool: CalibrationSet | None, layers: dict[str, nn.Module],
               kept_fp: list[str]) -> Calibration:
    """`calibrate` once its checks have passed: the calibration set, the plan and PTQD's statistics."""
    c = recipe.config
    fp = torch_eps(spec.module)
    start = time.perf_counter()
    source = "trajectories" if pool is None else "forward_loop"
    calib, step_info, pool = calibration_set(spec, recipe, layers, pool)
    a = c.activations
    plan = QuantPlan(num_train_timesteps=spec.num_train_timesteps, target=c.target)
    groups: dict[str, list] = {}
    group_info: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    for i, (group_recipe, members) in enumerate(precision_groups(recipe, layers)):
        part, part_groups, part_info, part_stats = group_plan(spec.module, group_recipe, members, calib,
                                                              spec.num_train_timesteps, c.seed)
        plan.layers.update(part.layers)
        groups.update(part_groups)
        group_info.update(part_info if i == 0 else {"conv_fp8": part_info})
        inputs.update({n: st.input for n, st in part_stats.items()})
    observer = observer_settings(recipe)
    search: dict[str, Any] = {"method": a.group_search}
    if search["method"] == "differentiable" and a.timestep_groups > 1:
        plan, groups, terms = search_groups(spec.module, plan, inputs, groups, calib, observer, seed=c.seed)
        search.update({key: round(v, 6) for key, v in terms.items()})
    if c.attention.quantize:
        _attention(spec, recipe, plan, calib, attention_observer(recipe))
    igq_info = None
    if a.igq_groups > 0:
        plan, igq_info = _instance_groups(spec, recipe, plan, layers, calib)
    learned: dict[str, Any] | None = None
    if c.weights.method == "adaround":
        plan, learned = reconstruct(spec.module, plan, pool, NoiseSchedule.from_config(spec.scheduler_config),
                                    c.calib.sampler, c.calib.steps, accuquant_settings(recipe))
        if learned["stopped"]:
            log.info("adaround stopped early: %s", learned["stopped"])
    ptqd = None
    if c.ptqd.enabled:
        with simulated_in_place(spec.module, plan) as twin:  # one copy of the weights, offloaded or not
            pairs = collect_pairs(fp, torch_eps(twin), pool, batch_size=64)
            ptqd = fit_ptqd(pairs, spec.num_train_timesteps, c.calib.sampler, c.calib.steps,
                            correlated=c.ptqd.correlation, rows=pool.batch_rows(64))
    info = {"source": source, "conditioning": pool.conditioning, "inputs": len(calib), "timesteps": calib.t,
            "timestep_selection": step_info,
            "kept_fp": kept_fp,
            "timestep_groups": {name: segs for name, segs in groups.items() if len(segs) > 1},
            "group_search": search, **group_info, **({} if learned is None else {"accuquant": learned}),
            **({} if igq_info is None else {"igq": igq_info}),
            "seconds": round(time.perf_counter() - start, 2)}
    return Calibration(plan, calib, pool, info, ptqd)
