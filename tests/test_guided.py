"""Guided calibration and the guided export (issue: conditional models and classifier-free guidance).

Calibration trajectories sampled with guidance (`calib.guidance`), whose statistics see both halves of the doubled
batch; PTQD measured on the guidance-combined output; the guided graph `(sample, timestep, class_labels,
guidance_scale)` with PTQD's head after the combination, against the plain graph driven by `classifier_free` (same
float32 ops: bit for bit) and against the PyTorch simulation (independent executor, relative to the quantization
error); sampling refusals and bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import compile_refused

from denoq.calibrators.calibset import record_trajectories
from denoq.calibrators.ptqd import collect_pairs
from denoq.compiler.artifact import Artifact
from denoq.compiler.backends import artifact_ptqd, guide, make_backend, with_ptqd_head
from denoq.compiler.cli import main
from denoq.compiler.load import load_model
from denoq.engines.ort import OrtBackend
from denoq.errors import DenoqError
from denoq.passes.guidance import GUIDED_GRAPH, GuideClassFree
from denoq.sampling import NoiseSchedule, module_eps, sample
from denoq.sampling.guidance import classifier_free

FAST = ["--set", "calib.samples=6", "--set", "calib.steps=5", "--set", "activations.timestep_groups=2", "--quiet"]
NULL = torch.tensor(3)  # tiny_class_unet: classes 0-2, null label 3


@pytest.fixture(scope="module")
def guided_artifact(class_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "guided"
    assert main(["compile", str(class_pipeline), "--out", str(out), *FAST, "--set", "calib.guidance=1,2,4",
                 "--set", "ptqd.enabled=true"]) == 0
    return Artifact.open(out)


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(3)
    return (torch.randn((n, 1, 16, 16), generator=g), torch.tensor([5, 500, 999][:n]), torch.tensor([0, 1, 2][:n]))


def test_guided_trajectories_are_the_guided_sampler_and_calibrate_both_halves(class_pipeline):
    spec = load_model(str(class_pipeline))
    eps = module_eps(spec.module)
    schedule = NoiseSchedule.from_config(spec.scheduler_config)
    labels, scales = torch.tensor([0, 2, 1, 0]), torch.tensor([1.0, 2.0, 4.0, 1.0])
    recorded = []
    with torch.no_grad():
        pool = record_trajectories(eps, schedule, sampler="ddim", steps=4, n_samples=4, sample_shape=(1, 16, 16),
                                   seed=7, cond=labels, guidance=scales, null_cond=NULL)
        for i, s in enumerate(scales.tolist()):  # each trajectory alone, guided at its own scale
            sample(classifier_free(eps, NULL, s), schedule, sampler="ddim", steps=4, shape=(4, 1, 16, 16),
                   generator=torch.Generator().manual_seed(7), cond=labels,
                   callback=lambda step, t, x, e, i=i: recorded.append((step, i, x[i].clone())))
    for step, i, x in recorded:
        torch.testing.assert_close(pool.x[step][i], x, rtol=1e-4, atol=1e-5)
    x, _, cond = next(pool.batches(4))
    assert x.shape[0] == 4 and cond.tolist() == [3, 3, 0, 2]  # two states doubled: null half first
    torch.testing.assert_close(x[:2], x[2:])
    assert len(pool) == 2 * 4 * 4


def test_ptqd_pairs_on_guided_trajectories_are_guidance_combined(class_pipeline):
    spec = load_model(str(class_pipeline))
    eps = module_eps(spec.module)
    pool = record_trajectories(eps, NoiseSchedule.from_config(spec.scheduler_config), sampler="ddim", steps=2,
                               n_samples=3, sample_shape=(1, 16, 16), seed=0, cond=torch.tensor([0, 1, 2]),
                               guidance=torch.tensor([1.0, 2.0, 4.0]), null_cond=NULL)
    shifted = lambda x, t, c: eps(x, t, c) * 1.1  # noqa: E731 - a "quantized" model with a known error
    t, eps_fp, eps_q = next(collect_pairs(eps, shifted, pool, batch_size=8))
    x, c = pool.x[0], pool.cond
    with torch.no_grad():
        u, k = eps(x, torch.full((3,), t), NULL.expand(3)), eps(x, torch.full((3,), t), c)
    want = u + torch.tensor([1.0, 2.0, 4.0]).reshape(-1, 1, 1, 1) * (k - u)
    torch.testing.assert_close(eps_fp, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eps_q, 1.1 * want, rtol=1e-4, atol=1e-5)


def test_guided_graph_interface_and_head_after_the_combination(guided_artifact):
    graph = onnx.load(str(guided_artifact.file(GUIDED_GRAPH)))
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.graph.input}
    assert inputs == {"sample": onnx.TensorProto.FLOAT, "timestep": onnx.TensorProto.FLOAT,
                      "class_labels": onnx.TensorProto.INT64, "guidance_scale": onnx.TensorProto.FLOAT}
    producer = {o: n for n in graph.graph.node for o in n.output}
    head = producer["out_sample"]
    assert head.name == "ptqd_head/Mul"
    assert producer[producer[head.input[0]].input[0]].name == "cfg/Add"  # (Add(u, s·(c − u)) − bias) · 1/(1+k)
    plain = onnx.load(str(guided_artifact.file("model.qdq.onnx")))
    assert not any(n.name.startswith("ptqd_head") for n in plain.graph.node)  # users who guide outside add it
    meta = guided_artifact.manifest
    assert meta["guidance"] == {"graph": GUIDED_GRAPH, "calib_scales": [1.0, 2.0, 4.0], "ptqd_after_guidance": True}
    assert meta["ptqd"]["guidance"] == [1.0, 2.0, 4.0]


def test_guided_graph_parity(guided_artifact):
    checks = guided_artifact.manifest["checks"]
    assert checks["guided_vs_plain_guided_max_abs"] < 1e-5
    assert checks["guided_vs_sim_over_quant_error"] < 1.0
    x, t, c = _inputs()
    scales = torch.tensor([1.0, 2.0, 4.0])
    got = OrtBackend(guided_artifact.file(GUIDED_GRAPH))(x, t, c, guidance=scales)
    want = with_ptqd_head(classifier_free(OrtBackend(guided_artifact.file("model.qdq.onnx")), NULL, scales),
                          artifact_ptqd(guided_artifact))(x, t, c)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    sim = guide(guided_artifact, "torch-sim", make_backend(guided_artifact, "torch-sim"), 2.0)(x, t, c)
    ort = guide(guided_artifact, "ort", make_backend(guided_artifact, "ort"), 2.0)(x, t, c)
    fp = guide(guided_artifact, "torch-fp", make_backend(guided_artifact, "torch-fp"), 2.0)(x, t, c)
    rms = lambda a, b: float((a - b).pow(2).mean().sqrt())  # noqa: E731
    assert rms(ort, sim) < 0.75 * rms(sim, fp)  # independent executors agree within the quantization error


def test_unguided_calibration_keeps_the_head_in_the_plain_graph(class_pipeline, tmp_path):
    out = tmp_path / "plain"
    assert main(["compile", str(class_pipeline), "--out", str(out), *FAST, "--set", "ptqd.enabled=true"]) == 0
    art = Artifact.open(out)
    assert art.manifest["guidance"]["ptqd_after_guidance"] is False
    plain = onnx.load(str(art.file("model.qdq.onnx")))
    assert any(n.name == "ptqd_head/Mul" for n in plain.graph.node)
    assert art.manifest["checks"]["guided_vs_plain_guided_max_abs"] < 1e-5
    x, t, c = _inputs()
    assert torch.equal(guide(art, "ort", make_backend(art, "ort"), 2.0)(x, t, c),
                       classifier_free(make_backend(art, "ort"), NULL, 2.0)(x, t, c))


@pytest.mark.parametrize("extra,message", [
    (["--label", "1"], "guided at 1, 2, 4; sampling without guidance"),
    (["--label", "1", "--guidance", "3"], "sampling at guidance 3 would correct with the wrong tables"),
])
def test_sampling_outside_the_calibrated_guidance_is_refused(guided_artifact, tmp_path, capsys, extra, message):
    assert main(["sample", str(guided_artifact.path), "--steps", "5", "--n", "2", "--out", str(tmp_path / "g.png"),
                 *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "g.png").exists()


def test_sampling_the_guided_artifact(guided_artifact, tmp_path):
    out = tmp_path / "x.npy"
    argv = ["sample", str(guided_artifact.path), "--steps", "5", "--n", "3", "--out", str(tmp_path / "g.png"),
            "--label", "2", "--guidance", "2", "--save-tensor", str(out)]
    assert main(argv) == 0
    ort = np.load(out)
    assert main([*argv, "--backend", "torch-sim", "--force"]) == 0
    sim = np.load(out)
    assert main([*argv, "--backend", "torch-fp", "--force"]) == 0
    fp = np.load(out)
    assert np.abs(ort - sim).mean() < np.abs(sim - fp).mean()


@pytest.mark.parametrize("sets,message", [
    (["calib.guidance=2,x"], "not a comma-separated list of guidance scales"),
    (["calib.guidance=-1"], "not a comma-separated list"),
    (["calib.guidance=2", "weights.method=adaround"], "calib.guidance is not supported with it yet"),
])
def test_bad_guided_calibration_is_refused(class_pipeline, tmp_path, capsys, sets, message):
    assert message in compile_refused(capsys, class_pipeline, tmp_path / "a", *FAST, sets=sets)


def test_guided_calibration_of_an_unconditional_model_is_refused(tiny_pipeline, tmp_path, capsys):
    assert main(["compile", str(tiny_pipeline), "--out", str(tmp_path / "a"), "--set", "calib.guidance=2",
                 "--quiet"]) == 2
    assert "needs a class-conditional or text-to-image model" in capsys.readouterr().err


def test_guide_pass_refuses_graphs_it_cannot_guide(guided_artifact, tiny_artifact_trt):
    with pytest.raises(DenoqError, match="no 'class_labels' input"):
        GuideClassFree(3)(onnx.load(str(tiny_artifact_trt.file("model.qdq.onnx"))))
    with pytest.raises(DenoqError, match="already has a 'guidance_scale' input"):
        GuideClassFree(3)(onnx.load(str(guided_artifact.file(GUIDED_GRAPH))))
