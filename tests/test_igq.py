"""IGQ-ViT instance-aware group quantization (`activations.igq_groups`): the assignment, the calibrated groups,
the dynamic grouping as ONNX ops against the PyTorch simulation and `onnx.reference`, the token-wise softmax
groups, the BOP-budget allocation, and bad input (a layer with fewer channels than groups, a budget below the
all-fewest-groups cost)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from _qdq_models import make_plan, run_ort, run_reference, single
from conftest import compile_refused, save_dit_pipeline, tiny_dit

from denoq.bops import FLOAT_BITS, group_bops
from denoq.calibrators.igq import allocate_groups, assign, fake_quant_groups, fit_groups
from denoq.calibrators.quantizer import fake_quantize
from denoq.compiler.artifact import Artifact
from denoq.compiler.backends import artifact_plan
from denoq.compiler.cli import main
from denoq.errors import DenoqError
from denoq.passes.qdq import InsertQDQ
from denoq.plan import GroupQuant, QuantPlan

FAST = ["--set", "calib.samples=4", "--set", "calib.steps=5", "--quiet"]


def outlier_tokens(n: int, seed: int, length: int = 5, channels: int = 16) -> torch.Tensor:
    """[n, L, C] activations whose large channels change from instance to instance (ViT-like)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, length, channels), generator=g) * 0.1
    for b in range(n):
        big = torch.randperm(channels, generator=g)[:3]
        x[b, :, big] *= 40.0 * (1 + b % 3)
    return x


def test_assignment_is_the_nearest_range_first_on_ties():
    gq = GroupQuant(bits=8, signed=False, lo=torch.tensor([-1.0, -4.0, -1.0]), hi=torch.tensor([1.0, 4.0, 1.0]),
                    width=torch.tensor([2.0, 8.0, 2.0]), scale=torch.ones(3), zero_point=torch.zeros(3))
    m, big_m = torch.tensor([[-0.9, -3.0, -2.5, 0.0]]), torch.tensor([[1.2, 5.0, 1.5, 0.0]])
    # widths 2.1, 8, 4 (ratio 2 to both 2 and 8: the first wins), 0 (every ratio infinite: the first)
    assert assign(m, big_m, gq).tolist() == [[0, 1, 0, 0]]
    sym = dataclasses.replace(gq, signed=True, width=torch.tensor([1.0, 4.0, 2.0]))
    assert assign(m, big_m, sym).tolist() == [[0, 1, 2, 0]]  # symmetric: by max(|m|, |M|) alone
    far = dataclasses.replace(sym, width=torch.tensor([0.6, 36.0]))
    assert assign(torch.tensor([[0.0]]), torch.tensor([[12.0]]), far).tolist() == [[1]]  # log scale: 36, not 0.6


def test_groups_cover_their_calibration_members_and_need_enough_channels():
    x = outlier_tokens(32, 0)
    m, big_m = x.amin(1), x.amax(1)
    gq = fit_groups(m, big_m, 4, 8, False, "layer")
    g = assign(m, big_m, gq)
    assert bool((gq.lo[g] <= m + 1e-6).all() and (gq.hi[g] >= big_m - 1e-6).all())
    assert len(set(g.reshape(-1).tolist())) == 4
    with pytest.raises(DenoqError, match="layer narrow: 3 channel\\(s\\) cannot form 4 groups"):
        fit_groups(m[:, :3], big_m[:, :3], 4, 8, False, "narrow")


@pytest.mark.parametrize("bits", [8, 4])
def test_instance_aware_groups_beat_one_scale_on_moving_outliers(bits):
    calib, test = outlier_tokens(64, 0), outlier_tokens(16, 1)
    quiet = (test.abs().amax(1, keepdim=True) < 1).expand_as(test)  # this instance's ordinary channels
    err, quiet_err = {}, {}
    for groups in (1, 4):
        gq = fit_groups(calib.amin(1), calib.amax(1), groups, bits, True)
        sq = (fake_quant_groups(test, gq) - test).pow(2)
        err[groups], quiet_err[groups] = float(sq.mean()), float(sq[quiet].mean())
    assert quiet_err[4] < 0.05 * quiet_err[1]  # ordinary channels no longer share the outliers' scale
    assert err[4] <= 1.01 * err[1]


@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_dynamic_groups_graph_matches_simulation_and_reference(target):
    module, fp = single("matmul")
    x = outlier_tokens(2, 2)  # the exported single layer takes [2, 5, 16]
    base = make_plan(module, (x,), target, perturb=False)
    lp = base.layers["layer"]
    gq = fit_groups(x.amin(1), x.amax(1), 4, 8, target == "trt", "layer")
    plan = QuantPlan(base.num_train_timesteps, target)
    plan.add(dataclasses.replace(lp, input_groups=gq, output=None))
    graph = InsertQDQ(plan)(fp)
    assert {"ArgMin", "ReduceMin", "ReduceMax", "Round"} <= {n.op_type for n in graph.graph.node}
    with torch.no_grad():
        want = torch.nn.functional.linear(fake_quant_groups(x, gq), lp.dequantized_weight(), module.layer.bias)
    feeds = {"sample": x.numpy()}
    # the weight-only MatMul fuses into MatMulNBits: float compute as the engine's sessions configure it
    ort_out = run_ort(graph, feeds, config={"session.qdq_matmulnbits_accuracy_level": "1"})[0]
    np.testing.assert_allclose(ort_out, want.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_reference(graph, feeds)[0], want.numpy(), rtol=1e-5, atol=1e-5)
    one = fit_groups(x.amin(1), x.amax(1), 1, 8, target == "trt")
    qmin, qmax = one.qrange
    torch.testing.assert_close(fake_quant_groups(x, one), fake_quantize(x, one.scale[0], one.zero_point[0], qmin,
                                                                        qmax))  # G = 1: one per-tensor quantizer


def test_allocation_spends_the_budget_where_error_falls_most():
    errors = {"a": {1: 10.0, 2: 4.0, 4: 3.5}, "b": {1: 10.0, 2: 9.0, 4: 8.0}}
    bops = {"a": {1: 100, 2: 110, 4: 130}, "b": {1: 100, 2: 110, 4: 130}}
    assert allocate_groups(errors, bops, 200) == {"a": 1, "b": 1}
    assert allocate_groups(errors, bops, 210) == {"a": 2, "b": 1}  # 6.0 per 10 BOPs beats 1.0
    assert allocate_groups(errors, bops, 260) == {"a": 4, "b": 4}
    with pytest.raises(DenoqError, match="below the cost of the fewest groups everywhere"):
        allocate_groups(errors, bops, 150)
    assert group_bops(1000, 10, 8, 8, 3) == 1000 * 64 + 2 * 10 * FLOAT_BITS**2


@pytest.fixture(scope="module")
def dit_pipeline(tmp_path_factory):
    return save_dit_pipeline(tiny_dit(), tmp_path_factory.mktemp("models") / "tiny-dit")


def test_dit_with_dynamic_groups_and_softmax_row_groups(dit_pipeline, tmp_path):
    out = tmp_path / "igq"
    assert main(["compile", str(dit_pipeline), "--out", str(out), *FAST, "--set", "target=ort-cpu", "--set",
                 "activations.igq_groups=4", "--set", "attention.quantize=true"]) == 0
    art = Artifact.open(out)
    plan = artifact_plan(art)  # the groups round-trip through plan.safetensors
    token_layers = [n for n in plan.layers if ".attn1.to_" in n or ".ff." in n]
    assert token_layers and all(plan.layers[n].input_groups.groups == 4 for n in token_layers)
    assert all(ap.p_groups is not None and ap.p_groups.groups == 4 for ap in plan.attention.values())
    assert art.manifest["checks"]["qdq_ort_vs_sim_over_quant_error"] < 0.5
    assert art.manifest["cost"]["bops_per_call"] > 0
    graph = onnx.load(str(art.file("model.qdq.onnx")))
    assert sum(n.op_type == "ArgMin" for n in graph.graph.node) == len(token_layers) + len(plan.attention)


def test_budget_allocation_in_compile(dit_pipeline, tmp_path):
    out = tmp_path / "budget"
    assert main(["compile", str(dit_pipeline), "--out", str(out), *FAST, "--set", "activations.igq_groups=4",
                 "--set", "activations.igq_budget=1.02"]) == 0
    igq = Artifact.open(out).manifest["calibration"]["igq"]
    assert igq["bops_chosen"] <= 1.02 * igq["bops_one_group"]
    assert set(igq["layers"].values()) <= {1, 2, 4}


@pytest.mark.parametrize("sets,message", [
    (["activations.igq_groups=64"], "cannot form 64 groups"),
    (["activations.igq_groups=4", "activations.igq_budget=0.5"], "below the cost of the fewest groups"),
    (["activations.igq_groups=4", "activations.timestep_groups=2"], "activations.timestep_groups=1"),
])
def test_bad_igq_settings_are_refused(dit_pipeline, tmp_path, capsys, sets, message):
    assert message in compile_refused(capsys, dit_pipeline, tmp_path / "a", *FAST, sets=sets)


def test_static_groups_give_each_channel_its_group_step():
    from denoq.calibrators.igq import InstanceRanges, static_factors

    g = torch.Generator().manual_seed(3)
    fixed = torch.randn((32, 5, 16), generator=g) * torch.logspace(-1, 1, 16)  # outliers always in the same channels
    factors, gq = static_factors(InstanceRanges(fixed.amin(1), fixed.amax(1)), 4, 8, "layer")
    assert bool((factors >= 1).all()) and len(set(factors.tolist())) > 1
    steps = float(gq.scale.max()) / factors  # the step each channel is quantized with after the Mul
    assert np.isclose(steps.numpy()[:, None], gq.scale.numpy()[None, :], rtol=1e-6).any(axis=1).all()
    qmin, qmax = gq.qrange

    def mse(x: torch.Tensor, f: torch.Tensor) -> float:
        return float((fake_quantize(x * f, gq.scale.max(), 0, qmin, qmax) / f - x).pow(2).mean())

    assert mse(fixed, factors) < 0.5 * mse(fixed, torch.ones(16))  # fixed outliers: static groups help
    moving = outlier_tokens(32, 3)  # outliers that move between instances: static groups cannot follow them
    factors, gq = static_factors(InstanceRanges(moving.amin(1), moving.amax(1)), 4, 8, "layer")
    dynamic = fit_groups(moving.amin(1), moving.amax(1), 4, 8, True)
    assert float((fake_quant_groups(moving, dynamic) - moving).pow(2).mean()) < mse(moving, factors)


def test_static_groups_compile_for_tensorrt(dit_pipeline, tmp_path):
    out = tmp_path / "static"
    assert main(["compile", str(dit_pipeline), "--out", str(out), *FAST, "--set", "activations.igq_groups=4",
                 "--set", "activations.igq_mode=static"]) == 0
    art = Artifact.open(out)
    assert art.manifest["trt_rules"]["count"] == 0  # one Mul and per-tensor Q/DQ: TensorRT takes it
    assert art.manifest["checks"]["qdq_ort_vs_sim_over_quant_error"] < 0.5
    plan = artifact_plan(art)
    static = [lp for lp in plan.layers.values() if lp.input_factors is not None]
    assert static and all(bool((lp.input_factors >= 1).all()) and lp.input.is_constant for lp in static)
    graph = onnx.load(str(art.file("model.qdq.onnx")))
    producer = {o: n for n in graph.graph.node for o in n.output}
    q = next(n for n in graph.graph.node if n.name == f"{static[0].name}/input/QuantizeLinear")
    assert producer[q.input[0]].name == f"{static[0].name}/input_factors/Mul"
    assert not any(n.op_type == "ArgMin" for n in graph.graph.node)


@pytest.mark.parametrize("sets,message", [
    (["target=ort-cpu"], "it is for target=trt"),
    (["activations.igq_budget=1.1"], "static groups cost nothing at run time"),
])
def test_static_groups_refuse_what_they_cannot_do(dit_pipeline, tmp_path, capsys, sets, message):
    static = ("activations.igq_groups=4", "activations.igq_mode=static", *sets)
    assert message in compile_refused(capsys, dit_pipeline, tmp_path / "a", *FAST, sets=static)
