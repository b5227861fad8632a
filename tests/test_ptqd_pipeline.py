"""PTQD wired into compile and sampling: statistics on every recorded step, the head in the graph and in the
simulation, the artifact's tables, the sampler check and variance schedule calibration."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
from test_cli import run_error
from test_parity import end_to_end_rms

from denoq.compiler.backends import artifact_ptqd, sampling_variance
from denoq.compiler.cli import main
from denoq.compiler.generate import generate
from denoq.compiler.pipeline import compile_model
from denoq.compiler.recipe import load_recipe
from denoq.errors import DenoqError

SETS = ["calib.samples=8", "calib.steps=10", "calib.sampler=ddpm", "ptqd.enabled=true", "ptqd.vsc=true"]


@pytest.fixture(scope="module")
def ptqd_artifact(tiny_pipeline, tmp_path_factory):
    return compile_model(str(tiny_pipeline), load_recipe("w8a8", SETS), tmp_path_factory.mktemp("ptqd") / "art")


def test_statistics_cover_every_recorded_step_and_ship_in_the_artifact(ptqd_artifact):
    m = ptqd_artifact.manifest
    stats = artifact_ptqd(ptqd_artifact)
    assert m["ptqd"]["sampler"] == "ddpm" and m["ptqd"]["num_steps"] == 10 and m["ptqd"]["vsc"] is True
    assert sorted(stats.steps) == sorted(m["calibration"]["timesteps"])  # calib.timesteps=0: every recorded step
    assert "ptqd.safetensors" in m["files"] and "ptqd.png" in m["files"]
    assert stats.k.shape == (1000,) and bool((stats.k >= 0).all()) and stats.bias.shape == (1000, 1)
    assert float(stats.corrected_var.max()) > 0


def test_the_graph_ends_with_the_head_and_matches_the_simulation(ptqd_artifact):
    graph = onnx.load(str(ptqd_artifact.file("model.qdq.onnx"))).graph
    producer = next(n for n in graph.node if "out_sample" in n.output)
    assert producer.op_type == "Mul"
    gathers = [n for n in graph.node if n.op_type == "Gather" and "timestep.rows" in n.input]
    assert len(gathers) == 2
    quant_error, op_by_op, fused = end_to_end_rms(ptqd_artifact)
    assert quant_error > 0 and op_by_op < 0.6 * quant_error and fused < 1.15 * quant_error


def test_sampling_refuses_another_sampler_and_uses_vsc_with_the_right_one(ptqd_artifact, capsys, tmp_path):
    with pytest.raises(DenoqError, match="PTQD statistics computed for ddpm 10 steps, sampling with ddim 10 steps"):
        sampling_variance(ptqd_artifact, "ort", "ddim", 10)
    msg = run_error(capsys, ["sample", str(ptqd_artifact.path), "--sampler", "ddpm", "--steps", "20", "--n", "2",
                             "--out", str(tmp_path / "g.png")])
    assert "--sampler ddpm --steps 10" in msg and not (tmp_path / "g.png").exists()
    assert sampling_variance(ptqd_artifact, "ort-fp", "ddim", 50) is None  # the FP graph has no head
    var = sampling_variance(ptqd_artifact, "ort", "ddpm", 10)
    assert torch.equal(var, artifact_ptqd(ptqd_artifact).corrected_var)
    with_vsc = generate(ptqd_artifact, "ort", sampler="ddpm", steps=10, eta=0.0, seed=0, n=4, threads=1)
    art = tmp_path / "novsc"
    shutil.copytree(ptqd_artifact.path, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["ptqd"]["vsc"] = False
    (art / "manifest.json").write_text(json.dumps(manifest))
    from denoq.compiler.artifact import Artifact

    without = generate(Artifact.open(art), "ort", sampler="ddpm", steps=10, eta=0.0, seed=0, n=4, threads=1)
    assert not torch.equal(with_vsc, without)  # the lowered noise changes the ancestral samples


def test_vsc_needs_the_statistics(tiny_pipeline, tmp_path):
    with pytest.raises(DenoqError, match=r"ptqd\.vsc=true needs the PTQD statistics"):
        compile_model(str(tiny_pipeline), load_recipe("w8a8", ["ptqd.vsc=true"]), tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_cli_eval_of_a_ptqd_artifact(ptqd_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(ptqd_artifact.path, art)
    assert main(["eval", str(art), "--sampler", "ddpm", "--steps", "10", "--n", "8", "--threads", "1"]) == 0
    report = json.loads((art / "report.json").read_text())
    assert report["sampler"]["sampler"] == "ddpm" and report["psnr_vs_fp"] > 0
    ptqd = report["ptqd"]
    stats = artifact_ptqd(ptqd_artifact)
    assert ptqd["t"] == stats.steps and len(ptqd["k"]) == len(ptqd["normality_p"]) == 10 and ptqd["vsc"] is True
    assert ptqd["k"] == pytest.approx([float(stats.k[t]) for t in stats.steps])
    assert "ptqd.png" in report["pictures"] and "<h3>ptqd.png</h3>" in (art / "report.html").read_text()


def test_bias_only_correction_ships_k_zero(tiny_pipeline, tmp_path):
    art = compile_model(str(tiny_pipeline), load_recipe("w8a8", [*SETS[:4], "ptqd.correlation=false"]),
                        tmp_path / "a")
    stats = artifact_ptqd(art)
    assert art.manifest["ptqd"]["correlation"] is False
    assert float(stats.k.abs().max()) == 0.0 and float(stats.bias.abs().max()) > 0
    graph = onnx.load(str(art.file("model.qdq.onnx"))).graph
    inv = next(i for i in graph.initializer if i.name.endswith("inv_one_plus_k"))
    assert set(onnx.numpy_helper.to_array(inv).ravel().tolist()) == {1.0}
