"""The FP8, W4A4 and NVFP4 presets end to end: compile on tiny real-architecture models, the plan's formats and
branches, the parity gate on the right executor, TensorRT's rules, sampling, and the refusals."""

from __future__ import annotations

import pytest
from conftest import compile_refused, save_dit_pipeline, tiny_dit

from denoq.compiler.api import compile_artifact
from denoq.compiler.artifact import Artifact
from denoq.compiler.backends import artifact_plan
from denoq.compiler.cli import main
from denoq.compiler.recipe import RECIPES, load_recipe, mixed_members
from denoq.errors import DenoqError

FAST = ["--set", "calib.samples=4", "--set", "calib.steps=5", "--quiet"]


@pytest.fixture(scope="module")
def dit_pipeline(tmp_path_factory):
    return save_dit_pipeline(tiny_dit(), tmp_path_factory.mktemp("models") / "tiny-dit")


def test_nvfp4_svdquant_dit_compiles_checks_in_onnx_reference_and_samples(dit_pipeline, tmp_path, capsys):
    out = tmp_path / "nvfp4"
    assert main(["compile", str(dit_pipeline), "--recipe", "nvfp4-svdquant", "--out", str(out), *FAST,
                 "--set", "attention.quantize=true", "--set", "svdquant.rank=4"]) == 0
    art = Artifact.open(out)
    m = art.manifest
    assert m["checks"]["qdq_executor"] == "onnx.reference" and m["parity_gate"]["passed"]
    assert m["trt_rules"]["count"] == 0
    plan = artifact_plan(art)
    assert plan.layers and all(lp.weight_format == "fp4" and lp.rank == 4 and lp.input.format == "fp4"
                               and lp.input.block_size == 16 for lp in plan.layers.values())
    assert plan.attention and all(q.format == "fp8" for ap in plan.attention.values() for q in ap.quants.values())
    assert main(["sample", str(out), "--backend", "ort", "--n", "2", "--steps", "2", "--label", "1", "--out",
                 str(tmp_path / "g.png")]) == 2
    assert "--backend onnx-ref" in capsys.readouterr().err
    assert main(["sample", str(out), "--backend", "onnx-ref", "--n", "2", "--steps", "2", "--label", "1",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--layers"]) == 0
    text = capsys.readouterr().out
    assert "NVFP4 W / NVFP4 A (dynamic blocks) + rank-4 branch" in text and "nvfp4 blocks of 16 g=" in text


def test_fp8_unet_keeps_tensorrt_rules(tiny_pipeline, tmp_path):
    out = tmp_path / "fp8"
    assert main(["compile", str(tiny_pipeline), "--recipe", "fp8", "--out", str(out), *FAST,
                 "--set", "activations.timestep_groups=2"]) == 0
    art = Artifact.open(out)
    assert art.manifest["trt_rules"]["count"] == 0 and art.manifest["checks"]["qdq_executor"] == "onnxruntime"
    plan = artifact_plan(art)
    assert all(lp.weight_format == "fp8" and lp.input.format == "fp8" for lp in plan.layers.values())
    assert any(not lp.input.is_constant for lp in plan.layers.values())  # timestep groups on the FP8 grid


def test_w4a4_svdquant_unet_branches_match_the_simulation(tiny_pipeline, tmp_path):
    out = tmp_path / "w4a4"
    assert main(["compile", str(tiny_pipeline), "--recipe", "w4a4-svdquant", "--out", str(out), *FAST,
                 "--set", "svdquant.rank=2"]) == 0
    art = Artifact.open(out)
    plan = artifact_plan(art)
    convs = [lp for lp in plan.layers.values() if lp.op == "conv"]
    assert convs and all(lp.rank == 2 and lp.input_factors is not None and lp.input.block_size for lp in convs)
    assert art.manifest["parity_gate"]["passed"]  # (single layers agree to float rounding: test_formats)
    assert art.manifest["cost"]["bops_per_call"] > 0


def test_nvfp4_convolutions_are_refused_unless_fp8(tiny_pipeline, tmp_path, capsys):
    err = compile_refused(capsys, tiny_pipeline, tmp_path / "a", "--recipe", "nvfp4", *FAST,
                          sets=("layers.conv_format=same",))
    assert "NVFP4 on convolution" in err and "layers.conv_format=fp8" in err


@pytest.mark.parametrize(("preset", "sets", "message"), [
    ("fp8", ["target=ort-cpu"], "TensorRT's formats"),
    ("nvfp4", ["weights.group_size=64"], "needs weights.bits=4 and weights.group_size=16"),
    ("fp8", ["activations.bits=4"], "needs activations.bits=8"),
    ("w4a4-svdquant", ["activations.block_size=0", "activations.timestep_groups=2"], "svdquant"),
    ("w4a4", ["activations.timestep_groups=2"], "dynamic activation blocks"),
    ("fp8", ["weights.method=adaround"], "adaround learns integer grids"),
])
def test_format_rules_refuse_what_cannot_be_built(preset, sets, message):
    with pytest.raises(DenoqError, match=message):
        load_recipe(preset, sets)


def test_format_presets_exist_with_their_formats():
    for name in ("fp8", "w4a4", "w4a4-svdquant", "nvfp4", "nvfp4-svdquant"):
        assert name in RECIPES
    c = load_recipe("nvfp4-svdquant").config
    assert (c.weights.format, c.activations.format, c.layers.conv_format, c.target) == ("nvfp4", "nvfp4", "fp8", "trt")
    assert c.svdquant.rank > 0


def test_mixed_precision_takes_fp8_and_nvfp4_members_with_their_own_formats():
    members = mixed_members(load_recipe("w4a8", ["precision.mixed=fp8,nvfp4-svdquant", "ptqd.enabled=true"]))
    assert list(members) == ["w4a8", "fp8", "nvfp4-svdquant"]
    assert (members["fp8"]["weights.format"], members["fp8"]["activations.format"]) == ("fp8", "fp8")
    nv = members["nvfp4-svdquant"].config
    assert (nv.weights.format, nv.activations.block_size, nv.layers.conv_format, nv.svdquant.rank > 0) == (
        "nvfp4", 16, "fp8", True)
    assert members["w4a8"]["weights.format"] == "int" and members["fp8"]["ptqd.enabled"]


def test_mixed_precision_with_an_fp8_member_compiles(tiny_pipeline, tmp_path):
    art = compile_artifact(str(tiny_pipeline), load_recipe("w4a8", [
        "calib.samples=8", "calib.steps=10", "calib.sampler=ddpm", "ptqd.enabled=true", "weights.method=rtn",
        "precision.mixed=fp8"]), tmp_path / "mixed")
    assert set(art.manifest["mixed"]["steps_per_member"]) <= {"w4a8", "fp8"}
    assert art.manifest["mixed"]["bops_per_image"]["fp8"] > art.manifest["mixed"]["bops_per_image"]["w4a8"]
