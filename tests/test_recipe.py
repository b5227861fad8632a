"""Recipes: presets, typed --set parsing, TOML overrides and every error path (denoq/compiler/recipe.py)."""

from __future__ import annotations

import re
import sys

import pytest

from denoq.compiler.recipe import (
    RECIPE_KEYS,
    RECIPES,
    Recipe,
    describe_recipes,
    load_recipe,
    parse_set,
    validate,
)
from denoq.errors import DenoqError

needs_tomllib = pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib needs Python 3.11")

# The contract of docs/architecture.md: key -> default in this version.
EXPECTED_DEFAULTS = {
    "target": "trt",
    "trt.fp16": True,
    "trt.fp32_layers": "@out",
    "weights.bits": 8,
    "weights.format": "int",
    "weights.method": "rtn",
    "weights.group_size": 0,
    "weights.damp": 0.01,
    "weights.conv_blocks": False,
    "weights.act_order": False,
    "weights.sequential": True,
    "weights.hessian_samples": 16,
    "activations.bits": 8,
    "activations.format": "int",
    "activations.block_size": 0,
    "activations.observer": "mse",
    "activations.percentile": 99.99,
    "activations.lm_rho": 1.0,
    "activations.timestep_groups": 1,
    "activations.group_search": "dp",
    "activations.calib_timesteps": "uniform",
    "activations.srm_lambda": 10.0,
    "activations.igq_groups": 0,
    "activations.igq_mode": "dynamic",
    "activations.igq_budget": 0.0,
    "attention.quantize": False,
    "attention.softmax_grid": "uniform",
    "svdquant.rank": 0,
    "svdquant.alpha": 0.0,
    "ptqd.enabled": False,
    "ptqd.correlation": True,
    "ptqd.vsc": False,
    "precision.mixed": "",
    "accuquant.window": 0,
    "accuquant.granularity": "network",
    "accuquant.block_inputs": 1024,
    "accuquant.iters": 1000,
    "accuquant.batch": 16,
    "accuquant.lr": 0.1,
    "accuquant.round_lambda": 0.01,
    "accuquant.init": "rtn",
    "accuquant.backprop": "recompute",
    "accuquant.gradient": "stop",
    "accuquant.objective": "outputs",
    "accuquant.start": "fp",
    "accuquant.perstep_iters": 0,
    "layers.keep_fp": "@in,@out",
    "layers.conv_format": "same",
    "calib.samples": 64,
    "calib.steps": 25,
    "calib.sampler": "auto",
    "calib.guidance": "",
    "calib.prompts": "",
    "calib.embeddings": "",
    "calib.conditioning": "model",
    "calib.timesteps": 0,
    "calib.size": 0,
    "calib.offload": "none",
    "seed": 0,
}


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DenoqError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, "messages are one line"
    return msg


# -- presets --------------------------------------------------------------------------------------------------
def test_keys_and_defaults_match_the_contract():
    assert list(RECIPE_KEYS) == list(EXPECTED_DEFAULTS)
    r = load_recipe("w8a8")
    assert r.name == "w8a8"
    assert r.values == EXPECTED_DEFAULTS
    for key, value in EXPECTED_DEFAULTS.items():
        assert r[key] == value and type(r[key]) is type(value), key
        assert RECIPE_KEYS[key].doc


def test_presets():
    assert set(RECIPES) == {"w8a8", "w8a8-ort", "w4a8", "w4a8-fast", "w4a16", "fp8", "w4a4", "w4a4-svdquant",
                            "nvfp4", "nvfp4-svdquant"}
    for name, method, act_bits in (("w4a8", "adaround", 8), ("w4a8-fast", "gptq", 8), ("w4a16", "gptq", 16)):
        r = load_recipe(name)
        assert (r["weights.bits"], r["weights.method"], r["activations.bits"], r["target"]) == (4, method, act_bits,
                                                                                                 "trt")
    fast = load_recipe("w4a8-fast")  # w4a8 without the reconstruction, nothing else
    assert {k: v for k, v in load_recipe("w4a8").values.items() if not k.startswith("accuquant.")} == {
        k: v for k, v in fast.values.items() if not k.startswith("accuquant.")} | {"weights.method": "adaround"}
    assert load_recipe("w8a8")["target"] == "trt"
    ort = load_recipe("w8a8-ort")
    assert ort["target"] == "ort-cpu"
    assert {k: v for k, v in ort.values.items() if k != "target"} == {
        k: v for k, v in EXPECTED_DEFAULTS.items() if k != "target"}
    assert all(p.description for p in RECIPES.values())


def test_unknown_preset_lists_presets():
    msg = error_of(load_recipe, "w2a8")
    assert "'w2a8'" in msg and "w8a8" in msg and "w8a8-ort" in msg and "w4a8" in msg and "w4a16" in msg


def test_to_dict_is_sorted_and_round_trips():
    r = load_recipe("w8a8-ort", ["seed=3"])
    d = r.to_dict()
    assert d["name"] == "w8a8-ort"
    assert list(d["values"]) == sorted(EXPECTED_DEFAULTS)
    assert Recipe.from_dict(d) == r
    with pytest.raises(DenoqError, match="seed"):
        Recipe.from_dict({"name": "x", "values": {"seed": -1}})


def test_getitem_unknown_key():
    with pytest.raises(KeyError, match=r"activations\.bits"):
        load_recipe("w8a8")["activations.bit"]


# -- --set ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("item, expected", [
    ("target=ort-cpu", ("target", "ort-cpu")),
    ("activations.observer=minmax", ("activations.observer", "minmax")),
    ("activations.percentile=99.9", ("activations.percentile", 99.9)),
    ("activations.percentile=100", ("activations.percentile", 100.0)),
    ("activations.lm_rho=0.5", ("activations.lm_rho", 0.5)),
    ("calib.samples=4096", ("calib.samples", 4096)),
    ("calib.steps = 10", ("calib.steps", 10)),
    ("calib.sampler=ddpm", ("calib.sampler", "ddpm")),
    ("calib.timesteps=5", ("calib.timesteps", 5)),
    ("seed=123", ("seed", 123)),
    ("ptqd.enabled=false", ("ptqd.enabled", False)),
    ("ptqd.enabled=NO", ("ptqd.enabled", False)),
    ("attention.quantize=0", ("attention.quantize", False)),
])
def test_parse_set_typed(item, expected):
    key, value = parse_set(item)
    assert (key, value) == expected
    assert type(value) is type(expected[1])


@pytest.mark.parametrize("text", ["true", "TRUE", "1", "yes", "Yes"])
def test_bool_true_spellings_parse(text):
    assert parse_set(f"ptqd.enabled={text}") == ("ptqd.enabled", True)
    assert parse_set(f"attention.quantize={text}") == ("attention.quantize", True)


def test_unknown_key_suggests():
    msg = error_of(parse_set, "activations.bit=8")
    assert msg == ("unknown recipe key 'activations.bit'; did you mean 'activations.bits'? "
                   "(denoq recipes lists the keys)")
    msg = error_of(parse_set, "zzz=1")
    assert "'zzz'" in msg and "did you mean" not in msg and "denoq recipes" in msg


@pytest.mark.parametrize("item, key", [
    ("calib.samples=abc", "calib.samples"),
    ("calib.samples=8.0", "calib.samples"),
    ("activations.percentile=high", "activations.percentile"),
    ("ptqd.enabled=maybe", "ptqd.enabled"),
])
def test_bad_type(item, key):
    msg = error_of(parse_set, item)
    assert f"'{key}'" in msg and "expects" in msg and f"--set {key}=" in msg


@pytest.mark.parametrize("item, allowed", [
    ("target=tensorrt", "trt, ort-cpu"),
    ("activations.observer=max", "minmax, percentile, mse, large_magnitude"),
    ("calib.sampler=euler", "auto, ddpm, ddim"),
    ("calib.samples=0", "1..4096"),
    ("calib.samples=4097", "1..4096"),
    ("calib.steps=1001", "1..1000"),
    ("calib.timesteps=-1", "≥ 0"),
    ("activations.percentile=50", "(50, 100]"),
    ("activations.percentile=100.5", "(50, 100]"),
    ("activations.percentile=nan", "(50, 100]"),
    ("activations.lm_rho=0", "> 0"),
    ("activations.lm_rho=inf", "> 0"),
    ("activations.timestep_groups=0", "1..64"),
    ("activations.timestep_groups=65", "1..64"),
    ("seed=-1", "0..4294967295"),
    ("weights.bits=5", "8, 7, 6, 4, 3"),
    ("weights.group_size=-1", "≥ 0"),
    ("weights.damp=0", "(0, 1]"),
    ("activations.bits=3", "4, 6, 8, 16"),
])
def test_disallowed_value(item, allowed):
    msg = error_of(parse_set, item)
    key = item.partition("=")[0]
    assert "is not allowed" in msg and allowed in msg and key in msg
    assert "not available" not in msg


@pytest.mark.parametrize("item, allowed", [
    ("weights.bits=2", "8, 7, 6, 4, 3"),
])
def test_feature_not_available_yet(item, allowed):
    key = item.partition("=")[0]
    msg = error_of(parse_set, item)
    assert msg.startswith(f"{key}=")
    assert msg.endswith(f"is not available in this version of denoq (allowed: {allowed})")
    assert error_of(parse_set, item) == msg  # deterministic


def test_exact_not_available_message():
    assert error_of(parse_set, "weights.bits=2") == (
        "weights.bits=2 is not available in this version of denoq (allowed: 8, 7, 6, 4, 3)")


def test_learned_quantizer_keys_accepted():
    assert parse_set("weights.method=adaround") == ("weights.method", "adaround")
    assert parse_set("accuquant.window=4") == ("accuquant.window", 4)
    assert "is not allowed" in error_of(parse_set, "accuquant.window=65")
    assert "is not allowed" in error_of(parse_set, "accuquant.backprop=checkpoint")


def test_timestep_groups_accepted():
    assert parse_set("activations.timestep_groups=4") == ("activations.timestep_groups", 4)


@pytest.mark.parametrize("item", ["calib.samples", "=3", "", "  =x"])
def test_bad_key_value_format(item):
    msg = error_of(parse_set, item)
    assert "KEY=VALUE" in msg


def test_set_through_load_recipe_later_wins():
    r = load_recipe("w8a8", ["calib.steps=10", "calib.steps=20", "activations.observer=minmax"])
    assert r["calib.steps"] == 20 and r["activations.observer"] == "minmax"
    error_of(load_recipe, "w8a8", ["activations.bit=8"])


def test_validate_typed_values():
    assert validate("activations.percentile", 100) == 100.0
    assert type(validate("activations.percentile", 100)) is float
    error_of(validate, "calib.samples", True)  # a bool is not an int
    error_of(validate, "calib.samples", 64.0)
    error_of(validate, "ptqd.enabled", 0)
    error_of(validate, "target", 3)


# -- TOML ------------------------------------------------------------------------------------------------------
@needs_tomllib
def test_toml_nested_and_flat_and_order(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('target = "ort-cpu"\n"calib.samples" = 8\nseed = 5\n'
                 "[activations]\nobserver = \"percentile\"\npercentile = 99\n"
                 "[calib]\nsteps = 7\n")
    r = load_recipe("w8a8", toml_path=f)
    assert r["target"] == "ort-cpu" and r["calib.samples"] == 8 and r["calib.steps"] == 7 and r["seed"] == 5
    assert r["activations.observer"] == "percentile" and r["activations.percentile"] == 99.0
    assert type(r["activations.percentile"]) is float
    # --set wins over the TOML file, which wins over the preset
    r = load_recipe("w8a8-ort", ["seed=9", "target=trt"], toml_path=f)
    assert r["seed"] == 9 and r["target"] == "trt" and r["calib.steps"] == 7
    # the TOML file wins over the preset
    g = tmp_path / "g.toml"
    g.write_text('target = "trt"\n')
    assert load_recipe("w8a8-ort", toml_path=g)["target"] == "trt"


@needs_tomllib
@pytest.mark.parametrize("text, fragment", [
    ("[activations]\nbit = 8\n", "did you mean 'activations.bits'"),
    ("[calib]\nsamples = \"many\"\n", "'calib.samples'"),
    ("[calib]\nsamples = 8.0\n", "'calib.samples'"),
    ("[ptqd]\nenabled = 1\n", "'ptqd.enabled'"),
    ("[activations]\nigq_groups = 65\n", "is not allowed (allowed: 0..64)"),
    ("target = \"x\"\n", "is not allowed (allowed: trt, ort-cpu)"),
    ("target = \n", "not valid TOML"),
])
def test_toml_errors(tmp_path, text, fragment):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    msg = error_of(load_recipe, "w8a8", toml_path=f)
    assert fragment in msg


def test_toml_missing_file(tmp_path):
    msg = error_of(load_recipe, "w8a8", toml_path=tmp_path / "nope.toml")
    assert "nope.toml" in msg and "does not exist" in msg


# -- describe --------------------------------------------------------------------------------------------------
def test_describe_lists_presets_and_keys():
    text = describe_recipes()
    for name, p in RECIPES.items():
        assert name in text and p.description in text
    for key, spec in RECIPE_KEYS.items():
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(key + " "))
        assert spec.doc in line and spec.allowed_text() in line
    assert "large_magnitude" in text and "1..4096" in text


# -- the typed tree and the rules between keys ------------------------------------------------------------------
def test_typed_config_reads_the_same_values_as_the_flat_keys():
    recipe = load_recipe("w4a8", ["activations.timestep_groups=4", "seed=3", "trt.fp16=false"])
    config = recipe.config
    assert (config.weights.bits, config.weights.method, config.weights.group_size) == (4, "adaround", 64)
    assert (config.accuquant.init, config.accuquant.granularity, config.accuquant.window) == ("gptq", "block", 0)
    assert config.activations.timestep_groups == 4 and config.seed == 3 and config.trt.fp16 is False
    for key in RECIPE_KEYS:  # every flat key is one field of the tree, with the same value
        node = config
        for part in key.split("."):
            node = getattr(node, part)
        assert node == recipe[key], key


@pytest.mark.parametrize("sets, words", [
    (["activations.bits=16", "activations.timestep_groups=4"], "activations.timestep_groups=1"),
    (["accuquant.window=2"], "weights.method=adaround"),
    (["weights.method=adaround", "activations.igq_groups=4"], "activations.igq_groups=0"),
    (["weights.method=adaround", "calib.guidance=1,2"], "leave calib.guidance empty"),
    (["weights.method=adaround", "accuquant.window=8", "calib.steps=4"], "raise calib.steps"),
    (["weights.method=adaround", "accuquant.window=2", "accuquant.iters=5", "accuquant.perstep_iters=5"],
     "perstep_iters < iters"),
    (["attention.softmax_grid=log2"], "attention.quantize=true"),
    (["attention.quantize=true", "activations.bits=16"], "activations.bits to 8"),
    (["activations.igq_groups=4", "activations.timestep_groups=2"], "activations.timestep_groups=1"),
    (["ptqd.vsc=true"], "ptqd.enabled=true"),
    (["calib.prompts=p.txt", "calib.conditioning=random"], "two sources of the text conditioning"),
    (["weights.format=fp8", "target=ort-cpu"], "TensorRT's formats"),
    (["calib.offload=disk", "svdquant.rank=4"], "need the whole model in memory"),
])
def test_rules_between_keys_refuse_at_load(sets, words):
    with pytest.raises(DenoqError, match=re.escape(words)) as exc:
        load_recipe("w8a8", sets)
    assert "\n" not in str(exc.value)


def test_every_rule_is_reached_by_a_test():
    from denoq.compiler.recipe_rules import CROSS_KEY_RULES

    assert len(CROSS_KEY_RULES) == 10  # a new rule needs a case in test_rules_between_keys_refuse_at_load
