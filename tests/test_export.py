"""Export: every quantizable module mapped to its node, weights renamed, FP graph equal to PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_unet
from onnx import numpy_helper

from denoq.errors import DenoqError
from denoq.export.onnx_export import GraphInputs, export_fp
from denoq.layermap import LAYER_MAP_KEY
from denoq.layers import quantizable_layers


def test_layer_map_covers_every_module_with_renamed_weights(tiny_artifact_trt):
    model = onnx.load(str(tiny_artifact_trt.file("model.fp.onnx")))
    layer_map = tiny_artifact_trt.manifest["layer_map"]
    from denoq.compiler.backends import artifact_model

    layers = quantizable_layers(artifact_model(tiny_artifact_trt).module)
    assert set(layer_map) == set(layers)
    stored = {p.key: p.value for p in model.metadata_props}
    assert LAYER_MAP_KEY in stored
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    ops = {entry["op_type"] for entry in layer_map.values()}
    assert ops == {"Conv", "Gemm", "MatMul"}  # attention projections arrive as MatMul
    for name, entry in layer_map.items():
        assert entry["weight"] == f"{name}.weight"
        assert nodes[entry["node"]].input[1] == entry["weight"]
        w = layers[name].weight.detach().numpy()
        np.testing.assert_array_equal(inits[entry["weight"]], w.T if entry["transposed"] else w)
        assert entry["weight_axis"] == (1 if entry["op_type"] == "MatMul" else 0)


def test_fp_graph_matches_pytorch_with_dynamic_batch_resolution_and_float_timesteps(tiny_artifact_trt):
    from denoq.compiler.backends import artifact_model

    module = artifact_model(tiny_artifact_trt).module
    sess = ort.InferenceSession(str(tiny_artifact_trt.file("model.fp.onnx")), providers=["CPUExecutionProvider"])
    for batch, size in ((1, 16), (5, 16), (2, 24)):  # dynamic batch and resolution, fractional timesteps
        x = torch.randn(batch, 1, size, size)
        t = torch.rand(batch) * 999
        got = sess.run(["out_sample"], {"sample": x.numpy(), "timestep": t.numpy()})[0]
        np.testing.assert_allclose(got, module(x, t).sample.detach().numpy(), atol=1e-4, rtol=1e-4)


def test_unmapped_module_is_an_error(tmp_path):
    model = tiny_unet().eval()
    model.unused = torch.nn.Linear(4, 4)  # quantizable, but no node carries its weight
    with pytest.raises(DenoqError, match="unused"):
        export_fp(model, GraphInputs(torch.randn(2, 1, 16, 16), torch.tensor([1, 2])), tmp_path / "m.onnx")
