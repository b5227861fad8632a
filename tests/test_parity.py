"""Three-executor parity (docs/architecture.md, Quantizer semantics): PyTorch simulation vs ONNX Runtime vs
onnx.reference.

Layer by layer the three agree to float rounding: each layer of the compiled Q/DQ graph is cut out of the full
graph (from the activation its QuantizeLinear reads to the layer's output, or the output's DequantizeLinear for
ort-cpu) and fed the very tensor the simulated layer received. End to end they cannot agree bit-exactly, so the
bound is relative to the quantization error itself, and at the sample level by PSNR between backends.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from denoq.calibrators.simulate import SimulatedLayer, simulate
from denoq.compiler.backends import artifact_model, artifact_plan, make_backend
from denoq.compiler.generate import generate
from denoq.engines.ort import OrtBackend, session_options
from denoq.engines.ort_report import fusion_report
from denoq.metrics import psnr

# Float32 convolutions accumulate in different orders in torch, ORT and numpy: relative error ~ sqrt(K)·2^-24 for
# K-term sums (K ≤ 600 here) ≈ 1.5e-6. One quantization step of the output Q/DQ (ort-cpu) is 1/255 of its range
# and may flip when the pre-rounding values differ by that float noise at a tie: allowed, at most rarely.
LAYER_RTOL = 1e-5


def _layer_io(art):
    spec = artifact_model(art)
    sim = simulate(spec.module, artifact_plan(art))
    ins, outs = {}, {}

    def hook(mod, args, out):
        ins[mod.plan.name], outs[mod.plan.name] = args[0].detach(), out.detach()

    handles = [m.register_forward_hook(hook) for m in sim.modules() if isinstance(m, SimulatedLayer)]
    g = torch.Generator().manual_seed(1)
    x = torch.randn((4, *spec.sample_shape), generator=g)
    sim(x, torch.tensor([5, 300, 600, 999]))  # mixed timesteps in one batch
    for h in handles:
        h.remove()
    return sim, ins, outs


def _layer_subgraph(model: onnx.ModelProto, node_name: str, out_quantized: bool) -> tuple[onnx.ModelProto, str]:
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    dq = producer[node.input[0]]
    q = producer[dq.input[0]]
    assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")
    out = node.output[0]
    if out_quantized:  # the layer's own output Q → DQ (ort-cpu)
        oq = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == out)
        dq_out = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == oq.output[0])
        out = dq_out.output[0]
    return onnx.utils.Extractor(model).extract_model([q.input[0]], [out]), q.input[0]


@pytest.mark.parametrize("fixture", ["tiny_artifact_trt", "tiny_artifact_ort"])
def test_every_layer_agrees_across_three_executors(fixture, request):
    art = request.getfixturevalue(fixture)
    sim, ins, outs = _layer_io(art)
    model = onnx.load(str(art.file("model.qdq.onnx")))
    layer_map = art.manifest["layer_map"]
    plan = artifact_plan(art)
    assert set(plan.layers) == set(outs) and set(plan.layers) <= set(layer_map)
    assert {"conv_in", "conv_out"}.isdisjoint(plan.layers)  # the recipe's default layers.keep_fp
    flips = 0
    for name in sorted(plan.layers):
        entry = layer_map[name]
        out_quantized = plan.layers[name].output is not None
        sub, x_name = _layer_subgraph(model, entry["node"], out_quantized)
        x = ins[name].numpy()
        expected = outs[name].numpy()
        if entry["op_type"] == "MatMul":  # the graph adds a MatMul's bias in a separate node
            expected = expected - sim.get_submodule("model." + name).bias.detach().numpy()
        got_ort = ort.InferenceSession(sub.SerializeToString(), session_options(1),
                                       providers=["CPUExecutionProvider"]).run(None, {x_name: x})[0]
        got_ref = ReferenceEvaluator(sub).run(None, {x_name: x})[0]
        scale = float(np.abs(expected).max())
        for got in (got_ort, got_ref):
            err = np.abs(got - expected)
            if out_quantized:
                step = float(plan.layers[name].output.scale[0])
                assert err.max() <= step * 1.001 + LAYER_RTOL * scale, name
                flips += int((err > LAYER_RTOL * scale).sum())
            else:
                assert err.max() <= LAYER_RTOL * scale, (name, err.max() / scale)
    assert flips <= 1e-3 * sum(o.numel() for o in outs.values())


@pytest.mark.parametrize("fixture", ["tiny_artifact_trt", "tiny_artifact_ort", "tiny_artifact_trt_g4",
                                     "tiny_artifact_ort_g4"])
def test_end_to_end_difference_is_a_fraction_of_the_quantization_error(fixture, request):
    """Run op by op (ORT graph optimizations off), ORT differs from the simulation only by rounding flips that
    propagate; on the untrained tiny model, which amplifies them most, rms(ort − sim) < 0.6 · rms(sim − fp).

    With all optimizations ORT fuses ort-cpu layers into integer kernels (QLinearConv requantizes the int32
    accumulator with the combined scale s_x·s_w/s_y instead of dividing a float conv by s_y), which rounds
    differently at every output; the fused graph must then be no farther from FP than the simulation is.
    """
    quant_error, op_by_op, fused = end_to_end_rms(request.getfixturevalue(fixture))
    assert quant_error > 0
    assert op_by_op < 0.6 * quant_error
    assert fused < 1.15 * quant_error


def end_to_end_rms(art) -> tuple[float, float, float]:
    """On 16 random inputs with random timesteps: rms(sim − fp), rms(ORT op by op − sim), rms(ORT fused − fp)."""
    spec = artifact_model(art)
    g = torch.Generator().manual_seed(2)
    x = torch.randn((16, *spec.sample_shape), generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    fp = make_backend(art, "torch-fp", spec=spec)(x, t)
    sim = make_backend(art, "torch-sim", spec=spec)(x, t)
    op_by_op = OrtBackend(art.file("model.qdq.onnx"), threads=1, level="disable")(x, t)
    fused = OrtBackend(art.file("model.qdq.onnx"), threads=1, level="all")(x, t)

    def rms(v):
        return float(v.pow(2).mean().sqrt())

    return rms(sim - fp), rms(op_by_op - sim), rms(fused - fp)


def test_backends_final_samples_agree(tiny_artifact_trt):
    """Sample level: torch-sim and ORT from the same noise end much closer to each other than to FP: their MSE
    is under a quarter of the quantization error's (6 dB), even on the untrained model where flips grow most."""
    kw = dict(sampler="ddim", steps=10, eta=0.0, seed=3, n=16)
    fp = generate(tiny_artifact_trt, "torch-fp", **kw)
    sim = generate(tiny_artifact_trt, "torch-sim", **kw)
    q = generate(tiny_artifact_trt, "ort", threads=1, **kw)
    assert psnr(q, sim) > psnr(q, fp) + 6.0


def test_ort_fuses_the_ort_cpu_profile_and_not_the_trt_one(tiny_artifact_ort, tiny_artifact_trt):
    """docs/architecture.md, Targets: ORT's CPU integer kernels fuse only when the layer's output is quantized too.
    Checked on ORT's own optimized graph, not assumed."""
    fused = fusion_report(tiny_artifact_ort.file("model.qdq.onnx"))
    assert fused["layers"] == len(tiny_artifact_ort.manifest["plan"]["layers"])
    assert fused["fraction_fused"] == 1.0
    assert fused["integer_ops"].get("QLinearConv", 0) > 0
    trt = fusion_report(tiny_artifact_trt.file("model.qdq.onnx"))
    assert trt["integer_ops"].get("QLinearConv", 0) == 0 and trt["fraction_fused"] < 0.5


@pytest.mark.parametrize("fixture", ["tiny_artifact_trt_g4", "tiny_artifact_ort_g4"])
def test_timestep_groups_compile_to_selectors(fixture, request):
    """G = 4: the plan's input tables are piecewise constant with up to 4 scales, the manifest records each layer's
    groups, the graph gathers per-sample ratios at the `timestep` rows (constant Q/DQ scales), and ORT still fuses the
    ort-cpu graph."""
    art = request.getfixturevalue(fixture)
    plan = artifact_plan(art)
    groups = art.manifest["calibration"]["timestep_groups"]
    assert groups, "no layer got more than one group"
    for name, segments in groups.items():
        assert len(segments) == 4
        assert len(set(plan.layers[name].input.scale.tolist())) > 1
    model = onnx.load(str(art.file("model.qdq.onnx")))
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and "timestep.rows" in n.input]  # its rows
    assert len(gathers) >= 1
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            assert node.input[1] in {i.name for i in model.graph.initializer}  # constant scales only
    if plan.target == "ort-cpu":
        assert fusion_report(art.file("model.qdq.onnx"))["fraction_fused"] == 1.0
