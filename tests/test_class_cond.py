"""Class-conditional UNet2DModels (`class_labels`) and classifier-free guidance: load, compile, export parity,
sampling with --label / --guidance, and the bad inputs (label outside the classes, guidance on an unconditional
model, no label for a conditional one)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from denoq.compiler.artifact import Artifact
from denoq.compiler.backends import make_backend
from denoq.compiler.cli import main
from denoq.compiler.load import load_model
from denoq.sampling import module_eps
from denoq.sampling.guidance import classifier_free

FAST = ["--set", "calib.samples=4", "--set", "calib.steps=5", "--quiet"]


@pytest.fixture(scope="module")
def class_artifact(class_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "class"
    assert main(["compile", str(class_pipeline), "--out", str(out), *FAST]) == 0
    return Artifact.open(out)


def test_class_conditional_model_loads(class_pipeline):
    spec = load_model(str(class_pipeline))
    assert (spec.cond_input, spec.num_classes, spec.cond_shape) == ("class_labels", 3, ())
    labels = spec.random_cond(400, 0)
    assert labels.dtype == torch.int64 and set(labels.tolist()) == {0, 1, 2, 3}  # both CFG halves calibrate


def test_graph_takes_class_labels_and_matches_torch(class_artifact):
    graph = onnx.load(str(class_artifact.file("model.fp.onnx")), load_external_data=False)
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.graph.input}
    assert inputs == {"sample": onnx.TensorProto.FLOAT, "timestep": onnx.TensorProto.FLOAT,
                      "class_labels": onnx.TensorProto.INT64}
    checks = class_artifact.manifest["checks"]
    assert checks["fp_onnx_vs_torch_max_abs"] < 1e-4
    assert checks["qdq_ort_vs_sim_over_quant_error"] < 1.0
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([10, 300, 600, 900])
    ort = make_backend(class_artifact, "ort-fp")
    a, b = ort(x, t, torch.tensor([0, 0, 0, 0])), ort(x, t, torch.tensor([2, 2, 2, 2]))
    assert (a - b).abs().max() > 1e-3  # the label changes the prediction


def test_guidance_is_eq6_in_one_doubled_batch(class_pipeline):
    spec = load_model(str(class_pipeline))
    eps = module_eps(spec.module)
    calls = []

    def counting(x, t, cond):
        calls.append(x.shape[0])
        return eps(x, t, cond)

    x, t, c = torch.randn(3, 1, 16, 16), torch.tensor([5, 500, 999]), torch.tensor([0, 1, 2])
    null = torch.full((3,), 3)
    with torch.no_grad():
        got = classifier_free(counting, torch.tensor(3), 2.5)(x, t, c)
        want = eps(x, t, null) + 2.5 * (eps(x, t, c) - eps(x, t, null))
        plain = classifier_free(counting, torch.tensor(3), 1.0)(x, t, c)
    assert calls[0] == 6  # one call with both halves
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(plain, eps(x, t, c), rtol=1e-4, atol=1e-5)


def test_sample_with_label_and_guidance(class_artifact, tmp_path):
    out = tmp_path / "x.npy"
    argv = ["sample", str(class_artifact.path), "--steps", "3", "--n", "4", "--out", str(tmp_path / "g.png"),
            "--save-tensor", str(out), "--label", "1"]
    assert main([*argv, "--guidance", "2"]) == 0
    guided = np.load(out)
    assert guided.shape == (4, 1, 16, 16) and np.isfinite(guided).all()
    assert main([*argv, "--force"]) == 0  # no guidance: the conditional model
    assert np.abs(np.load(out) - guided).max() > 1e-3


@pytest.mark.parametrize("extra,message", [
    (["--label", "3"], "label 3 is outside model .* classes 0–2"),
    (["--label", "-1"], "outside"),
    ([], "class-conditional: pass --label"),
    (["--label", "1", "--guidance", "-1"], "--guidance: expects a finite number ≥ 0"),
])
def test_bad_labels_are_refused(class_artifact, tmp_path, capsys, extra, message):
    assert main(["sample", str(class_artifact.path), "--steps", "2", "--n", "2", "--out", str(tmp_path / "g.png"),
                 *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "g.png").exists()


def test_guidance_on_an_unconditional_model_is_refused(tiny_artifact_trt, tmp_path, capsys):
    assert main(["sample", str(tiny_artifact_trt.path), "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png"),
                 "--guidance", "2"]) == 2
    assert "not class-conditional" in capsys.readouterr().err


def test_eval_reports_class_accuracy_with_guidance(class_artifact, capsys):
    import json

    assert main(["eval", str(class_artifact.path), "--n", "6", "--steps", "3", "--threads", "1",
                 "--guidance", "2"]) == 0
    report = json.loads((class_artifact.path / "report.json").read_text())
    assert report["sampler"]["guidance"] == 2.0
    for key in ("class_accuracy", "class_accuracy_fp"):
        assert 0.0 <= report[key] <= 1.0
    assert "class accuracy" in capsys.readouterr().out
    assert any(name.endswith("-cfg2") for name in report["runs"])


def test_eval_guidance_on_an_unconditional_model_is_refused(tiny_artifact_trt, capsys):
    assert main(["eval", str(tiny_artifact_trt.path), "--n", "2", "--steps", "2", "--guidance", "2"]) == 2
    assert "not class-conditional" in capsys.readouterr().err
