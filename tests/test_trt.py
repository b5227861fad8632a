"""TensorRT deployment: the float16 graph (passes.fp16), TRT-legal W4A8, build info and profiles, backend
selection, `denoq build` / `denoq validate`. TensorRT and GPU runs skip with the reason when they cannot run."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from denoq.compiler.artifact import Artifact
from denoq.compiler.backends import make_backend
from denoq.compiler.build import ENGINE_FILE, TRT_GRAPH, build, parse_profile
from denoq.compiler.cli import main
from denoq.engines.ort import OrtBackend
from denoq.engines.trt import ShapeRange, check_build_info, layer_precisions, profile_shapes
from denoq.errors import DenoqError
from denoq.passes.fp16 import ConvertFp16, fp32_nodes
from denoq.passes.manager import verify
from denoq.passes.trt_rules import trt_violations

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = torch.cuda.is_available()
NEEDS_TRT = pytest.mark.skipif(not (HAS_TRT and HAS_GPU),
                               reason="needs the tensorrt package and an NVIDIA GPU (pip install 'denoq[gpu]')")


def _types(model: onnx.ModelProto) -> dict[str, int]:
    g = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def _inputs(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 1, 16, 16), generator=g), torch.tensor([1, 250, 600, 999][:n])


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


# -- the float16 graph -------------------------------------------------------------------------------------------

def test_fp16_graph_types_islands_and_rules(tiny_artifact_trt):
    art = tiny_artifact_trt
    assert art.manifest["trt"] == {"graph": TRT_GRAPH, "fp16": True}
    half = onnx.load(str(art.file(TRT_GRAPH)))
    verify(half, "fp16")
    types = _types(half)
    assert types["sample"] == types["out_sample"] == TensorProto.FLOAT  # the engine's I/O stays float32
    for node in half.graph.node:
        if node.op_type in ("GroupNormalization", "Softmax", "Sin", "Cos"):
            assert types[node.input[0]] == TensorProto.FLOAT, node.name  # the float32 islands
        if node.op_type == "Conv" and node.name != "conv_out" and "conv_out" not in node.input[1]:
            assert {types[node.input[0]], types[node.input[1]]} <= {TensorProto.FLOAT16, TensorProto.FLOAT}
        if node.op_type == "QuantizeLinear":  # strong typing: the scale has its input's type
            assert types[node.input[0]] == types[node.input[1]], node.name
    convs = [n for n in half.graph.node if n.op_type == "Conv"]
    assert sum(types[n.input[0]] == TensorProto.FLOAT16 for n in convs) >= len(convs) - 2
    assert trt_violations(half) == []
    assert art.manifest["trt_rules"]["count"] == 0


def test_fp16_keeps_the_last_layer_and_head_in_fp32(tiny_artifact_trt):
    model = onnx.load(str(tiny_artifact_trt.file("model.qdq.onnx")))
    layer = {n.name: i for i, n in enumerate(model.graph.node)}
    from denoq.layermap import read_layer_map

    conv_out = layer[read_layer_map(model)["conv_out"].node]
    assert conv_out in fp32_nodes(model, ("conv_out",))
    assert conv_out not in fp32_nodes(model, ())
    half = ConvertFp16(())(model)
    types = _types(half)
    out_node = next(n for n in half.graph.node if n.name == model.graph.node[conv_out].name)
    assert types[out_node.input[0]] == TensorProto.FLOAT16  # without the pattern conv_out runs in float16


def test_fp16_graph_runs_in_ort_and_adds_no_error(tiny_artifact_trt):
    """Independent executors: ORT on the float32 and float16 graphs. The FP graph in float16 stays within float16
    rounding of float32; the quantized float16 graph's error to FP is the float32 Q/DQ graph's (roundings move,
    the error does not grow)."""
    art = tiny_artifact_trt
    x, t = _inputs()
    fp = OrtBackend(art.file("model.fp.onnx"))(x, t)
    fp_half = ConvertFp16()(onnx.load(str(art.file("model.fp.onnx"))))
    path = art.path.parent / "fp-half.onnx"
    onnx.save(fp_half, str(path))
    assert float((OrtBackend(path)(x, t) - fp).abs().max()) < 2e-2 * float(fp.abs().max())
    q32 = OrtBackend(art.file("model.qdq.onnx"))(x, t)
    q16 = OrtBackend(art.file(TRT_GRAPH))(x, t)
    ratio = _rms(q16, fp) / _rms(q32, fp)
    assert 0.7 < ratio < 1.3, ratio
    assert 0.5 < art.manifest["checks"]["fp16_error_over_fp32_error"] < 1.5


def test_fp16_refuses_values_float16_cannot_hold(tiny_artifact_trt):
    model = onnx.load(str(tiny_artifact_trt.file("model.qdq.onnx")))
    bad = copy.deepcopy(model)
    q = next(n for n in bad.graph.node if n.op_type == "QuantizeLinear")
    scale = next(i for i in bad.graph.initializer if i.name == q.input[1])
    scale.CopyFrom(numpy_helper.from_array(np.array(1e-9, np.float32), scale.name))
    with pytest.raises(DenoqError, match=r"underflows float16.*trt\.fp32_layers"):
        ConvertFp16()(bad)
    big = copy.deepcopy(model)
    bias = next(i for i in big.graph.initializer if i.name.endswith(".bias") and "conv_out" not in i.name)
    bias.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(bias).shape, 1e6, np.float32), bias.name))
    with pytest.raises(DenoqError, match="beyond float16's range"):
        ConvertFp16()(big)


# -- TRT-legal W4A8 -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conv_blocks", [False, True])
def test_w4a8_keeps_the_rules_unless_convs_are_blocked(tiny_pipeline, tmp_path, conv_blocks):
    from denoq.compiler.pipeline import compile_model
    from denoq.compiler.recipe import load_recipe

    recipe = load_recipe("w4a8", ["calib.samples=4", "calib.steps=4", "weights.group_size=16",
                                  "weights.method=rtn", f"weights.conv_blocks={str(conv_blocks).lower()}"])
    art = compile_model(str(tiny_pipeline), recipe, tmp_path / "a")
    rules = {v.split(":")[0] for v in art.manifest["trt_rules"]["violations"]}
    per_channel = art.manifest["calibration"]["weights"]["per_channel_layers"]
    if conv_blocks:
        assert rules == {"blocked-int8"}  # TensorRT has no blocked INT8 convolution
        with pytest.raises(DenoqError, match="TensorRT rule violation"):
            build(art.path)
    else:
        assert art.manifest["trt_rules"]["count"] == 0
        assert "down_blocks.0.resnets.0.conv1" in per_channel


# -- profiles, build info, engine inspector -------------------------------------------------------------------

def test_profiles_parse_and_shape():
    ranges = parse_profile("batch=2:4:8,height=16:32:64", [4, 64, 48])
    assert str(ranges["batch"]) == "2:4:8" and str(ranges["width"]) == "48:48:48"
    shapes = profile_shapes([4, 64, 48], ranges["batch"], ranges["height"], ranges["width"],
                            {"encoder_hidden_states": [77, 768]})
    assert shapes["sample"] == ((2, 4, 16, 48), (4, 4, 32, 48), (8, 4, 64, 48))
    assert shapes["timestep"] == ((2,), (4,), (8,))
    assert shapes["encoder_hidden_states"][2] == (8, 77, 768)
    for bad, match in (("batch=8:4:1", "min ≤ opt ≤ max"), ("depth=3", "KEY one of"), ("batch=a", "not N or")):
        with pytest.raises(DenoqError, match=match):
            parse_profile(bad, [4, 64, 48])
    with pytest.raises(DenoqError):
        ShapeRange(0, 1, 1)


def test_build_info_rejects_stale_and_foreign_engines():
    here = {"tensorrt": "10.9.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    recorded = {**here, "onnx_sha256": "a" * 64}
    check_build_info(recorded, "a" * 64, here)
    with pytest.raises(DenoqError, match="no engine build info"):
        check_build_info(None, "a" * 64, here)
    with pytest.raises(DenoqError, match=r"stale.*rebuild"):
        check_build_info(recorded, "b" * 64, here)
    with pytest.raises(DenoqError, match=r"TensorRT 10\.9\.0 but this machine has 10\.12"):
        check_build_info(recorded, "a" * 64, {**here, "tensorrt": "10.12"})
    with pytest.raises(DenoqError, match=r"compute capability 9\.0 but this machine has 8\.9"):
        check_build_info(recorded, "a" * 64, {**here, "compute_capability": "8.9", "gpu": "NVIDIA L4"})


def test_layer_precisions_reads_fused_layer_names():
    """TensorRT names a fused layer after the ONNX nodes it fused (" + "); the inspector's JSON gives each layer's
    input formats and tactic."""
    layers = [{"Name": "conv1/input/QuantizeLinear + node_conv2d + node_add", "LayerType": "CaskConvolution",
               "Inputs": [{"Name": "x", "Format/Datatype": "Channel major INT8 format"}], "TacticName": "sm90_xmma"},
              {"Name": "node_mul_sel", "LayerType": "PointWise",
               "Inputs": [{"Name": "y", "Format/Datatype": "Row major linear FP16 format"}]},
              {"Name": "PWN(PWN(up.0/timestep_ratio/Div), up.0/bias/Add)", "LayerType": "PointWiseV2"}]
    got = layer_precisions(layers, ["node_conv2d", "node_mul_sel", "node_missing", "up.0/timestep_ratio/Div",
                                    "node_conv2"])
    assert got["node_conv2d"] == {"layer": layers[0]["Name"], "int8": True, "own_layer": False, "found": True}
    assert got["node_mul_sel"]["own_layer"] and not got["node_mul_sel"]["int8"]
    assert not got["node_missing"]["found"] and not got["node_conv2"]["found"]  # whole names only
    assert got["up.0/timestep_ratio/Div"]["found"] and not got["up.0/timestep_ratio/Div"]["own_layer"]


# -- backends and commands without a GPU ---------------------------------------------------------------------------

def test_ort_fp16_backend_samples_like_ort(tiny_artifact_trt):
    x, t = _inputs()
    out = make_backend(tiny_artifact_trt, "ort-fp16")(x, t)
    ref = make_backend(tiny_artifact_trt, "ort")(x, t)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rms(out, ref) < 0.5 * float(ref.pow(2).mean().sqrt())


@pytest.mark.skipif(HAS_TRT and HAS_GPU, reason="TensorRT and a GPU are present: the GPU tests cover these paths")
def test_gpu_backends_say_what_is_missing(tiny_artifact_trt, tiny_artifact_ort, capsys):
    import onnxruntime as ort

    with pytest.raises(DenoqError, match=r"no engine\.plan; run denoq build"):
        make_backend(tiny_artifact_trt, "trt")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(DenoqError, match=r"no CUDAExecutionProvider.*denoq\[gpu\]"):
            make_backend(tiny_artifact_trt, "ort-cuda")
        with pytest.raises(DenoqError, match=r"no TensorrtExecutionProvider.*denoq\[gpu\]"):
            make_backend(tiny_artifact_trt, "ort-trt")
    with pytest.raises(DenoqError, match="compiled for target ort-cpu, not trt"):
        build(tiny_artifact_ort.path)
    assert main(["build", str(tiny_artifact_trt.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and ("tensorrt" in err or "GPU" in err) and err.count("\n") == 1
    assert not (tiny_artifact_trt.path / ENGINE_FILE).exists()


def test_validate_compares_the_backends_it_has(tiny_pipeline, tmp_path, capsys, monkeypatch):
    from denoq.compiler.pipeline import compile_model
    from denoq.compiler.recipe import load_recipe
    from denoq.engines import compare

    recipe = load_recipe("w8a8", ["calib.samples=4", "calib.steps=4"])
    art = compile_model(str(tiny_pipeline), recipe, tmp_path / "a")
    assert main(["validate", str(art.path), "--n", "4", "--steps", "4"]) == 0
    art = Artifact.open(art.path)
    report = json.loads(art.file("validate.json").read_text())
    assert report["passed"] and art.manifest["validate"]["passed"]
    assert set(report["tensors"]) == {"ort-fp16", "reference"}
    assert max(report["tensors"]["ort-fp16"]["diff_over_quant_error"]) <= 2 ** 0.5
    assert max(report["tensors"]["ort-fp16"]["error_over_quant_error"]) <= 1.25
    assert "trt" in report["skipped"] and "ort-fp16" in report["images"]
    assert art.file("validate.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "ort-fp16" in out and "skipped" in out
    monkeypatch.setattr(compare, "DIFF_LIMIT", 0.0)  # a limit nothing meets: the command must fail
    assert main(["validate", str(art.path), "--n", "4", "--steps", "4"]) == 2
    assert "validation failed" in capsys.readouterr().err
    assert not json.loads(Artifact.open(art.path).file("validate.json").read_text())["passed"]


# -- on a GPU with TensorRT ----------------------------------------------------------------------------------------

@NEEDS_TRT
def test_build_and_sample_through_tensorrt(tiny_artifact_trt, tmp_path):
    import shutil

    path = tmp_path / "art"
    shutil.copytree(tiny_artifact_trt.path, path)
    art = build(path, "batch=1:4:8")
    info = art.manifest["engine"]
    assert info["onnx"] == TRT_GRAPH and info["onnx_sha256"] == art.files[TRT_GRAPH]
    assert (path.parent / "art.timing.cache").is_file()
    x, t = _inputs()
    trt_out = make_backend(art, "trt")(x.cuda(), t.cuda()).cpu()
    ref = make_backend(art, "ort")(x, t)
    fp = make_backend(art, "ort-fp")(x, t)
    assert _rms(trt_out, ref) <= 2 ** 0.5 * _rms(ref, fp)  # validate's per-tensor tolerances
    assert _rms(trt_out, fp) <= 1.25 * _rms(ref, fp)
    again = make_backend(art, "trt")
    first = again(x.cuda(), t.cuda()).clone()
    assert torch.equal(again(x.cuda(), t.cuda()), first)  # the CUDA graph replays the same computation


@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU and onnxruntime-gpu")
def test_ort_cuda_backend_matches_ort_cpu(tiny_artifact_trt):
    x, t = _inputs()
    out = make_backend(tiny_artifact_trt, "ort-cuda")(x, t)
    ref, fp = make_backend(tiny_artifact_trt, "ort")(x, t), make_backend(tiny_artifact_trt, "ort-fp")(x, t)
    assert _rms(out, ref) <= 2 ** 0.5 * _rms(ref, fp) and _rms(out, fp) <= 1.25 * _rms(ref, fp)
