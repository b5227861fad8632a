"""Recipes: named presets over one flat set of documented keys (DESIGN.md, Interfaces other tools rely on).

A recipe is a flat mapping `key -> value` over the keys of `RECIPE_KEYS`. `load_recipe` starts from a preset of
`RECIPES`, applies an optional TOML file, then the command line's `--set KEY=VALUE` items; later wins. Every value
is checked against its key's spec: an unknown key, a value of the wrong type or a value that is not allowed is a
`DenoqError` whose one-line message names the key and value, what is allowed, and the fix. Nothing is ignored.
Rules between keys (`CROSS_KEY_RULES`, e.g. calib.timesteps ≤ calib.steps) are checked once every value is in.

Some keys name features that later versions of denoq add (GPTQ, timestep groups, PTQD, …). In this version they
accept only their default; any other well-formed value says "is not available in this version of denoq".
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from denoq.errors import DenoqError

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class KeySpec:
    """One recipe key: its default, type, the values allowed in this version, and a one-line doc.

    Allowed values are `choices` (an explicit tuple) or the range `lo`..`hi` (either end optional; `lo_open`
    makes the lower end exclusive). `planned(value)` is true for values a later version of denoq will accept
    (they are refused with "not available in this version"); values neither allowed nor planned are refused as
    not allowed.
    """

    name: str
    default: Any
    type: type
    doc: str
    choices: tuple[Any, ...] | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    planned: Callable[[Any], bool] | None = field(default=None, compare=False)

    def allowed_text(self) -> str:
        """The allowed values in words, as `denoq recipes` and the error messages show them."""
        if self.choices is not None:
            return ", ".join(format_value(c) for c in self.choices)
        kind = "integers" if self.type is int else "numbers"
        if self.lo is not None and self.hi is not None:
            if self.type is int and not self.lo_open:
                return f"{format_value(self.lo)}..{format_value(self.hi)}"
            return f"{kind} in {'(' if self.lo_open else '['}{format_value(self.lo)}, {format_value(self.hi)}]"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '≥'} {format_value(self.lo)}"
        if self.hi is not None:
            return f"{kind} ≤ {format_value(self.hi)}"
        return f"any {'integer' if self.type is int else self.type.__name__}"

    def is_allowed(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if self.type is float and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and value > self.hi)


def format_value(value: Any) -> str:
    """A value as it is written after `--set KEY=`: `true`, `8`, `99.99`, `mse`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _specs(*specs: KeySpec) -> dict[str, KeySpec]:
    return {s.name: s for s in specs}


#: Every recipe key, in the order `denoq recipes` lists them.
RECIPE_KEYS: dict[str, KeySpec] = _specs(
    KeySpec("target", "trt", str,
            "target profile: trt = symmetric int8, inputs only; ort-cpu = uint8 activations with quantized outputs "
            "for ORT CPU integer kernels",
            choices=("trt", "ort-cpu")),
    KeySpec("trt.fp16", True, bool,
            "target trt: also write model.trt.onnx, the Q/DQ graph in float16 with float32 normalizations, softmax, "
            "timestep embedding and trt.fp32_layers (what denoq build compiles); false = build the float32 graph"),
    KeySpec("trt.fp32_layers", "@out", str,
            "target trt with trt.fp16: comma-separated module-name patterns (fnmatch; @in / @out = the model's "
            "input / output layer: conv_in / conv_out of a UNet, pos_embed.proj / proj_out_2 of a DiT) computed in "
            "float32 with everything after them up to the next quantized layer (the output head)"),
    KeySpec("weights.bits", 8, int,
            "weight bits (symmetric; 7 and 6 in the int8 container, 7 = reduce_range: no u8×s8 saturation on CPUs "
            "without VNNI; 4 as ONNX int4 on MatMul / Gemm; 3 is for experiments)",
            choices=(8, 7, 6, 4, 3), planned=lambda v: v == 2),
    KeySpec("weights.method", "rtn", str,
            "weight rounding: rtn = round to nearest; gptq = GPTQ (lazy blocks); obq = Optimal Brain Quantizer "
            "(greedy, slow on wide layers); adaround = learned rounding and activation scales (accuquant.*)",
            choices=("rtn", "gptq", "obq", "adaround")),
    KeySpec("weights.group_size", 0, int,
            "weight block size along the input channels (a scale per block); 0 = one scale per output channel",
            lo=0),
    KeySpec("weights.damp", 0.01, float, "gptq/obq: dampening added to the Hessian diagonal, × its mean",
            lo=0, lo_open=True, hi=1),
    KeySpec("weights.conv_blocks", False, bool,
            "weights.group_size blocks for Conv weights too (ONNX Runtime only: TensorRT's INT8 convolutions take "
            "per-output-channel weight scales, so the trt-rules check rejects blocked conv weights)"),
    KeySpec("weights.act_order", False, bool, "gptq: quantize columns in descending Hessian diagonal (static groups)"),
    KeySpec("weights.sequential", True, bool,
            "gptq/obq: round block by block, later blocks' Hessians taken with the earlier blocks already rounded; "
            "false = all Hessians from the FP model (parallel)"),
    KeySpec("weights.hessian_samples", 16, int,
            "gptq/obq: trajectories (at every calibration step) whose inputs form the Hessians", lo=1, hi=4096),
    KeySpec("activations.bits", 8, int,
            "activation bits (per tensor); 16 = activations stay in floating point (weight-only, e.g. w4a16); 4 and "
            "6 are for quality studies on ORT (TensorRT takes 8-bit activations)",
            choices=(4, 6, 8, 16)),
    KeySpec("activations.observer", "mse", str, "how activation ranges are chosen from the calibration set",
            choices=("minmax", "percentile", "mse", "large_magnitude")),
    KeySpec("activations.percentile", 99.99, float, "percentile of |x| used by the percentile observer",
            lo=50, hi=100, lo_open=True),
    KeySpec("activations.lm_rho", 1.0, float,
            "ρ of the large-magnitude interval: the saturated fraction is ρ/(2^b−1)", lo=0, lo_open=True),
    KeySpec("activations.timestep_groups", 1, int,
            "timestep groups with their own input scales (ADP-DM); 1 = off",
            lo=1, hi=64),
    KeySpec("activations.group_search", "dp", str,
            "how timestep groups are found: dp = exact contiguous partition of each layer's error; "
            "differentiable = ADP-DM's importance-weight search on the model's output error",
            choices=("dp", "differentiable")),
    KeySpec("activations.calib_timesteps", "uniform", str,
            "which recorded steps calibrate (with calib.timesteps < calib.steps): uniform = evenly spaced; "
            "normal = PTQ4DM's normal draw; srm = ADP-DM's structural risk (risk + MMD to all steps)",
            choices=("uniform", "normal", "srm")),
    KeySpec("activations.srm_lambda", 10.0, float,
            "weight of the MMD term against the empirical quantization risk in srm timestep selection",
            lo=0),
    KeySpec("activations.igq_groups", 0, int,
            "IGQ-ViT instance-aware groups per token activation (inputs of Linear layers on tokens; with "
            "attention.quantize also token-wise groups of the softmax): each instance's channels go to the nearest "
            "of G calibrated quantizers; 0 = off (one scale per tensor)", lo=0, hi=64),
    KeySpec("activations.igq_mode", "dynamic", str,
            "IGQ-ViT groups: dynamic = assigned per instance at run time (ONNX ops ORT runs; TensorRT would run "
            "those layers with float activations); static = channels grouped at calibration, group scales folded "
            "into per-channel factors on the input (one Mul) and the weights around one per-tensor Q/DQ (TensorRT; "
            "target=trt)", choices=("dynamic", "static")),
    KeySpec("activations.igq_budget", 0.0, float,
            "IGQ-ViT group allocation: BOP budget as a multiple of the BOPs with one group everywhere (≥ 1); each "
            "layer gets 1, 2, 4, … up to activations.igq_groups groups, most error removed per BOP first; "
            "0 = every layer gets activations.igq_groups", lo=0),
    KeySpec("attention.quantize", False, bool,
            "quantize the inputs of the attention matmuls (Q·Kᵀ and softmax·V; the probabilities on their own "
            "non-negative range) with activations.bits; false = attention stays in float (FP16 on TensorRT, whose "
            "fused INT8 attention stops at sequence length 512)"),
    KeySpec("attention.softmax_grid", "uniform", str,
            "with attention.quantize: the softmax probabilities' grid; uniform = Q/DQ on [0, max P]; log2 = 2^−q, "
            "q < 2^bits (keeps small probabilities; float ops, ONNX Runtime only)", choices=("uniform", "log2")),
    KeySpec("ptqd.enabled", False, bool,
            "PTQD correction head: ε = (ε_q − bias[t]) / (1 + k[t]), statistics per step of the calibration sampler "
            "(sampling must then use calib.sampler with calib.steps)"),
    KeySpec("ptqd.correlation", True, bool,
            "PTQD: fit and remove the noise's part correlated with ε (k); false = bias correction only (k = 0)"),
    KeySpec("ptqd.vsc", False, bool,
            "PTQD variance schedule calibration: the sampler lowers the noise it adds by the residual variance "
            "(needs ptqd.enabled; a no-op for DDIM with η = 0)"),
    KeySpec("precision.mixed", "", str,
            "step-aware mixed precision (PTQD): comma-separated presets compiled beside this recipe (e.g. w8a8); "
            "each denoising step of calib.sampler/calib.steps runs the cheapest whose SNR reaches the diffusion's; "
            "empty = off"),
    KeySpec("accuquant.window", 0, int,
            "with weights.method=adaround: 0-1 per-step objective, n ≥ 2 the AccuQuant window of n sampler steps",
            lo=0, hi=64),
    KeySpec("accuquant.iters", 1000, int, "adaround: optimizer iterations", lo=1, hi=100_000),
    KeySpec("accuquant.batch", 16, int, "adaround: trajectories per iteration", lo=1, hi=4096),
    KeySpec("accuquant.lr", 0.1, float, "adaround: Adam learning rate of the rounding (log-scales: ×0.1)",
            lo=0, lo_open=True),
    KeySpec("accuquant.round_lambda", 0.01, float, "adaround: weight λ of AdaRound's rounding regularizer", lo=0),
    KeySpec("accuquant.init", "rtn", str,
            "adaround: start at RTN's or GPTQ's rounding (weights.group_size etc. apply), or fp = AdaRound's own "
            "init (soft rounding = the FP weights)",
            choices=("rtn", "gptq", "fp")),
    KeySpec("accuquant.backprop", "recompute", str,
            "adaround with a window: recompute = O(1) memory in the window length; naive = backprop through it",
            choices=("recompute", "naive")),
    KeySpec("accuquant.gradient", "stop", str,
            "adaround with a window: stop = gradients stop at each model input (through the sampler's x-path "
            "only; under outputs each step's term trains that step alone, on the window's drifted input); full = "
            "the exact gradient of the window's loss, also through the quantized model's inputs",
            choices=("full", "stop")),
    KeySpec("accuquant.objective", "outputs", str,
            "adaround with a window: end = the distance to the FP state after the window's n steps; every = the "
            "distances after each of its steps (the first is the per-step loss); outputs = the quantized model's "
            "ε error at each step along its own simulated window (n = 1: the per-step loss)",
            choices=("end", "every", "outputs")),
    KeySpec("accuquant.start", "fp", str,
            "adaround: where the quantized model's steps start: fp = the FP trajectories' states (the targets' own "
            "start); quantized = the quantized model's own trajectories from the same noise (their accumulated "
            "error included), re-run every 100 iterations",
            choices=("fp", "quantized")),
    KeySpec("accuquant.perstep_iters", 0, int,
            "adaround with a window: the first iterations use the per-step objective, the window fine-tunes after "
            "them (0 = the window throughout)", lo=0, hi=100_000),
    KeySpec("layers.keep_fp", "@in,@out", str,
            "comma-separated module-name patterns (fnmatch; @in / @out = the model's input / output layer) left in "
            "floating point; empty = quantize every layer"),
    KeySpec("calib.samples", 64, int, "number of FP sampling trajectories recorded", lo=1, hi=4096),
    KeySpec("calib.steps", 25, int, "sampler steps per trajectory", lo=1, hi=1000),
    KeySpec("calib.sampler", "ddim", str, "sampler that records the calibration trajectories",
            choices=("ddpm", "ddim")),
    KeySpec("calib.guidance", "", str,
            "class-conditional models: classifier-free guidance scales of the calibration trajectories, comma-"
            "separated (e.g. 1,2,4; trajectories cycle through them, labels over the classes; PTQD's statistics are "
            "then taken on the guided output and its head sits after the combination); empty = unguided "
            "trajectories over the classes and the null label"),
    KeySpec("calib.timesteps", 0, int,
            "calibration timesteps: 0 = all recorded steps, else that many of them, drawn by "
            "activations.calib_timesteps", lo=0),
    KeySpec("seed", 0, int, "random seed of calibration (noise, subsets)", lo=0, hi=2**32 - 1),
)


@dataclass(frozen=True)
class Preset:
    """A named recipe: the keys it sets away from their defaults, and a one-line description."""

    name: str
    description: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


#: The named presets `--recipe NAME` selects.
RECIPES: dict[str, Preset] = {
    p.name: p for p in (
        Preset("w8a8", "int8 weights per output channel (RTN), int8 activations (MSE); TensorRT target"),
        Preset("w8a8-ort", "w8a8 for ONNX Runtime CPU: uint8 activations, quantized outputs (QLinear kernels)",
               {"target": "ort-cpu"}),
        Preset("w4a8", "int4 weights (GPTQ, blocks of 64 input channels), int8 activations; TensorRT target",
               {"weights.bits": 4, "weights.method": "gptq", "weights.group_size": 64}),
        Preset("w4a16", "int4 weights (GPTQ, blocks of 64 input channels), floating-point activations",
               {"weights.bits": 4, "weights.method": "gptq", "weights.group_size": 64, "activations.bits": 16}),
    )
}


@dataclass(frozen=True)
class Recipe:
    """A complete, validated recipe: `name` (the preset it started from) and a value for every key.

    `recipe["calib.steps"]` reads a value. `to_dict()` is the JSON form the artifact's manifest stores,
    `Recipe.from_dict` reads it back (validating every value again). Treat `values` as read-only.
    """

    name: str
    values: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        try:
            return self.values[key]
        except KeyError:
            raise KeyError(f"unknown recipe key {key!r}{_suggestion(key)}") from None

    def to_dict(self) -> dict[str, Any]:
        """`{"name": NAME, "values": {key: value}}` with the keys sorted."""
        return {"name": self.name, "values": {k: self.values[k] for k in sorted(self.values)}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Inverse of `to_dict`: every key must be known, every value valid; missing keys take their defaults."""
        values = {k: s.default for k, s in RECIPE_KEYS.items()}
        for key, value in dict(data.get("values", {})).items():
            values[key] = validate(key, value, origin="in the artifact's recipe")
        return cls(name=str(data.get("name", "")), values=values)


def _suggestion(key: str) -> str:
    close = difflib.get_close_matches(key, list(RECIPE_KEYS), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}? (denoq recipes lists the keys)" if close else "; denoq recipes lists the keys"


def _check_key(key: str, origin: str) -> KeySpec:
    spec = RECIPE_KEYS.get(key)
    if spec is None:
        where = f" {origin}" if origin else ""
        raise DenoqError(f"unknown recipe key {key!r}{where}{_suggestion(key)}")
    return spec


def _type_error(spec: KeySpec, raw: Any, origin: str) -> DenoqError:
    where = f" {origin}" if origin else ""
    shown = repr(raw) if isinstance(raw, str) else format_value(raw)
    return DenoqError(f"recipe key {spec.name!r}{where} expects {_TYPE_NAMES[spec.type]}, got {shown} "
                      f"(allowed: {spec.allowed_text()}); e.g. --set {spec.name}={format_value(spec.default)}")


def validate(key: str, value: Any, origin: str = "") -> Any:
    """Check an already-typed `value` (e.g. from TOML) for `key`; return it normalized (int → float for floats).

    Raises DenoqError for an unknown key, a wrong type, a value not allowed, or a feature value this version
    does not have. `origin` (e.g. "in recipe.toml") is added to the message.
    """
    spec = _check_key(key, origin)
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, spec.type) or (spec.type is not bool and isinstance(value, bool)):
        raise _type_error(spec, value, origin)
    if not spec.is_allowed(value):
        setting = f"{key}={format_value(value)}"
        if spec.planned is not None and spec.planned(value):
            raise DenoqError(f"{setting} is not available in this version of denoq (allowed: {spec.allowed_text()})")
        where = f" {origin}" if origin else ""
        raise DenoqError(f"{setting}{where} is not allowed (allowed: {spec.allowed_text()}); "
                         f"e.g. --set {key}={format_value(spec.default)}")
    return value


def _parse_value(spec: KeySpec, text: str, origin: str) -> Any:
    text = text.strip()
    if spec.type is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise _type_error(spec, text, origin)
    if spec.type is str:
        return text
    try:
        return spec.type(text)
    except ValueError:
        raise _type_error(spec, text, origin) from None


def parse_set(item: str) -> tuple[str, Any]:
    """Parse and validate one `--set KEY=VALUE` item into `(key, typed value)`.

    Booleans accept true/false/1/0/yes/no (any case); integers and floats are parsed as Python literals; strings
    are taken as written. Raises DenoqError for a malformed item or any value `validate` refuses.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise DenoqError(f"--set expects KEY=VALUE, got {item!r}; e.g. --set activations.observer=minmax")
    spec = _check_key(key, "")
    return key, validate(key, _parse_value(spec, text, ""), "")


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in table.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{name}.")
        else:
            yield name, v


def read_toml(path: Path) -> dict[str, Any]:
    """Read a recipe TOML file into flat dotted keys (nested tables flattened), validating every value."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise DenoqError("recipe TOML files need Python ≥ 3.11 (tomllib); use --set KEY=VALUE instead") from None
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise DenoqError(f"recipe file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise DenoqError(f"recipe file {path} is a folder; pass a .toml file") from None
    except UnicodeDecodeError as exc:
        raise DenoqError(f"recipe file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); pass a TOML "
                         "text file") from None
    except tomllib.TOMLDecodeError as exc:
        raise DenoqError(f"recipe file {path} is not valid TOML ({' '.join(str(exc).split())}); fix the "
                         "file") from None
    except OSError as exc:
        raise DenoqError(f"cannot read recipe file {path} ({exc.strerror or exc}); check the path and its "
                         "permissions") from None
    origin = f"in {path}"
    return {k: validate(k, v, origin) for k, v in _flatten(data)}


def load_recipe(name: str, sets: Iterable[str] = (), toml_path: Path | None = None) -> Recipe:
    """The recipe `name` (a preset of RECIPES), then the TOML file's values, then the `--set` items; later wins.

    Raises DenoqError for an unknown preset (listing the presets), any key or value refused by `validate`, or
    values that break a rule between keys (`check_rules`).
    """
    preset = RECIPES.get(name)
    if preset is None:
        close = difflib.get_close_matches(name, list(RECIPES), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DenoqError(f"unknown recipe {name!r}; {hint}available presets: {', '.join(RECIPES)} "
                         "(denoq recipes describes them)")
    values = {k: s.default for k, s in RECIPE_KEYS.items()}
    values.update({k: validate(k, v, f"in preset {name}") for k, v in preset.overrides.items()})
    if toml_path is not None:
        values.update(read_toml(Path(toml_path)))
    if isinstance(sets, str):
        sets = [sets]
    for item in sets:
        key, value = parse_set(item)
        values[key] = value
    check_rules(values)
    return Recipe(name=name, values=values)


def _calib_timesteps_within_steps(values: Mapping[str, Any]) -> str | None:
    k, steps = values["calib.timesteps"], values["calib.steps"]
    if k <= steps:
        return None
    return (f"calib.timesteps={k} asks for more calibration timesteps than the calib.steps={steps} recorded steps "
            f"(only {steps} would be used); set calib.timesteps ≤ {steps} (0 = every recorded step) or "
            f"calib.steps ≥ {k}")


#: Rules between keys, which each key's own check cannot see: each returns the one-line problem and fix, or None.
CROSS_KEY_RULES: tuple[Callable[[Mapping[str, Any]], str | None], ...] = (_calib_timesteps_within_steps,)


def check_rules(values: Mapping[str, Any]) -> None:
    """Apply CROSS_KEY_RULES to a complete set of recipe values; DenoqError with the first rule's message.

    `load_recipe` applies them to what the user asks for; a recipe read back from an artifact is not re-checked
    (it describes what was compiled)."""
    for rule in CROSS_KEY_RULES:
        problem = rule(values)
        if problem is not None:
            raise DenoqError(problem)


#: Keys that say how precise a model is: a candidate of `precision.mixed` takes them from its own preset.
def is_precision_key(key: str) -> bool:
    return key.startswith("weights.") or key == "activations.bits"


def preset_values(name: str) -> dict[str, Any]:
    """Every key's value in preset `name` before any override."""
    return load_recipe(name).values


def mixed_members(recipe: Recipe) -> dict[str, Recipe]:
    """The candidates of `precision.mixed`, by name: the recipe itself (its preset's name, mixing off), then each
    named preset with the recipe's overrides of every key except the precision keys (`is_precision_key`), so all
    share calibration, target, PTQD and seed. DenoqError for an unknown or repeated preset."""
    others = [n.strip() for n in recipe["precision.mixed"].split(",") if n.strip()]
    if not others:
        raise DenoqError("precision.mixed is empty: name the presets to mix with, e.g. --set precision.mixed=w8a8")
    names = [recipe.name, *others]
    if len(set(names)) != len(names):
        raise DenoqError(f"precision.mixed={recipe['precision.mixed']} with --recipe {recipe.name} names a "
                         "candidate twice; list each preset once, other than the recipe itself")
    base = preset_values(recipe.name)
    shared = {k: v for k, v in recipe.values.items()
              if v != base[k] and not is_precision_key(k) and k != "precision.mixed"}
    members = {recipe.name: Recipe(recipe.name, {**recipe.values, "precision.mixed": ""})}
    for name in others:
        members[name] = Recipe(name, {**preset_values(name), **shared})
    return members


def describe_recipes() -> str:
    """A readable table of the presets and every key (default, allowed values, doc) for `denoq recipes`."""
    lines = ["Presets (denoq compile --recipe NAME):"]
    width = max(len(n) for n in RECIPES)
    for p in RECIPES.values():
        changes = " ".join(f"{k}={format_value(v)}" for k, v in p.overrides.items())
        lines.append(f"  {p.name:<{width}}  {p.description}" + (f"  [{changes}]" if changes else ""))
    lines += ["", "Keys (override with --set KEY=VALUE, or a TOML file; unknown keys and values are errors):"]
    rows = [("KEY", "DEFAULT", "ALLOWED", "DESCRIPTION")]
    rows += [(s.name, format_value(s.default), s.allowed_text(), s.doc) for s in RECIPE_KEYS.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append("  " + "  ".join(f"{c:<{w}}" for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    lines.append("")
    lines.append("Keys whose only allowed value is their default name features that later versions of denoq add.")
    return "\n".join(lines)
