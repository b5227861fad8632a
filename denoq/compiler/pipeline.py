"""`denoq compile`: model + recipe → artifact folder (DESIGN.md, Flow). Orchestration only.

Stages: load → record FP calibration trajectories → activation statistics → QuantPlan → FP ONNX export (checked
against PyTorch) → passes (Q/DQ, verified after each) → end-to-end check of the Q/DQ graph against the PyTorch
simulation → artifact (written to a temporary folder and renamed into place).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from safetensors.torch import save_file
from torch import nn

from denoq.bops import FLOAT_BITS, layer_macs, plan_bops
from denoq.calibrators import calibtimes
from denoq.calibrators.accuquant import AccuQuantSettings, check_window, reconstruct
from denoq.calibrators.attention import attention_plans, collect_attention_stats
from denoq.calibrators.baseline import BaselineSettings, activation_signed, build_baseline_plan
from denoq.calibrators.calibset import CalibrationSet, record_trajectories
from denoq.calibrators.gptq import GptqSettings
from denoq.calibrators.igq import IgqSettings, group_layers
from denoq.calibrators.observers import ObserverSettings
from denoq.calibrators.ptqd import PtqdStats, collect_pairs, ptqd_pictures
from denoq.calibrators.ptqd import fit as fit_ptqd
from denoq.calibrators.simulate import simulate
from denoq.calibrators.stats import collect_stats
from denoq.calibrators.timegroups import search_groups
from denoq.calibrators.weights import WeightSettings, round_weights
from denoq.compiler.artifact import Artifact, ArtifactWriter, check_output_dir
from denoq.compiler.backends import PTQD_FILE, torch_eps
from denoq.compiler.build import TRT_GRAPH
from denoq.compiler.load import ModelSpec, load_model
from denoq.compiler.parity import CHECK_BATCH, check_gate, check_scales, first_disagreeing_layer, guided_parity, parity
from denoq.compiler.recipe import Recipe
from denoq.cpu import cpu_record
from denoq.errors import DenoqError
from denoq.export.onnx_export import GraphInputs, export_fp
from denoq.layers import match_layers, quantizable_layers, select_layers
from denoq.onnxio import save_model
from denoq.passes.fp16 import ConvertFp16
from denoq.passes.guidance import GUIDED_GRAPH, GuideClassFree
from denoq.passes.manager import PassManager
from denoq.passes.ptqd_head import AppendPtqdHead
from denoq.passes.qdq import InsertQDQ
from denoq.passes.trt_rules import summarize, trt_violations
from denoq.plan import QuantPlan
from denoq.sampling import NoiseSchedule


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[denoq] {msg}", flush=True)


def guidance_scales(spec: ModelSpec, recipe: Recipe) -> list[float]:
    """The classifier-free guidance scales of the calibration trajectories (`calib.guidance`), [] = unguided;
    DenoqError for text that is not a list of numbers ≥ 0, or guidance on a model without classes."""
    text = recipe["calib.guidance"].strip()
    if not text:
        return []
    try:
        scales = [float(v) for v in text.split(",")]
    except ValueError:
        scales = []
    if not scales or not all(np.isfinite(s) and s >= 0 for s in scales):
        raise DenoqError(f"calib.guidance={text!r} is not a comma-separated list of guidance scales ≥ 0; write e.g. "
                         "--set calib.guidance=1,2,4 (or leave it empty for unguided trajectories)")
    if spec.cond_input != "class_labels":
        raise DenoqError(f"calib.guidance={text} needs a class-conditional model with a null label; {spec.name} is "
                         "not one, leave calib.guidance empty")
    return scales


def calibration_cond(spec: ModelSpec, n: int, seed: int, guided: bool = False) -> torch.Tensor | None:
    """The conditioning of the calibration trajectories (its own stream: the recipe seed + 1); guided trajectories
    request a real class (the null label enters through the guidance's unconditional half)."""
    if guided:
        return torch.randint(0, int(spec.num_classes), (n,), generator=torch.Generator().manual_seed(seed + 1))
    return spec.random_cond(n, seed + 1)


def record_pool(spec: ModelSpec, recipe: Recipe, progress: bool = True) -> CalibrationSet:
    """The FP sampling trajectories the recipe asks for (`calib.*`, `seed`), every step recorded; with
    `calib.guidance`, trajectory i guided at scale i mod the number of scales."""
    n = recipe["calib.samples"]
    scales = guidance_scales(spec, recipe)
    guidance = torch.tensor([scales[i % len(scales)] for i in range(n)]) if scales else None
    return record_trajectories(torch_eps(spec.module), NoiseSchedule.from_config(spec.scheduler_config),
                               sampler=recipe["calib.sampler"], steps=recipe["calib.steps"], n_samples=n,
                               sample_shape=spec.sample_shape, seed=recipe["seed"],
                               cond=calibration_cond(spec, n, recipe["seed"], bool(scales)), guidance=guidance,
                               null_cond=torch.tensor(spec.num_classes) if scales else None, progress=progress)


def calibration_set(spec: ModelSpec, recipe: Recipe, layers: dict[str, nn.Module], progress: bool = True,
                    pool: CalibrationSet | None = None) -> tuple[CalibrationSet, dict[str, Any], CalibrationSet]:
    """Record the FP trajectories (or take `pool`, the inputs of a user's own loop) and keep the steps
    `activations.calib_timesteps` picks (`calibtimes`).

    Returns the calibration set, what the rule reports (for the manifest) and every recorded step (PTQD's
    statistics need each step of the sampler)."""
    fp = torch_eps(spec.module)
    pool = record_pool(spec, recipe, progress) if pool is None else pool
    n = pool.x[0].shape[0]
    strategy, k = recipe["activations.calib_timesteps"], recipe["calib.timesteps"]
    calibtimes.check_count(strategy, len(pool.t), k)
    info: dict[str, Any] = {"strategy": strategy}
    if strategy == "uniform":
        steps = calibtimes.uniform_steps(len(pool.t), k)
    elif strategy == "normal":
        steps = calibtimes.normal_steps(pool.t, k, spec.num_train_timesteps)
    else:
        probe = pool.take(list(range(len(pool.t))), min(calibtimes.PROBE_SAMPLES, n))
        probe_stats = collect_stats(fp, layers, probe, outputs=False, seed=recipe["seed"], progress=progress)
        steps, terms = calibtimes.srm_steps(probe_stats, pool.t, k, recipe["activations.bits"],
                                            activation_signed(recipe["target"]), recipe["activations.srm_lambda"])
        info.update({key: round(v, 6) for key, v in terms.items()})
    return pool.take(steps), info, pool


def accuquant_settings(recipe: Recipe) -> AccuQuantSettings:
    """The reconstruction settings of `recipe`'s `accuquant.*` keys and `seed`. `accuquant.init` rtn and gptq
    both start the learned rounding at the plan's integers (the weights were rounded by that method)."""
    return AccuQuantSettings(
        window=recipe["accuquant.window"], iters=recipe["accuquant.iters"], batch=recipe["accuquant.batch"],
        lr=recipe["accuquant.lr"], round_lambda=recipe["accuquant.round_lambda"],
        init="fp" if recipe["accuquant.init"] == "fp" else "plan", backprop=recipe["accuquant.backprop"],
        gradient=recipe["accuquant.gradient"], start=recipe["accuquant.start"],
        perstep_iters=recipe["accuquant.perstep_iters"], objective=recipe["accuquant.objective"],
        seed=recipe["seed"])


def calibrate(spec: ModelSpec, recipe: Recipe, progress: bool = True, pool: CalibrationSet | None = None
              ) -> tuple[QuantPlan, CalibrationSet, dict, PtqdStats | None]:
    """Record the calibration set (or take `pool`: `record_calls` of a user's loop), build the QuantPlan the
    recipe asks for and, with `ptqd.enabled`, PTQD's statistics of the quantized model on every recorded step."""
    if pool is not None and (recipe["ptqd.enabled"] or recipe["weights.method"] == "adaround"
                             or guidance_scales(spec, recipe)):
        raise DenoqError("PTQD, AdaRound/AccuQuant and calib.guidance calibrate on denoq's own trajectories of "
                         "calib.sampler; with a forward_loop set ptqd.enabled=false, another weights.method and no "
                         "calib.guidance, or pass calib=None")
    if recipe["activations.bits"] > 8 and recipe["activations.timestep_groups"] > 1:
        raise DenoqError(f"activations.timestep_groups = {recipe['activations.timestep_groups']} needs quantized "
                         "activations, but activations.bits = 16 keeps them in floating point; set "
                         "activations.timestep_groups=1 or activations.bits=8")
    adaround = recipe["weights.method"] == "adaround"
    if recipe["accuquant.window"] > 0 and not adaround:
        raise DenoqError(f"accuquant.window={recipe['accuquant.window']} sets the objective of the learned "
                         f"quantizers, but weights.method={recipe['weights.method']}; add --set "
                         "weights.method=adaround")
    settings_aq = None
    if adaround and recipe["activations.igq_groups"] > 0:
        raise DenoqError("weights.method=adaround learns one activation step size per layer; activations.igq_groups "
                         "is not supported with it: set activations.igq_groups=0 or choose another weights.method")
    if adaround and guidance_scales(spec, recipe):
        raise DenoqError("weights.method=adaround reconstructs on unguided sampler steps; calib.guidance is not "
                         "supported with it yet: leave calib.guidance empty or choose another weights.method")
    if adaround:
        check_window(recipe["accuquant.window"], recipe["calib.steps"])
        settings_aq = accuquant_settings(recipe)
    every_layer = quantizable_layers(spec.module)
    layers, kept_fp = select_layers(every_layer, spec.layer_patterns(recipe["layers.keep_fp"]))
    match_layers(every_layer, spec.layer_patterns(recipe["trt.fp32_layers"]), "trt.fp32_layers")  # typos, early
    fp = torch_eps(spec.module)
    start = time.perf_counter()
    source = "trajectories" if pool is None else "forward_loop"
    calib, step_info, pool = calibration_set(spec, recipe, layers, progress, pool)
    target = recipe["target"]
    rounding = GptqSettings(bits=recipe["weights.bits"], group_size=recipe["weights.group_size"],
                            damp=recipe["weights.damp"], act_order=recipe["weights.act_order"])
    method = ("gptq" if recipe["accuquant.init"] == "gptq" else "rtn") if adaround else recipe["weights.method"]
    weights, weight_info = round_weights(spec.module, layers, calib, WeightSettings(
        method, rounding, recipe["weights.sequential"], recipe["weights.hessian_samples"],
        conv_blocks=recipe["weights.conv_blocks"]), progress=progress)
    if weight_info["per_channel_layers"]:
        log(f"weights.group_size={recipe['weights.group_size']}: {len(weight_info['per_channel_layers'])} layer(s) "
            "use per-output-channel scales (convolutions without weights.conv_blocks, or input channels the group "
            "size does not divide; manifest calibration.weights.per_channel_layers)", not progress)
    for name, why in weight_info.get("fallbacks", {}).items():
        log(f"weights of {name}: {why}", not progress)
    stats = {} if recipe["activations.bits"] > 8 else collect_stats(
        fp, layers, calib, outputs=target == "ort-cpu", seed=recipe["seed"], progress=progress)
    observer = ObserverSettings(method=recipe["activations.observer"], bits=recipe["activations.bits"],
                                signed=activation_signed(target), percentile=recipe["activations.percentile"],
                                lm_rho=recipe["activations.lm_rho"])
    settings = BaselineSettings(target, observer, recipe["activations.timestep_groups"])
    plan, groups = build_baseline_plan(layers, stats, settings, spec.num_train_timesteps, weights, progress=progress)
    search: dict[str, Any] = {"method": recipe["activations.group_search"]}
    if search["method"] == "differentiable" and settings.timestep_groups > 1:
        plan, groups, terms = search_groups(spec.module, plan, {n: st.input for n, st in stats.items()}, groups,
                                            calib, observer, seed=recipe["seed"], progress=progress)
        search.update({key: round(v, 6) for key, v in terms.items()})
    if recipe["attention.softmax_grid"] != "uniform" and not recipe["attention.quantize"]:
        raise DenoqError(f"attention.softmax_grid={recipe['attention.softmax_grid']} sets how quantized attention "
                         "rounds its softmax, but attention.quantize=false; add --set attention.quantize=true")
    if recipe["attention.quantize"]:
        quantize_attention(spec, recipe, plan, calib, observer, progress)
    igq_info = None
    if recipe["activations.igq_groups"] > 0:
        plan, igq_info = instance_groups(spec, recipe, plan, layers, calib, progress)
    learned: dict[str, Any] | None = None
    if settings_aq is not None:
        plan, learned = reconstruct(spec.module, plan, pool, NoiseSchedule.from_config(spec.scheduler_config),
                                    recipe["calib.sampler"], recipe["calib.steps"], settings_aq, progress=progress)
        if learned["stopped"]:
            log(f"adaround stopped early: {learned['stopped']}", not progress)
    ptqd = None
    if recipe["ptqd.enabled"]:
        pairs = collect_pairs(fp, torch_eps(simulate(spec.module, plan)), pool, batch_size=64, progress=progress)
        ptqd = fit_ptqd(pairs, spec.num_train_timesteps, recipe["calib.sampler"], recipe["calib.steps"],
                        correlated=recipe["ptqd.correlation"])
    info = {"source": source, "inputs": len(calib), "timesteps": calib.t, "timestep_selection": step_info,
            "kept_fp": kept_fp,
            "timestep_groups": {name: segs for name, segs in groups.items() if len(segs) > 1},
            "group_search": search, "weights": weight_info, **({} if learned is None else {"accuquant": learned}),
            **({} if igq_info is None else {"igq": igq_info}),
            "seconds": round(time.perf_counter() - start, 2)}
    return plan, calib, info, ptqd


def quantize_attention(spec: ModelSpec, recipe: Recipe, plan: QuantPlan, calib: CalibrationSet,
                       observer: ObserverSettings, progress: bool) -> None:
    """`attention.quantize`: add the attention matmuls' quantizers to `plan` (with `activations.igq_groups`, the
    softmax's token-wise groups too)."""
    if recipe["activations.bits"] > 8:
        raise DenoqError("attention.quantize=true quantizes activations, but activations.bits = 16; set "
                         "activations.bits to 8 (or 6, 4)")
    stats = collect_attention_stats(spec.module, torch_eps(spec.module), calib, seed=recipe["seed"],
                                    progress=progress)
    if not stats:
        raise DenoqError(f"attention.quantize=true but {spec.name} has no diffusers Attention module; set "
                         "attention.quantize=false")
    for ap in attention_plans(stats, observer, spec.num_train_timesteps, recipe["activations.igq_groups"],
                              recipe["attention.softmax_grid"] == "log2"):
        plan.add_attention(ap)


def instance_groups(spec: ModelSpec, recipe: Recipe, plan: QuantPlan, layers: dict[str, nn.Module],
                    calib: CalibrationSet, progress: bool) -> tuple[QuantPlan, dict[str, Any]]:
    """`activations.igq_groups`: the plan with IGQ-ViT groups on its token layers, and what was chosen."""
    if recipe["activations.bits"] > 8 or recipe["activations.timestep_groups"] > 1:
        raise DenoqError("activations.igq_groups groups quantized activations with one set of quantizers: set "
                         "activations.bits ≤ 8 and activations.timestep_groups=1")
    fp = torch_eps(spec.module)
    inputs = check_inputs(spec, calib)
    macs = layer_macs(spec.module, lambda: fp(inputs.sample[:1], inputs.timestep[:1],
                                              None if inputs.cond is None else inputs.cond[:1]))
    return group_layers(plan, fp, layers, calib, macs, IgqSettings(
        recipe["activations.igq_groups"], recipe["activations.igq_budget"], recipe["activations.bits"],
        activation_signed(recipe["target"]), recipe["activations.igq_mode"]), progress=progress)


def check_inputs(spec: ModelSpec, calib: CalibrationSet) -> GraphInputs:
    """A small batch of real calibration inputs with mixed timesteps (export example and parity checks)."""
    steps = np.linspace(0, len(calib.t) - 1, CHECK_BATCH).round().astype(int)
    rows = [j % calib.x[0].shape[0] for j in range(CHECK_BATCH)]
    x = torch.stack([calib.x[i][r] for i, r in zip(steps, rows, strict=True)])
    t = torch.tensor([calib.t[i] for i in steps], dtype=torch.int64)
    cond = None if calib.cond is None else calib.cond[rows]
    return GraphInputs(x, t, cond, spec.cond_input or "encoder_hidden_states")


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of a graph's weight tensors: its initializers of rank ≥ 2 (float, int8, packed int4)."""
    model = onnx.load(str(path))
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer
               if len(t.dims) >= 2)


def weight_storage(plan: QuantPlan, fp_path: Path, qdq_path: Path) -> dict[str, Any]:
    """On-disk weight bytes of the Q/DQ graph vs the FP32 graph, and the conv layers whose ≤ 4-bit integers sit
    in an int8 container (TensorRT has no INT4 convolution; MatMul / Gemm weights are ONNX int4)."""
    fp, qdq = onnx_weight_bytes(fp_path), onnx_weight_bytes(qdq_path)
    return {"fp32_bytes": fp, "qdq_bytes": qdq, "ratio": round(qdq / max(fp, 1), 4),
            "conv_int4_in_int8_container": sorted(n for n, lp in plan.layers.items()
                                                  if lp.op == "conv" and lp.weight_bits <= 4)}


def model_cost(spec: ModelSpec, plan: QuantPlan, inputs: GraphInputs) -> dict[str, Any]:
    """MACs and BOPs of one model call with a batch of one (`denoq.bops`), quantized and FP."""
    x, t = inputs.sample[:1], inputs.timestep[:1]
    cond = None if inputs.cond is None else inputs.cond[:1]
    macs = layer_macs(spec.module, lambda: torch_eps(spec.module)(x, t, cond))
    return {"macs_per_call": sum(macs.values()), "bops_per_call": plan_bops(macs, plan),
            "fp_bops_per_call": plan_bops(macs, None), "float_bits": FLOAT_BITS}


def compile_model(model: str | None, recipe: Recipe, out: Path, *, force: bool = False, progress: bool = True,
                  quiet: bool = False, allow_parity_failure: bool = False,
                  pool: CalibrationSet | None = None) -> Artifact:
    """Compile `model` with `recipe` into the artifact folder `out` (see module docstring): one model, one plan.
    `denoq.compiler.api.compile_artifact` also compiles `precision.mixed` recipes (`denoq.compiler.mixed_compile`).

    DenoqError when the Q/DQ graph in ONNX Runtime disagrees with the simulation beyond the parity bound
    (`denoq.compiler.parity`), unless `allow_parity_failure`, which the manifest then records. `pool`: the
    calibration inputs of a user's own loop (`record_calls`) instead of denoq's trajectories."""
    if recipe["precision.mixed"]:
        raise DenoqError(f"precision.mixed={recipe['precision.mixed']} compiles one member per candidate; use "
                         "denoq.quantize or denoq.compiler.api.compile_artifact (the CLI does)")
    check_output_dir(out, force)
    spec = load_model(model)
    log(f"model {spec.name}: {spec.model_class}, sample {spec.sample_shape}, "
        f"{sum(p.numel() for p in spec.module.parameters()):,} parameters", quiet)
    torch.manual_seed(recipe["seed"])
    if recipe["ptqd.vsc"] and not recipe["ptqd.enabled"]:
        raise DenoqError("ptqd.vsc=true needs the PTQD statistics: set ptqd.enabled=true as well")
    plan, calib, calib_info, ptqd = calibrate(spec, recipe, progress, pool)
    log(f"calibrated {len(plan.layers)} layers on {calib_info['inputs']} inputs in {calib_info['seconds']} s", quiet)
    inputs = check_inputs(spec, calib)
    with ArtifactWriter(out, force) as writer:
        fp_path, qdq_path = writer.path("model.fp.onnx"), writer.path("model.qdq.onnx")
        start = time.perf_counter()
        layer_map = export_fp(spec.module, inputs, fp_path)
        log(f"exported FP ONNX ({len(layer_map)} quantizable layers mapped) in {time.perf_counter() - start:.1f} s",
            quiet)
        scales = guidance_scales(spec, recipe)
        head = [] if ptqd is None else [AppendPtqdHead(ptqd.bias, ptqd.inv_one_plus_k)]
        qdq, records = PassManager([InsertQDQ(plan), *([] if scales else head)], verify=True)(
            onnx.load(str(fp_path)))
        save_model(qdq, qdq_path)
        guided_path = None
        if spec.cond_input == "class_labels":  # the guided graph; PTQD's head after the combination when guided
            guided, guided_records = PassManager([GuideClassFree(int(spec.num_classes)), *(head if scales else [])],
                                                 verify=True)(qdq)
            guided_path = writer.path(GUIDED_GRAPH)
            save_model(guided, guided_path)
            records += guided_records
        for rec in records:
            log(f"pass {rec.summary()}", quiet)
        rules, trt_graph, half_path = None, None, None
        if recipe["target"] == "trt":
            graph = qdq
            if recipe["trt.fp16"]:
                patterns = spec.layer_patterns(recipe["trt.fp32_layers"])
                graph, half_records = PassManager([ConvertFp16(patterns)], verify=True)(qdq)
                half_path = writer.path(TRT_GRAPH)
                save_model(graph, half_path)
                records += half_records
            trt_graph = TRT_GRAPH if half_path else "model.qdq.onnx"
            rules = trt_violations(graph)
            if rules:
                log(f"TensorRT: {summarize(rules)} (manifest trt_rules; denoq build refuses this graph)", quiet)
        checks = parity(spec, plan, inputs, fp_path, qdq_path, None if scales else ptqd, half_path)
        if guided_path is not None:
            checks.update(guided_parity(spec, plan, inputs, check_scales(scales), qdq_path, guided_path,
                                        ptqd if scales else None))
        log("parity: " + json.dumps({k: float(f"{v:.3g}") for k, v in checks.items()}), quiet)
        gate = check_gate(checks, allow_parity_failure,
                          lambda: first_disagreeing_layer(spec, plan, inputs, qdq_path, layer_map))
        if not gate["passed"]:
            log(f"parity gate failed (allowed): ratio {gate['ratio']:.2f} > {gate['bound']}, first layer "
                f"{gate['first_layer']}", quiet)
        plan_meta = plan.save(writer.path("plan.safetensors"))
        if ptqd is not None:
            save_file(ptqd.to_tensors(), str(writer.path(PTQD_FILE)))
            writer.path("ptqd.png").write_bytes(ptqd_pictures(ptqd))
        storage = weight_storage(plan, fp_path, qdq_path)
        log(f"weights on disk: {storage['qdq_bytes'] / 1e6:.2f} MB vs {storage['fp32_bytes'] / 1e6:.2f} MB FP32 "
            f"(×{storage['ratio']:.3f})", quiet)
        cost = model_cost(spec, plan, inputs)
        manifest = {
            "recipe": recipe.to_dict(),
            "cost": cost,
            "model": spec.describe(),
            "scheduler": spec.scheduler_config,
            "plan": plan_meta,
            "weights": storage,
            **({} if ptqd is None else {"ptqd": {**ptqd.meta(), "vsc": recipe["ptqd.vsc"],
                                                 "correlation": recipe["ptqd.correlation"],
                                                 "guidance": scales or None}}),
            **({} if guided_path is None else {"guidance": {"graph": GUIDED_GRAPH, "calib_scales": scales,
                                                            "ptqd_after_guidance": bool(scales and ptqd)}}),
            "layer_map": layer_map,
            "calibration": calib_info,
            "checks": checks,
            "parity_gate": gate,
            "cpu": cpu_record(),
            **({} if rules is None else {"trt": {"graph": trt_graph, "fp16": recipe["trt.fp16"]},
                                         "trt_rules": {"count": len(rules), "violations": [str(v) for v in rules]}}),
            "passes": [rec.summary(timed=False) for rec in records],
            "pass_seconds": [round(rec.seconds, 3) for rec in records],
        }
        art = writer.commit(manifest)
    log(f"wrote {out}", quiet)
    return art
