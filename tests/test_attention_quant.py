"""Quantized attention matmuls (`attention.quantize`): the explicit attention against PyTorch's fused kernel, the
Q/DQ placement on both inputs of Q·Kᵀ and softmax·V, the simulation against ONNX Runtime on a DiT and a UNet,
the probabilities' non-negative range, the plan's round trip, and bad input."""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import compile_refused, save_dit_pipeline, tiny_dit

from denoq.calibrators.attention import attention_plans, explicit_attention, fake_quant_log2
from denoq.calibrators.observers import ObserverSettings, observe_qparams
from denoq.calibrators.stats import TensorStats
from denoq.compiler.artifact import Artifact
from denoq.compiler.backends import artifact_plan, make_backend
from denoq.compiler.cli import main
from denoq.layermap import read_attention_map

FAST = ["--set", "calib.samples=4", "--set", "calib.steps=5", "--set", "attention.quantize=true", "--quiet"]


@pytest.fixture(scope="module")
def dit_pipeline(tmp_path_factory):
    return save_dit_pipeline(tiny_dit(), tmp_path_factory.mktemp("models") / "tiny-dit")


@pytest.fixture(scope="module", params=["trt", "ort-cpu"])
def attn_artifact(request, dit_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / f"attn-{request.param}"
    assert main(["compile", str(dit_pipeline), "--out", str(out), *FAST, "--set", f"target={request.param}"]) == 0
    return Artifact.open(out)


def test_explicit_attention_is_scaled_dot_product_attention():
    q, k, v = torch.randn(3, 2, 3, 50, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    got = explicit_attention(q, k, v, lambda role, x: x)
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_both_attention_matmuls_read_dequantized_inputs(attn_artifact):
    graph = onnx.load(str(attn_artifact.file("model.qdq.onnx")))
    amap = read_attention_map(graph)
    assert sorted(amap) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    producer = {o: n for n in graph.graph.node for o in n.output}
    nodes = {n.name: n for n in graph.graph.node}
    for ref in amap.values():
        for matmul in (nodes[ref.qk], nodes[ref.pv]):
            assert [producer[i].op_type for i in matmul.input] == ["DequantizeLinear", "DequantizeLinear"]
        softmax_q = producer[nodes[ref.pv].input[0]]
        assert producer[producer[softmax_q.input[0]].input[0]].op_type == "Softmax"  # DQ(Q(softmax))


def test_attention_quantization_matches_the_simulation(attn_artifact):
    checks = attn_artifact.manifest["checks"]
    assert checks["qdq_ort_vs_sim_over_quant_error"] < 0.5
    if attn_artifact.manifest["recipe"]["values"]["target"] == "trt":
        assert attn_artifact.manifest["trt_rules"]["count"] == 0


def test_probabilities_use_their_non_negative_range(attn_artifact):
    plan = artifact_plan(attn_artifact)
    for ap in plan.attention.values():
        p = ap.quants["p"]
        assert p.zero_point == 0
        assert p.signed == (attn_artifact.manifest["recipe"]["values"]["target"] == "trt")
        _, qmax = p.qrange
        assert 1 / 64 <= float(p.scale[0]) * qmax <= 1.0 + 1e-6  # 64 tokens: max P ≥ 1/64; nothing above 1


def test_large_probabilities_are_never_clipped():
    stats = {role: TensorStats() for role in ("q", "k", "p", "v")}
    g = torch.Generator().manual_seed(0)
    for role, st in stats.items():
        x = torch.rand(4000, generator=g) * 0.02 if role == "p" else torch.randn(4000, generator=g)
        if role == "p":
            x[:3] = 0.9  # a few confident attention weights among many small ones
        st.observe(x, 500, g, role)
    observer = ObserverSettings(method="mse", bits=8, signed=False)
    (plan,) = attention_plans({"attn": stats}, observer, 1000)
    p = plan.quants["p"]
    assert p.zero_point == 0 and float(p.scale[0]) * 255 == pytest.approx(0.9, rel=1e-6)
    _, zp = observe_qparams(*stats["q"].pooled(), observer)
    assert plan.quants["q"].zero_point == zp  # the other roles follow the recipe's observer


def test_attention_quantization_changes_the_simulated_model(dit_pipeline, attn_artifact, tmp_path):
    plain = tmp_path / "plain"
    target = attn_artifact.manifest["recipe"]["values"]["target"]
    assert main(["compile", str(dit_pipeline), "--out", str(plain), *FAST[:-3], "--quiet", "--set",
                 f"target={target}"]) == 0
    x, t, c = torch.randn(2, 1, 16, 16), torch.tensor([10, 800]), torch.tensor([0, 2])
    with_attn = make_backend(attn_artifact, "torch-sim")(x, t, c)
    without = make_backend(Artifact.open(plain), "torch-sim")(x, t, c)
    assert float((with_attn - without).abs().max()) > 1e-5
    assert not artifact_plan(Artifact.open(plain)).attention


def test_unet_attention_quantizes_too(tiny_pipeline, tmp_path):
    out = tmp_path / "unet"
    assert main(["compile", str(tiny_pipeline), "--out", str(out), *FAST]) == 0
    art = Artifact.open(out)
    assert art.manifest["plan"]["attention"]  # 4-D inputs, group norm, residual: the UNet's attention path
    assert art.manifest["checks"]["qdq_ort_vs_sim_over_quant_error"] < 0.5


def test_attention_quantization_needs_quantized_activations(dit_pipeline, tmp_path, capsys):
    assert main(["compile", str(dit_pipeline), "--out", str(tmp_path / "a"), *FAST, "--set",
                 "activations.bits=16", "--set", "weights.bits=4"]) == 2
    assert "attention.quantize=true quantizes activations" in capsys.readouterr().err


def test_log2_grid_keeps_small_probabilities():
    p = torch.softmax(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    q = fake_quant_log2(p, 8)
    exponents = -torch.log2(q)
    assert torch.equal(exponents, exponents.round()) and bool((q <= 1).all())  # powers of two in (0, 1]
    assert float(((q - p).abs() / p).max()) < 0.42  # 2^±0.5 − 1: every probability within half an octave
    uniform = torch.round(p * 255) / 255
    assert bool((uniform[p < 1 / 510] == 0).all()) and bool((q[p < 1 / 510] > 0).all())
    assert float(fake_quant_log2(torch.zeros(1), 4)[0]) == 2.0**-15  # p = 0 → the grid's smallest level


def test_log2_grid_graph_matches_the_simulation(dit_pipeline, tmp_path):
    out = tmp_path / "log2"
    assert main(["compile", str(dit_pipeline), "--out", str(out), *FAST, "--set", "attention.softmax_grid=log2",
                 "--set", "target=ort-cpu"]) == 0
    art = Artifact.open(out)
    assert all(ap.p_log2 for ap in artifact_plan(art).attention.values())
    assert art.manifest["checks"]["qdq_ort_vs_sim_over_quant_error"] < 0.5
    graph = onnx.load(str(art.file("model.qdq.onnx")))
    assert sum(n.op_type == "Pow" for n in graph.graph.node) == 2  # one per attention module


@pytest.mark.parametrize("sets,message", [
    (["attention.quantize=false", "attention.softmax_grid=log2"], "add --set attention.quantize=true"),
    (["attention.softmax_grid=log2", "activations.igq_groups=2"], "choose one"),
])
def test_log2_grid_refusals(dit_pipeline, tmp_path, capsys, sets, message):
    assert message in compile_refused(capsys, dit_pipeline, tmp_path / "a", *FAST, sets=sets)
