"""The rules between recipe keys, which each key's own check cannot see.

Each rule reads the typed recipe (`RecipeConfig`) and returns the one-line problem with its fix, or None.
`load_recipe` applies them all to what the user asks for, before any model is loaded; a recipe read back from an
artifact is not re-checked (it describes what was compiled). Rules that need the model (e.g. `calib.guidance`
needs a class-conditional one) live with the stage that has it.
"""

from __future__ import annotations

from collections.abc import Callable

from denoq.compiler.recipe_keys import RecipeConfig
from denoq.errors import DenoqError


def _timesteps_within_steps(c: RecipeConfig) -> str | None:
    k, steps = c.calib.timesteps, c.calib.steps
    if k <= steps:
        return None
    return (f"calib.timesteps={k} asks for more calibration timesteps than the calib.steps={steps} recorded steps "
            f"(only {steps} would be used); set calib.timesteps ≤ {steps} (0 = every recorded step) or "
            f"calib.steps ≥ {k}")


def _groups_need_quantized_activations(c: RecipeConfig) -> str | None:
    if c.activations.bits > 8 and c.activations.timestep_groups > 1:
        return (f"activations.timestep_groups = {c.activations.timestep_groups} needs quantized activations, but "
                "activations.bits = 16 keeps them in floating point; set activations.timestep_groups=1 or "
                "activations.bits=8")
    return None


def _window_needs_adaround(c: RecipeConfig) -> str | None:
    if c.accuquant.window > 0 and c.weights.method != "adaround":
        return (f"accuquant.window={c.accuquant.window} sets the objective of the learned quantizers, but "
                f"weights.method={c.weights.method}; add --set weights.method=adaround")
    return None


def _adaround_alone(c: RecipeConfig) -> str | None:
    if c.weights.method != "adaround":
        return None
    if c.activations.igq_groups > 0:
        return ("weights.method=adaround learns one activation step size per layer; activations.igq_groups is not "
                "supported with it: set activations.igq_groups=0 or choose another weights.method")
    if c.calib.guidance.strip():
        return ("weights.method=adaround reconstructs on unguided sampler steps; calib.guidance is not supported "
                "with it yet: leave calib.guidance empty or choose another weights.method")
    if c.accuquant.window > c.calib.steps:
        return (f"accuquant.window={c.accuquant.window} needs {c.accuquant.window} consecutive sampler steps but "
                f"the calibration records calib.steps={c.calib.steps}; lower accuquant.window or raise calib.steps")
    if c.accuquant.window >= 2 and c.accuquant.perstep_iters >= c.accuquant.iters:
        return (f"accuquant.perstep_iters={c.accuquant.perstep_iters} leaves no iteration of the "
                f"{c.accuquant.window}-step window out of accuquant.iters={c.accuquant.iters}; choose "
                "0 ≤ perstep_iters < iters")
    return None


def _attention_needs_quantized_activations(c: RecipeConfig) -> str | None:
    if c.attention.softmax_grid != "uniform" and not c.attention.quantize:
        return (f"attention.softmax_grid={c.attention.softmax_grid} sets how quantized attention rounds its softmax, "
                "but attention.quantize=false; add --set attention.quantize=true")
    if c.attention.quantize and c.activations.bits > 8:
        return ("attention.quantize=true quantizes activations, but activations.bits = 16; set activations.bits to "
                "8 (or 6, 4)")
    return None


def _igq_needs_one_quantizer_set(c: RecipeConfig) -> str | None:
    if c.activations.igq_groups > 0 and (c.activations.bits > 8 or c.activations.timestep_groups > 1):
        return ("activations.igq_groups groups quantized activations with one set of quantizers: set "
                "activations.bits ≤ 8 and activations.timestep_groups=1")
    return None


def _vsc_needs_ptqd(c: RecipeConfig) -> str | None:
    if c.ptqd.vsc and not c.ptqd.enabled:
        return "ptqd.vsc=true needs the PTQD statistics: set ptqd.enabled=true as well"
    return None


def _one_text_source(c: RecipeConfig) -> str | None:
    given = [k for k, v in (("calib.prompts", c.calib.prompts), ("calib.embeddings", c.calib.embeddings),
                            ("calib.conditioning=random", c.calib.conditioning == "random")) if v]
    if len(given) > 1:
        return f"{' and '.join(given)} are two sources of the text conditioning: keep one"
    return None


def _formats(c: RecipeConfig) -> str | None:
    w, a = c.weights, c.activations
    need = {"fp8": (8, 0), "nvfp4": (4, 16)}
    for section, fmt, bits, group in (("weights", w.format, w.bits, w.group_size),
                                      ("activations", a.format, a.bits, a.block_size)):
        if fmt in need and (bits, group) != need[fmt]:
            what = "group_size" if section == "weights" else "block_size"
            return (f"{section}.format={fmt} needs {section}.bits={need[fmt][0]} and {section}.{what}="
                    f"{need[fmt][1]}; got bits={bits}, {what}={group}")
    floats = w.format != "int" or a.format != "int" or c.layers.conv_format == "fp8"
    if floats and c.target != "trt":
        return "FP8 / NVFP4 are TensorRT's formats: set target=trt"
    if a.format == "int" and a.block_size and (a.bits not in (4, 8) or c.target != "trt"):
        return ("activations.block_size (dynamic int blocks) needs activations.bits=4 or 8 and target=trt's "
                "symmetric quantizers")
    if floats and w.method == "adaround":
        return "weights.method=adaround learns integer grids: use weights.format=int and activations.format=int"
    if a.format != "int" and a.group_search == "differentiable" and a.timestep_groups > 1:
        return ("activations.group_search=differentiable searches integer quantizers; use group_search=dp with "
                f"activations.format={a.format}")
    if a.block_size and (a.timestep_groups > 1 or a.igq_groups > 0):
        return ("dynamic activation blocks compute their scales at run time: set activations.timestep_groups=1 "
                "and activations.igq_groups=0")
    if (c.svdquant.rank or c.svdquant.alpha) and (a.timestep_groups > 1 or a.igq_groups > 0):
        return ("svdquant's smoothing and branch sit on the layer's input: set activations.timestep_groups=1 and "
                "activations.igq_groups=0")
    return None


def _offload_supports(c: RecipeConfig) -> str | None:
    if c.calib.offload == "none":
        return None
    a = c.activations
    learned = c.weights.method == "adaround" and not (c.accuquant.granularity == "block" and c.accuquant.window == 0)
    refused = [k for k, on in (("adaround over the network or sampler windows", learned),
                               ("activations.group_search=differentiable",
                                a.group_search == "differentiable" and a.timestep_groups > 1),
                               ("svdquant", bool(c.svdquant.rank or c.svdquant.alpha)),
                               ("precision.mixed", bool(c.precision.mixed))) if on]
    if refused:
        return (f"calib.offload={c.calib.offload} runs rtn / gptq / obq weights, observers, timestep groups, "
                f"attention, IGQ-ViT groups, PTQD and block-output reconstruction (w4a8); {', '.join(refused)} need "
                "the whole model in memory: set calib.offload=none or leave them off")
    return None


#: Every rule, in the order they are checked (the first problem found is reported).
CROSS_KEY_RULES: tuple[Callable[[RecipeConfig], str | None], ...] = (
    _timesteps_within_steps, _groups_need_quantized_activations, _window_needs_adaround, _adaround_alone,
    _attention_needs_quantized_activations, _igq_needs_one_quantizer_set, _vsc_needs_ptqd,
    _one_text_source, _formats, _offload_supports)


def check_rules(config: RecipeConfig) -> None:
    """DenoqError with the first broken rule's message."""
    for rule in CROSS_KEY_RULES:
        problem = rule(config)
        if problem is not None:
            raise DenoqError(problem)
