"""Graphs over protobuf's 2 GB limit (denoq.onnxio): with the threshold lowered to 0, a tiny model takes the
external-data path through export, passes, the float16 graph and ORT, and gives the same artifact numbers."""

from __future__ import annotations

import onnx
import pytest

from denoq import onnxio
from denoq.compiler.backends import make_backend


def test_external_data_path_end_to_end(tiny_pipeline, tmp_path, monkeypatch):
    from denoq.compiler.pipeline import compile_model
    from denoq.compiler.recipe import load_recipe

    recipe = load_recipe("w8a8", ["calib.samples=4", "calib.steps=4"])
    small = compile_model(str(tiny_pipeline), recipe, tmp_path / "small")
    monkeypatch.setattr(onnxio, "EXTERNAL_ABOVE", 0)
    large = compile_model(str(tiny_pipeline), recipe, tmp_path / "large")
    for name in ("model.fp.onnx", "model.qdq.onnx", "model.trt.onnx"):
        assert f"{name}.data" in large.files and f"{name}.data" not in small.files
        graph = onnx.load(str(large.file(name)), load_external_data=False)
        assert all(not t.raw_data for t in graph.graph.initializer if t.ByteSize() > 2048)  # tensors live outside
        assert large.file(name).stat().st_size < small.file(name).stat().st_size
    numbers = {k: v for k, v in small.manifest["checks"].items() if not isinstance(v, str)}
    assert large.manifest["checks"]["qdq_executor"] == small.manifest["checks"]["qdq_executor"] == "onnxruntime"
    assert {k: large.manifest["checks"][k] for k in numbers} == pytest.approx(numbers, rel=1e-6, abs=1e-9)
    assert large.manifest["trt_rules"]["count"] == 0
    x, t = onnxio_inputs()
    for backend in ("ort", "ort-fp16"):
        assert (make_backend(large, backend)(x, t) - make_backend(small, backend)(x, t)).abs().max() == 0


def test_check_and_infer_reports_broken_large_graphs(tiny_artifact_trt, monkeypatch):
    model = onnx.load(str(tiny_artifact_trt.file("model.qdq.onnx")))
    monkeypatch.setattr(onnxio, "EXTERNAL_ABOVE", 0)
    inferred = onnxio.check_and_infer(model, check=True)
    assert len(inferred.graph.value_info) > 0
    assert all(t.raw_data for t in model.graph.initializer if t.ByteSize() > 2048)  # the caller's model is intact
    model.graph.node[-1].input[0] = "missing_tensor"
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        onnxio.check_and_infer(model, check=True)


def onnxio_inputs():
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn((3, 1, 16, 16), generator=g), torch.tensor([5, 400, 900])
