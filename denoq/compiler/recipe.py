"""Recipes: named presets over one flat set of documented keys (docs/architecture.md, Interfaces).

The keys are declared once, as the typed tree of `denoq.compiler.recipe_keys` (`RecipeConfig`); users name them
flat (`weights.bits`). `load_recipe` starts from a preset of `RECIPES`, applies an optional TOML file, then the
command line's `--set KEY=VALUE` items; later wins. Every value is checked against its key's spec: an unknown key,
a value of the wrong type or a value that is not allowed is a `DenoqError` whose one-line message names the key and
value, what is allowed, and the fix. Nothing is ignored. Then the rules between keys
(`denoq.compiler.recipe_rules`) are checked once every value is in. A `Recipe` reads both ways:
`recipe["weights.bits"]` and `recipe.config.weights.bits`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from denoq.compiler.recipe_keys import RECIPE_KEYS, KeySpec, RecipeConfig, format_value
from denoq.compiler.recipe_rules import check_rules
from denoq.errors import DenoqError

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Preset:
    """A named recipe: the keys it sets away from their defaults, and a one-line description."""

    name: str
    description: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


W4A4 = {"weights.bits": 4, "weights.method": "gptq", "weights.group_size": 64, "activations.bits": 4,
        "activations.block_size": 64}
NVFP4 = {"weights.format": "nvfp4", "weights.bits": 4, "weights.group_size": 16, "weights.method": "gptq",
         "activations.format": "nvfp4",
         "activations.bits": 4, "activations.block_size": 16, "layers.conv_format": "fp8"}
SVDQUANT = {"svdquant.rank": 32, "svdquant.alpha": 0.5}
W4 = {"weights.bits": 4, "weights.method": "gptq", "weights.group_size": 64}
#: Block-wise reconstruction from GPTQ's rounding (docs/accuquant.md, "Block-wise reconstruction").
BLOCK_RECON = {"weights.method": "adaround", "accuquant.init": "gptq", "accuquant.granularity": "block",
               "accuquant.window": 0, "accuquant.iters": 300}

#: The named presets `--recipe NAME` selects.
RECIPES: dict[str, Preset] = {
    p.name: p for p in (
        Preset("w8a8", "int8 weights per output channel (RTN), int8 activations (MSE); TensorRT target"),
        Preset("w8a8-ort", "w8a8 for ONNX Runtime CPU: uint8 activations, quantized outputs (QLinear kernels)",
               {"target": "ort-cpu"}),
        Preset("w4a8", "int4 weights (GPTQ, then each block's output reconstructed; blocks of 64 input channels), "
               "int8 activations; TensorRT target", {**W4, **BLOCK_RECON}),
        Preset("w4a8-fast", "w4a8 with GPTQ alone: no reconstruction, a fraction of the calibration time", W4),
        Preset("w4a16", "int4 weights (GPTQ, blocks of 64 input channels), floating-point activations",
               {**W4, "activations.bits": 16}),
        Preset("fp8", "FP8 E4M3 weights per output channel (GPTQ on the FP8 grid) and activations per tensor "
               "(Hopper / Ada); TensorRT target", {"weights.format": "fp8", "weights.method": "gptq",
                                                    "activations.format": "fp8"}),
        Preset("w4a4", "int4 weights (GPTQ, blocks of 64) and int4 activations in dynamic blocks of 64 channels "
               "(ONNX Runtime: TensorRT has no 4-bit integer activations)", W4A4),
        Preset("w4a4-svdquant", "w4a4 with SVDQuant: smoothing and a float16 low-rank branch beside each "
               "quantized layer", {**W4A4, **SVDQUANT}),
        Preset("nvfp4", "NVFP4 weights (GPTQ on the FP4 grid) and activations (dynamic blocks of 16) on GEMMs, FP8 "
               "convolutions (Blackwell); TensorRT target", NVFP4),
        Preset("nvfp4-svdquant", "nvfp4 with SVDQuant's smoothing and float16 low-rank branch",
               {**NVFP4, **SVDQUANT}),
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

    @cached_property
    def config(self) -> RecipeConfig:
        """The values as the typed tree (`recipe.config.weights.bits`)."""
        return RecipeConfig.from_values(self.values)

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
    check_rules(RecipeConfig.from_values(values))
    return Recipe(name=name, values=values)


#: Keys that say how precise a model is: a candidate of `precision.mixed` takes them from its own preset.
def is_precision_key(key: str) -> bool:
    return key.startswith(("weights.", "svdquant.")) or key in (
        "activations.bits", "activations.format", "activations.block_size", "layers.conv_format")


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
    return "\n".join(lines)
