"""The `denoq` CLI: happy paths, and every bad input giving one line, exit 2 and nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_pipeline, tiny_unet
from PIL import Image

from denoq.compiler.artifact import Artifact
from denoq.compiler.cli import build_parser, main

FAST = ["--set", "calib.samples=4", "--set", "calib.steps=5", "--quiet"]


def run_error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a user error: exit 2, one line on stderr starting with `error:`."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def assert_nothing_written(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}")], list(parent.iterdir())


def test_help_lists_every_command():
    text = build_parser().format_help()
    for cmd in ("compile", "sample", "eval", "inspect", "recipes"):
        assert cmd in text


def test_recipes_prints_presets_and_keys(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for word in ("w8a8", "w8a8-ort", "activations.observer", "calib.samples", "target"):
        assert word in out


def test_missing_model_folder(capsys, tmp_path):
    err = run_error(capsys, ["compile", str(tmp_path / "nope"), "--out", str(tmp_path / "a")])
    assert "neither an embedded model" in err
    assert_nothing_written(tmp_path, "a")


def test_wrong_model_class(capsys, tmp_path, tiny_pipeline):
    folder = tmp_path / "wrong"
    shutil.copytree(tiny_pipeline, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["diffusers", "Transformer2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    err = run_error(capsys, ["compile", str(folder), "--out", str(tmp_path / "a")])
    assert "Transformer2DModel" in err and "UNet2DModel" in err
    assert_nothing_written(tmp_path, "a")


def test_corrupt_safetensors(capsys, tmp_path, tiny_pipeline):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_pipeline, folder)
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    err = run_error(capsys, ["compile", str(folder), "--out", str(tmp_path / "a")])
    assert "cannot load UNet2DModel" in err and "re-save" in err
    assert_nothing_written(tmp_path, "a")


def test_nan_in_calibration(capsys, tmp_path):
    unet = tiny_unet()
    with torch.no_grad():
        unet.conv_out.bias[0] = float("nan")
    folder = save_pipeline(unet, tmp_path / "nan")
    err = run_error(capsys, ["compile", str(folder), "--out", str(tmp_path / "a"), *FAST])
    assert "NaN/Inf in calibration" in err
    assert_nothing_written(tmp_path, "a")


def test_unknown_recipe_key_and_value(capsys, tmp_path, tiny_pipeline):
    err = run_error(capsys, ["compile", str(tiny_pipeline), "--out", str(tmp_path / "a"),
                             "--set", "activations.bit=8"])
    assert "activations.bits" in err
    err = run_error(capsys, ["compile", str(tiny_pipeline), "--out", str(tmp_path / "a"),
                             "--set", "activations.observer=magic"])
    assert "minmax" in err
    assert_nothing_written(tmp_path, "a")


def test_keep_fp_pattern_matching_nothing(capsys, tmp_path, tiny_pipeline):
    err = run_error(capsys, ["compile", str(tiny_pipeline), "--out", str(tmp_path / "a"),
                             "--set", "layers.keep_fp=conv_inn", *FAST])
    assert "conv_inn" in err and "matches no" in err
    assert_nothing_written(tmp_path, "a")


def test_more_timestep_groups_than_calibrated_timesteps(capsys, tmp_path, tiny_pipeline):
    err = run_error(capsys, ["compile", str(tiny_pipeline), "--out", str(tmp_path / "a"),
                             "--set", "activations.timestep_groups=8", *FAST])  # FAST records 5 steps
    assert "timestep_groups" in err and "calib.steps" in err
    assert_nothing_written(tmp_path, "a")


def test_existing_output_refused_without_force(capsys, tmp_path, tiny_artifact_trt):
    out = tmp_path / "art"
    shutil.copytree(tiny_artifact_trt.path, out)
    before = sorted(p.name for p in out.iterdir())
    err = run_error(capsys, ["compile", "/definitely/not/needed", "--out", str(out)])
    assert "--force" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_newer_schema_and_tampered_artifact(capsys, tmp_path, tiny_artifact_trt):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact_trt.path, art)
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    assert "upgrade denoq" in run_error(capsys, ["inspect", str(art)])
    (art / "manifest.json").write_text(json.dumps(manifest))
    with open(art / "plan.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    err = run_error(capsys, ["sample", str(art), "--out", str(tmp_path / "g.png")])
    assert "plan.safetensors" in err and "sha256" in err
    assert not (tmp_path / "g.png").exists()


def test_compile_bare_conditional_unet_needs_its_conditioning(capsys, tmp_path, tiny_cond_pipeline):
    """A UNet2DConditionModel folder without text encoders is refused without conditioning; with the random
    opt-in it compiles (encoder_hidden_states in the graph, the opt-in in the manifest), and denoq's own sampler
    points to the diffusers pipeline."""
    out = tmp_path / "cond"
    assert "calib.embeddings=FILE.safetensors" in run_error(capsys, ["compile", str(tiny_cond_pipeline), "--out",
                                                                    str(out), *FAST])
    assert main(["compile", str(tiny_cond_pipeline), "--out", str(out), *FAST, "--set",
                 "calib.conditioning=random"]) == 0
    art = Artifact.open(out)
    assert art.manifest["model"]["class"] == "UNet2DConditionModel"
    assert art.manifest["calibration"]["conditioning"]["representative"] is False
    assert any("attn2.to_k" in name for name in art.manifest["plan"]["layers"])
    err = run_error(capsys, ["sample", str(out), "--backend", "ort", "--steps", "3", "--n", "4", "--out",
                             str(tmp_path / "g.png")])
    assert "text-to-image" in err and "pipe.unet = denoq.load(ART)" in err
    assert not (tmp_path / "g.png").exists()


def test_sample_eval_inspect_on_artifact(capsys, tmp_path, tiny_artifact_trt):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact_trt.path, art)
    old_umask = os.umask(0o022)
    try:
        _sample_eval_inspect(capsys, tmp_path, art)
    finally:
        os.umask(old_umask)
    # artifacts and outputs are readable by other users (a deployment step), not private like mkstemp's files
    for path in (tiny_artifact_trt.path, tiny_artifact_trt.path / "model.qdq.onnx", art / "report.json",
                 tmp_path / "grid.png"):
        assert path.stat().st_mode & 0o044 == 0o044, path


def _sample_eval_inspect(capsys, tmp_path: Path, art: Path) -> None:
    grid, tensor = tmp_path / "grid.png", tmp_path / "x.npy"
    for backend in ("torch-fp", "torch-sim", "ort"):
        assert main(["sample", str(art), "--backend", backend, "--sampler", "ddpm", "--steps", "4", "--n", "9",
                     "--out", str(grid), "--save-tensor", str(tensor), "--force"]) == 0
        x = np.load(tensor)
        assert x.shape == (9, 1, 16, 16) and np.isfinite(x).all()
    assert main(["eval", str(art), "--n", "16", "--steps", "5", "--threads", "1"]) == 0
    report = json.loads((art / "report.json").read_text())
    for key in ("fd_digits", "fd_digits_fp", "psnr_vs_fp", "fd_to_fp", "sampler", "latency_ms", "fusion"):
        assert key in report
    assert report["sampler"]["sampler"] == "ddim" and report["sampler"]["steps"] == 5
    assert len(report["eps_rel_error_per_step"]["value"]) == 5
    html = (art / "report.html").read_text()
    assert "data:image/png;base64," in html and "FD-digits" in html
    reopened = Artifact.open(art)  # hashes still valid after eval added its files
    for name in ("report.json", "report.html", "samples_fp_vs_quant.png", "layer_error.png", "timestep_error.png"):
        assert name in reopened.manifest["files"]
    assert main(["inspect", str(art), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "W8A8" in out and "plan.safetensors" in out and "kept in floating point: conv_in, conv_out" in out
    assert "down_blocks.0.resnets.0.conv1" in out and "int8 s=" in out


def test_eval_plots_timestep_groups(tmp_path, tiny_artifact_trt_g4, tiny_artifact_trt):
    """An artifact with timestep-grouped activation scales gets timestep_groups.png in its report; without groups,
    none (and the report says one group)."""
    art = tmp_path / "g4"
    shutil.copytree(tiny_artifact_trt_g4.path, art)
    assert main(["eval", str(art), "--n", "8", "--steps", "5", "--threads", "1"]) == 0
    report = json.loads((art / "report.json").read_text())
    assert "timestep_groups.png" in report["pictures"]
    assert "timestep_groups.png" in Artifact.open(art).manifest["files"]
    assert Image.open(art / "timestep_groups.png").size[0] > 0
    summary = report["timestep_groups"]
    assert summary["layers_with_groups"] > 0 and summary["max_groups"] > 1
    assert 0 < len(summary["plotted"]) <= 4 and len(set(summary["plotted"])) == len(summary["plotted"])
    html = (art / "report.html").read_text()
    assert "<h3>timestep_groups.png</h3><img src='data:image/png;base64," in html
    calibrated = Artifact.open(art).manifest["calibration"]["timesteps"]
    assert report["calibration"]["timesteps"] == calibrated and report["calibration"]["selection"]["strategy"] == \
        "uniform" and report["calibration"]["group_search"]["method"] == "dp"
    assert f"{len(calibrated)} calibration timesteps (uniform); groups by dp" in html

    plain = tmp_path / "plain"
    shutil.copytree(tiny_artifact_trt.path, plain)
    assert main(["eval", str(plain), "--n", "8", "--steps", "5", "--threads", "1"]) == 0
    report = json.loads((plain / "report.json").read_text())
    assert "timestep_groups.png" not in report["pictures"] and not (plain / "timestep_groups.png").exists()
    assert "timestep_groups.png" not in Artifact.open(plain).manifest["files"]
    assert report["timestep_groups"]["layers_with_groups"] == 0
    assert "1 group" in (plain / "report.html").read_text()


@pytest.mark.parametrize("bad", [["sample", "{art}", "--backend", "ort", "--steps", "0", "--out", "{tmp}/g.png"],
                                 ["sample", "{art}", "--sampler", "ddpm", "--eta", "0.5", "--out", "{tmp}/g.png"]])
def test_bad_sampling_arguments(capsys, tmp_path, tiny_artifact_trt, bad):
    argv = [a.format(art=tiny_artifact_trt.path, tmp=tmp_path) for a in bad]
    run_error(capsys, argv)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("backend", ["ort", "torch-sim"])
def test_tables_not_matching_the_schedulers_T_are_a_clear_error(capsys, tiny_artifact_trt_g4, tmp_path, backend):
    """An artifact whose scheduler T differs from its tables' length (here: the manifest's scheduler edited) would
    Gather past the tables; sampling refuses it, naming both lengths and the fix, and writes nothing."""
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact_trt_g4.path, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["scheduler"]["num_train_timesteps"] = 500
    (art / "manifest.json").write_text(json.dumps(manifest))
    msg = run_error(capsys, ["sample", str(art), "--out", str(tmp_path / "g.png"), "--n", "2", "--steps", "2",
                             "--backend", backend])
    assert "tables have length T = 1000" in msg and "num_train_timesteps = 500" in msg and "recompile" in msg
    assert not (tmp_path / "g.png").exists()
