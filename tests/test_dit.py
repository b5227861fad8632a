"""Transformer denoisers: a class-conditional DiTTransformer2DModel (pixel space) loads from a DiTPipeline folder,
compiles through the same stages as the UNets (every Linear mapped to its ONNX node, Q/DQ graph against the
simulation, the guided graph, TensorRT's rules), and configs denoq cannot sample are refused."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from conftest import save_dit_pipeline, tiny_dit

from denoq.compiler.artifact import Artifact
from denoq.compiler.backends import make_backend
from denoq.compiler.cli import main
from denoq.compiler.load import load_model
from denoq.errors import DenoqError
from denoq.layers import quantizable_layers
from denoq.passes.guidance import GUIDED_GRAPH

FAST = ["--set", "calib.samples=4", "--set", "calib.steps=5", "--quiet"]


@pytest.fixture(scope="module")
def dit_pipeline(tmp_path_factory):
    return save_dit_pipeline(tiny_dit(), tmp_path_factory.mktemp("models") / "tiny-dit")


@pytest.fixture(scope="module")
def dit_artifact(dit_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "dit"
    assert main(["compile", str(dit_pipeline), "--out", str(out), *FAST, "--set", "activations.timestep_groups=2"]) == 0
    return Artifact.open(out)


def test_dit_loads_as_class_conditional(dit_pipeline):
    spec = load_model(str(dit_pipeline))
    assert (spec.model_class, spec.cond_input, spec.num_classes, spec.sample_shape) == (
        "DiTTransformer2DModel", "class_labels", 3, (1, 16, 16))
    assert spec.layer_patterns("@in,@out,ff.*") == ("pos_embed.proj", "proj_out_2", "ff.*")
    with pytest.raises(DenoqError, match="layer alias '@mid' is not known"):
        spec.layer_patterns("@mid")


def test_dit_compiles_every_linear_and_matches_the_simulation(dit_pipeline, dit_artifact):
    meta = dit_artifact.manifest
    layers = set(quantizable_layers(load_model(str(dit_pipeline)).module))
    assert set(meta["layer_map"]) == layers  # every Conv2d / Linear found in the graph by its module name
    assert {"pos_embed.proj", "proj_out_2"} == set(meta["calibration"]["kept_fp"])  # @in, @out
    assert "transformer_blocks.0.attn1.to_q" in meta["plan"]["layers"]
    checks = meta["checks"]
    assert checks["fp_onnx_vs_torch_max_abs"] < 1e-4
    assert checks["qdq_ort_vs_sim_over_quant_error"] < 0.5
    assert checks["guided_vs_plain_guided_max_abs"] < 1e-5
    assert meta["trt_rules"]["count"] == 0
    graph = onnx.load(str(dit_artifact.file(GUIDED_GRAPH)))
    assert {i.name for i in graph.graph.input} == {"sample", "timestep", "class_labels", "guidance_scale"}
    x, t, c = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 2])
    ort, fp = make_backend(dit_artifact, "ort")(x, t, c), make_backend(dit_artifact, "torch-fp")(x, t, c)
    assert 0 < float((ort - fp).abs().max()) < 0.2 * float(fp.abs().max())


def test_dit_samples_with_guidance(dit_artifact, tmp_path):
    out = tmp_path / "x.npy"
    assert main(["sample", str(dit_artifact.path), "--steps", "3", "--n", "2", "--label", "1", "--guidance", "2",
                 "--out", str(tmp_path / "g.png"), "--save-tensor", str(out)]) == 0
    import numpy as np

    x = np.load(out)
    assert x.shape == (2, 1, 16, 16) and np.isfinite(x).all()


@pytest.mark.parametrize("change,message", [
    ({"out_channels": 3}, "out_channels 3 is neither in_channels 1 (ε) nor twice it"),
    ({"norm_type": "ada_norm_single"}, "class-conditional DiTs"),
])
def test_dit_configs_denoq_cannot_sample_are_refused(dit_pipeline, tmp_path, capsys, change, message):
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(dit_pipeline, folder)
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    assert main(["compile", str(folder), "--out", str(tmp_path / "a"), *FAST]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()


def test_w6a6_keeps_weights_and_activations_in_six_bits(dit_pipeline, tmp_path):
    out = tmp_path / "w6a6"
    assert main(["compile", str(dit_pipeline), "--out", str(out), *FAST, "--set", "weights.bits=6", "--set",
                 "activations.bits=6"]) == 0
    art = Artifact.open(out)
    from denoq.compiler.backends import artifact_plan

    plan = artifact_plan(art)
    assert all(lp.weight_bits == 6 and int(lp.weight_int.abs().max()) <= 31 for lp in plan.layers.values())
    assert all(lp.input.bits == 6 for lp in plan.layers.values() if lp.input is not None)
    assert art.manifest["checks"]["qdq_ort_vs_sim_over_quant_error"] < 0.5
