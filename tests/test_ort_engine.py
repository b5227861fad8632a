"""The ONNX Runtime engine: session options, providers, the eps backend, the fusion report, latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _qdq_models import conv_stack, dyadic_plan, make_plan, run_torch, tiny
from onnx import TensorProto, helper

from denoq.engines import ort as eng
from denoq.engines.ort_report import fusion_report, latency
from denoq.errors import DenoqError
from denoq.passes import InsertQDQ


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def toy_graph(cond: str | None = None) -> onnx.ModelProto:
    """out_sample = 2·sample + timestep [+ mean(encoder_hidden_states) | + class_labels], batch dimension `B`."""
    nodes = [helper.make_node("Cast", ["timestep"], ["tf"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["tf", "shape"], ["t4"]),
             helper.make_node("Mul", ["sample", "two"], ["s2"]),
             helper.make_node("Add", ["s2", "t4"], ["out" if cond else "out_sample"])]
    inputs = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", 2, 3, 3]),
              helper.make_tensor_value_info("timestep", TensorProto.INT64, ["B"])]
    if cond == "encoder_hidden_states":
        inputs.append(helper.make_tensor_value_info(cond, TensorProto.FLOAT, ["B", 4, 5]))
        nodes += [helper.make_node("ReduceMean", [cond, "axes"], ["c"], keepdims=1),
                  helper.make_node("Unsqueeze", ["c", "axis3"], ["c4"])]
    elif cond == "class_labels":
        inputs.append(helper.make_tensor_value_info(cond, TensorProto.INT64, ["B"]))
        nodes += [helper.make_node("Cast", [cond], ["cf"], to=TensorProto.FLOAT),
                  helper.make_node("Reshape", ["cf", "shape"], ["c4"])]
    if cond:
        nodes.append(helper.make_node("Add", ["out", "c4"], ["out_sample"]))
    inits = [helper.make_tensor("shape", TensorProto.INT64, [4], [-1, 1, 1, 1]),
             helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
             helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
             helper.make_tensor("axis3", TensorProto.INT64, [1], [3])]
    graph = helper.make_graph(nodes, "toy", inputs,
                              [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["B", 2, 3, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


# -- options and providers ---------------------------------------------------------------------------------

def test_session_options() -> None:
    so = eng.session_options(threads=3)
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so = eng.session_options(threads=None, spinning=True, level="extended", optimized_model_path="/tmp/x.onnx")
    assert so.intra_op_num_threads == 0  # ORT's default
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert so.optimized_model_filepath == "/tmp/x.onnx"
    with pytest.raises(DenoqError, match="unknown ORT optimization level"):
        eng.session_options(level="max")


def test_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert eng.providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert eng.providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]


# -- the eps backend ---------------------------------------------------------------------------------------

def test_backend_feeds_and_broadcasts_timesteps(tmp_path: Path) -> None:
    backend = eng.OrtBackend(_save(toy_graph(), tmp_path / "toy.onnx"), threads=1)
    assert backend.providers == ["CPUExecutionProvider"] and backend.cond_inputs == []
    x = torch.randn(3, 2, 3, 3)
    out = backend(x, torch.tensor([1, 5, 9]))
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, 2 * x + torch.tensor([1.0, 5.0, 9.0]).view(-1, 1, 1, 1), rtol=0, atol=0)
    for scalar in (7, torch.tensor(7), torch.tensor([7]), torch.tensor(7.0)):
        feeds = backend.feeds(x, scalar)
        assert feeds["timestep"].dtype == np.int64 and feeds["timestep"].tolist() == [7, 7, 7]
        torch.testing.assert_close(backend(x, scalar), 2 * x + 7, rtol=0, atol=0)
    with pytest.raises(DenoqError, match="not integral and this graph takes int64 timesteps"):
        backend(x, torch.tensor(7.5))
    float_graph = toy_graph()
    float_graph.graph.input[1].type.tensor_type.elem_type = TensorProto.FLOAT
    float_graph.graph.node[0].attribute[0].i = TensorProto.FLOAT  # Cast float → float
    fractional = eng.OrtBackend(_save(float_graph, tmp_path / "float.onnx"), threads=1)
    torch.testing.assert_close(fractional(x, torch.tensor(7.5)), 2 * x + 7.5, rtol=0, atol=0)
    with pytest.raises(DenoqError, match="2 values for a batch of 3"):
        backend(x, torch.tensor([1, 2]))
    with pytest.raises(DenoqError, match="unconditional"):
        backend(x, 7, cond=torch.zeros(3, 4, 5))


@pytest.mark.parametrize("cond", ["encoder_hidden_states", "class_labels"])
def test_backend_conditioning(tmp_path: Path, cond: str) -> None:
    backend = eng.OrtBackend(_save(toy_graph(cond), tmp_path / "toy.onnx"), threads=1)
    assert backend.cond_inputs == [cond]
    x = torch.randn(2, 2, 3, 3)
    c = torch.randn(2, 4, 5) if cond == "encoder_hidden_states" else torch.tensor([3, 8])
    extra = c.mean((1, 2)) if cond == "encoder_hidden_states" else c.float()
    torch.testing.assert_close(backend(x, 4, c), 2 * x + 4 + extra.view(-1, 1, 1, 1), rtol=1e-6, atol=1e-6)
    with pytest.raises(DenoqError, match=f"conditional \\(graph inputs {cond}\\) but no cond"):
        backend(x, 4)


def test_backend_errors(tmp_path: Path) -> None:
    with pytest.raises(DenoqError, match="does not exist"):
        eng.OrtBackend(tmp_path / "missing.onnx")
    model = toy_graph()
    model.graph.input[1].name = "t"
    model.graph.node[0].input[0] = "t"
    with pytest.raises(DenoqError, match="no graph input 'timestep'"):
        eng.OrtBackend(_save(model, tmp_path / "bad.onnx"))


@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_backend_runs_the_quantized_graph_like_the_simulation(tmp_path: Path, target: str) -> None:
    module, fp = tiny()
    plan = dyadic_plan(module, target)
    backend = eng.OrtBackend(_save(InsertQDQ(plan)(fp), tmp_path / "q.onnx"), threads=1)
    x = torch.randint(-40, 41, (2, 2, 4, 4)).float() * 2.0**-4
    out = backend(x, torch.tensor([3, 7]))
    np.testing.assert_array_equal(out.numpy(), run_torch(module, plan, x, torch.tensor([3, 7]))[0])


def test_int8_matmul_add_workaround(tmp_path: Path) -> None:
    """ORT 1.31 cannot load a trt-profile graph with 3-D MatMul + Add unless MatMulAddFusion is off."""
    module, fp = tiny()
    trt, cpu = (InsertQDQ(dyadic_plan(module, t))(fp) for t in ("trt", "ort-cpu"))
    assert eng.disabled_optimizers(trt) == ["MatMulAddFusion"]
    assert eng.disabled_optimizers(cpu) == [] and eng.disabled_optimizers(fp) == []
    path = _save(trt, tmp_path / "trt.onnx")
    eng.create_session(path, threads=1)  # loads, with the workaround
    try:
        ort.InferenceSession(str(path), eng.session_options(1), providers=["CPUExecutionProvider"])
    except Exception as exc:  # the bug the workaround is for
        assert "does not match y_zero_point type" in str(exc)
    else:
        pytest.skip(f"onnxruntime {ort.__version__} loads it without the workaround: it can go")


# -- fusion ------------------------------------------------------------------------------------------------

def test_fusion_report_ort_cpu_convs_all_fuse(tmp_path: Path) -> None:
    module, fp = conv_stack()
    x = torch.randn(1, 3, 8, 8)
    report = fusion_report(_save(InsertQDQ(make_plan(module, (x, torch.zeros(1)), "ort-cpu"))(fp),
                                     tmp_path / "q.onnx"))
    assert report["layers"] == 3
    assert report["integer_ops"] == {"QLinearConv": 3} and report["float_ops"] == {}
    assert report["fraction_fused"] == 1.0
    assert report["by_layer"] == {"conv1": "QLinearConv", "conv2": "QLinearConv", "conv3": "QLinearConv"}


def test_fusion_report_trt_profile_on_ort_cpu(tmp_path: Path) -> None:
    """Inputs-only Q/DQ: ORT's CPU EP fuses a Conv only when its output goes straight into a QuantizeLinear,
    here conv3's input quantizer after conv2; conv1 (→ SiLU) and conv3 (→ graph output) stay float Conv."""
    module, fp = conv_stack()
    x = torch.randn(1, 3, 8, 8)
    report = fusion_report(_save(InsertQDQ(make_plan(module, (x, torch.zeros(1)), "trt"))(fp),
                                     tmp_path / "q.onnx"))
    assert report["by_layer"] == {"conv1": "Conv", "conv2": "QLinearConv", "conv3": "Conv"}
    assert report["integer_ops"] == {"QLinearConv": 1} and report["float_ops"] == {"Conv": 2}
    assert report["fraction_fused"] == pytest.approx(1 / 3)


def test_fusion_report_attention_and_gemm(tmp_path: Path) -> None:
    """What ORT 1.31 makes of Tiny (3 convs, MatMul projections with and without bias, a Gemm head)."""
    module, fp = tiny()
    cpu = fusion_report(_save(InsertQDQ(dyadic_plan(module, "ort-cpu"))(fp), tmp_path / "cpu.onnx"))
    assert cpu["fraction_fused"] == 1.0 and cpu["float_ops"] == {}
    assert cpu["by_layer"] == {"attn.to_k": "QLinearMatMul",  # MatMul → Q
                               "attn.to_q": "QGemm", "attn.to_v": "QGemm",  # MatMul + bias Add → Q (3-D, reshaped)
                               "conv_in": "QLinearConv", "conv_mid": "QLinearConv", "conv_out": "QLinearConv",
                               "head": "QGemm"}
    trt = fusion_report(_save(InsertQDQ(dyadic_plan(module, "trt"))(fp), tmp_path / "trt.onnx"))
    # no layer output goes straight into a Q, and int8 MatMuls reading a shared, propagated Q/DQ stay float
    assert trt["layers"] == 7 and trt["fused"] == 0 and trt["fraction_fused"] == 0.0
    assert trt["float_ops"] == {"Conv": 3, "Gemm": 1, "MatMul": 3}


# -- latency -----------------------------------------------------------------------------------------------

def test_latency(tmp_path: Path) -> None:
    backend = eng.OrtBackend(_save(toy_graph(), tmp_path / "toy.onnx"), threads=1)
    feeds = backend.feeds(torch.randn(2, 2, 3, 3), 5)
    for timed in (latency(backend, feeds, warmup=1, iters=5),
                  latency(backend.session, feeds, warmup=0, iters=3),
                  latency(backend, (torch.randn(2, 2, 3, 3), 5), warmup=1, iters=3)):
        assert 0 < timed["min_ms"] <= timed["median_ms"] <= timed["p90_ms"]
        assert {"mean_ms", "stdev_ms", "iters"} <= set(timed)
    with pytest.raises(DenoqError, match="iters"):
        latency(backend, feeds, iters=0)
