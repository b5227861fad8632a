"""Flow-matching models (a FlowMatchEulerDiscreteScheduler pipeline folder) through compile, sample and validate:
calibration on flow-Euler trajectories (float timesteps), the Q/DQ graph against the simulation, denoq's sampler
against diffusers' scheduler loop, and the one-line refusals of what is not implemented for velocity models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compile_refused, save_pipeline, tiny_class_unet

from denoq.compiler.cli import main

FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def flow_folder(folder):
    save_pipeline(tiny_class_unet(seed=3), folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(FLOW))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", FLOW["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def flow_pipeline(tmp_path_factory):
    return flow_folder(tmp_path_factory.mktemp("models") / "tiny-flow")


@pytest.fixture(scope="module")
def flow_artifact(flow_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("arts") / "flow"
    assert main(["compile", str(flow_pipeline), "--recipe", "w8a8", "--out", str(out), "--set", "calib.samples=4",
                 "--set", "calib.steps=6", "--set", "calib.sampler=flow-euler", "--set", "target=ort-cpu"]) == 0
    return out


def test_calibration_runs_on_flow_euler_timesteps_and_the_graph_matches_the_simulation(flow_artifact):
    from denoq.sampling import FlowSchedule

    m = json.loads((flow_artifact / "manifest.json").read_text())
    expected, _ = FlowSchedule.from_config(FLOW).sigmas(6)
    assert m["calibration"]["timesteps"] == pytest.approx(expected.tolist())
    assert any(t != round(t) for t in m["calibration"]["timesteps"])  # fractional: 1000 σ after the shift
    assert m["recipe"]["values"]["calib.sampler"] == "flow-euler"
    assert m["parity_gate"]["passed"] and m["checks"]["fp_onnx_vs_torch_max_abs"] < 1e-4


def test_denoq_sample_defaults_to_flow_euler_and_equals_the_diffusers_loop(flow_pipeline, flow_artifact, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    out, tensor = tmp_path / "s.png", tmp_path / "s.npy"
    assert main(["sample", str(flow_artifact), "--backend", "ort-fp", "--steps", "5", "--n", "2", "--label", "1",
                 "--out", str(out), "--save-tensor", str(tensor)]) == 0
    ours = torch.from_numpy(np.load(tensor))
    unet = UNet2DModel.from_pretrained(flow_pipeline / "unet").eval()
    sched = FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in FLOW.items() if k != "_class_name"})
    sched.set_timesteps(5)
    x = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t.expand(2), class_labels=torch.ones(2, dtype=torch.int64)).sample, t, x).prev_sample
    assert (ours - x).abs().max() < 1e-3  # ONNX Runtime FP graph vs PyTorch, 5 steps


def test_validate_feeds_flow_trajectory_states(flow_artifact, capsys):
    assert main(["validate", str(flow_artifact), "--steps", "4", "--n", "4"]) in (0, 1)
    assert "timestep" not in capsys.readouterr().err


@pytest.mark.parametrize("sets, words", [
    (("calib.sampler=ddim",), "sampler ddim cannot run a flow-matching model (FlowMatchEulerDiscreteScheduler)"),
    (("calib.sampler=flow-euler", "ptqd.enabled=true"), "ptqd.enabled=true are not implemented for velocity"),
    (("calib.sampler=flow-euler", "activations.timestep_groups=4"), "activations.timestep_groups>1"),
])
def test_what_flow_models_do_not_take_is_refused(capsys, flow_pipeline, tmp_path, sets, words):
    err = compile_refused(capsys, flow_pipeline, tmp_path / "art", sets=sets)
    assert words in err


def test_a_ddpm_model_refuses_the_flow_sampler(capsys, class_pipeline, tmp_path):
    err = compile_refused(capsys, class_pipeline, tmp_path / "art", sets=("calib.sampler=flow-euler",))
    assert "sampler flow-euler cannot run a DDPM-family (beta schedule) model (DDPMScheduler); use ddpm or ddim" in err


def test_sampling_a_flow_artifact_with_ddim_is_refused(capsys, flow_artifact, tmp_path):
    assert main(["sample", str(flow_artifact), "--sampler", "ddim", "--steps", "2", "--n", "1", "--label", "0",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "use flow-euler" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
