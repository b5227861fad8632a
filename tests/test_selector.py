"""Timestep selectors (docs/architecture.md, Timestep selector; ADP-DM, arXiv 2305.18723): graph pattern and
three-executor parity of the simulation (`SimulatedLayer`), ONNX Runtime (unoptimized and fused) and `onnx.reference`.

Plans have 1–4 timestep groups over T = 1000 (boundaries 250 / 500 / 750). With power-of-two group factors on the
dyadic plan every executor computes every value exactly (r_t is a power of two), so all must agree bit for bit per
group and on a batch mixing groups; on random data with non-dyadic factors a float output (trt) agrees to float
rounding and a quantized output (ort-cpu) within one effective output step (s_out0 / r_t).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
from _qdq_models import (
    SINGLE_SHAPES,
    dyadic_plan,
    grouped,
    make_plan,
    run_ort,
    run_reference,
    single,
    single_t,
    tiny,
)

from denoq.calibrators.simulate import SimulatedLayer, TimestepClock, simulate
from denoq.engines.ort_report import fusion_report
from denoq.errors import DenoqError
from denoq.passes import InsertQDQ, PassManager
from denoq.plan import ActQuant, selector_tables

KINDS = ("conv", "gemm", "matmul")
TARGETS = ("trt", "ort-cpu")
T = 1000
GROUP_T = (100, 300, 600, 900)  # one timestep in each of four groups


def _sim(module: torch.nn.Module, plan, *args: torch.Tensor) -> list[np.ndarray]:
    """The simulation of `module` (a plain nn.Module, not a diffusers model) with per-sample timesteps args[-1]."""
    sim = copy.deepcopy(module).eval()
    clock = TimestepClock()
    for name, lp in plan.layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = sim.get_submodule(parent_name) if parent_name else sim
        setattr(parent, child, SimulatedLayer(sim.get_submodule(name), lp, clock, plan.num_train_timesteps))
    clock.t = args[-1]
    with torch.no_grad():
        out = sim(*args)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _executors(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    return {"reference": run_reference(model, feeds), "ort-disable": run_ort(model, feeds, "disable"),
            "ort-all": run_ort(model, feeds, "all")}


def _timesteps(batch: int) -> list[torch.Tensor]:
    """One batch per group, then a batch mixing groups sample by sample."""
    per_group = [torch.full((batch,), t, dtype=torch.int64) for t in GROUP_T]
    mixed = torch.tensor([GROUP_T[(i * 3 + 1) % 4] for i in range(batch)], dtype=torch.int64)
    assert len(set(mixed.tolist())) > 1
    return [*per_group, mixed]


# -- parity ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_dyadic_exact_per_group_and_mixed_batch(kind: str, target: str) -> None:
    module, fp = single_t(kind)
    factors = [1.0, 0.5, 2.0, 0.25]  # r_t = 0.25 / f: powers of two, every value exact in every executor
    plan = grouped(dyadic_plan(module, target), T, factors, factors)
    model = InsertQDQ(plan)(fp)
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-60, 61, SINGLE_SHAPES[kind], generator=gen).float() * 2.0**-4
    outs = []
    for t in _timesteps(x.shape[0]):
        (want,) = _sim(module, plan, x, t)
        outs.append(want)
        for name, (got,) in _executors(model, {"sample": x.numpy(), "timestep": t.numpy()}).items():
            np.testing.assert_array_equal(got, want, err_msg=f"{name} vs torch ({kind}, {target}, t={t.tolist()})")
    assert not np.array_equal(outs[0], outs[1]), "the groups must quantize differently"


def _effective_step(plan, t: torch.Tensor, ndim: int) -> np.ndarray:
    tables = selector_tables("layer", plan.layers["layer"].input, plan.layers["layer"].output, T)
    step = tables.output_scale / tables.ratio.numpy()[t.numpy()]
    return step.reshape(-1, *([1] * (ndim - 1)))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_random_data_parity_per_group_and_mixed_batch(kind: str, target: str) -> None:
    module, fp = single_t(kind)
    gen = torch.Generator().manual_seed(6)
    x = 2 * torch.randn(SINGLE_SHAPES[kind], generator=gen)
    base = make_plan(module, (x, torch.zeros(x.shape[0], dtype=torch.int64)), target)
    factors = [1.0, 0.6, 0.35, 0.8]  # non-dyadic r_t
    plan = grouped(base, T, factors, factors)
    model = PassManager([InsertQDQ(plan)], verify=True)(fp)[0]
    for t in _timesteps(x.shape[0]):
        (want,) = _sim(module, plan, x, t)
        results = _executors(model, {"sample": x.numpy(), "timestep": t.numpy()})
        for name, (got,) in results.items():
            if target == "trt":
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=name)
                continue
            step = _effective_step(plan, t, want.ndim)
            diff = np.abs(got - want)
            assert np.all(diff <= step * (1 + 1e-4) + 1e-6 * np.abs(want).max()), f"{name}: more than one step"
            assert (diff > 1e-5 * np.abs(want).max()).mean() < 0.03, f"{name}: too many one-step flips"


def test_selector_equals_the_plans_group_quantizer() -> None:
    """DQ(Q(x·r_t; s0))/r_t is the plan's group-t input quantizer: the trt selector layer's output equals
    conv(fake_quantize(x; s_t)) + b to float rounding, for every group."""
    from denoq.calibrators.quantizer import fake_quantize

    module, _ = single_t("conv")
    gen = torch.Generator().manual_seed(7)
    x = 2 * torch.randn(SINGLE_SHAPES["conv"], generator=gen)
    plan = grouped(make_plan(module, (x, torch.zeros(2, dtype=torch.int64)), "trt"), T, [1.0, 0.6, 0.35, 0.8])
    lp = plan.layers["layer"]
    for t in GROUP_T:
        (got,) = _sim(module, plan, x, torch.full((2,), t))
        s_t = lp.input.scale[t]
        xq = fake_quantize(x, s_t, 0, -128, 127)
        want = torch.nn.functional.conv2d(xq, lp.dequantized_weight(), module.layer.bias, padding=1)
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=0, atol=1e-5 * float(want.detach().abs().max()))


@pytest.mark.parametrize("target", TARGETS)
def test_whole_tiny_model_exact_with_groups(target: str) -> None:
    """Seven layers, shared to_q/to_k/to_v input, residuals, two graph outputs, a batch mixing groups."""
    module, fp = tiny()
    factors = [1.0, 2.0, 0.5, 4.0]
    plan = grouped(dyadic_plan(module, target), T, factors, factors)
    model = PassManager([InsertQDQ(plan)], verify=True)(fp)[0]
    assert [o.name for o in model.graph.output] == ["out_sample", "head"]
    x = torch.randint(-40, 41, (2, 2, 4, 4)).float() * 2.0**-4
    for t in (torch.tensor([100, 100]), torch.tensor([900, 400])):
        want = _sim(module, plan, x, t)
        for name, got in _executors(model, {"sample": x.numpy(), "timestep": t.numpy()}).items():
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w, err_msg=f"{name}, t={t.tolist()}")


# -- graph ---------------------------------------------------------------------------------------------------

def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def _consumers(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if tensor in n.input]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind,op,rank", [("conv", "Conv", 4), ("gemm", "Gemm", 2), ("matmul", "MatMul", 3)])
def test_graph_pattern(kind: str, op: str, rank: int, target: str) -> None:
    module, fp = single_t(kind)
    plan = grouped(dyadic_plan(module, target), T, [1.0, 0.5, 2.0, 0.25], [1.0, 0.5, 2.0, 0.25])
    model, _ = PassManager([InsertQDQ(plan)], verify=True)(fp)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    (layer,) = [n for n in model.graph.node if n.op_type == op]
    assert len(layer.input) == 2, "the layer runs without bias"
    dq = _producer(model, layer.input[0])
    q = _producer(model, dq.input[0])
    mul = _producer(model, q.input[0])
    assert (dq.op_type, q.op_type, mul.op_type) == ("DequantizeLinear", "QuantizeLinear", "Mul")
    assert mul.input[0] == "sample"
    gather = _producer(model, mul.input[1])
    assert gather.op_type == "Gather" and gather.input[1] == "timestep"
    r = inits[gather.input[0]]
    assert r.shape == (T,) + (1,) * (rank - 1) and r.dtype == np.float32
    assert r.max() == 1.0 and r.min() == 0.125  # s0 = min: r ≤ 1
    assert inits[q.input[1]] == np.float32(plan.layers["layer"].input.scale.min())
    after = _consumers(model, layer.output[0])
    if target == "ort-cpu":  # the output Q/DQ reads the layer node directly: ORT fuses DQ → node → Q
        assert [n.op_type for n in after] == ["QuantizeLinear"]
        after = _consumers(model, _consumers(model, after[0].output[0])[0].output[0])
    (div,) = after
    assert div.op_type == "Div" and div.input[1] == mul.input[1]  # the same R as the input's Mul
    (add,) = _consumers(model, div.output[0])
    assert add.op_type == "Add" and add.output[0] == "out_sample"
    bias = inits[add.input[1]]
    np.testing.assert_array_equal(bias.reshape(-1), module.layer.bias.detach().numpy())


@pytest.mark.parametrize("kind,op", [("conv", "QLinearConv"), ("gemm", "QGemm"), ("matmul", "QLinearMatMul")])
def test_ort_fuses_the_ort_cpu_selector_graph(kind: str, op: str, tmp_path) -> None:
    module, fp = single_t(kind)
    plan = grouped(dyadic_plan(module, "ort-cpu"), T, [1.0, 0.5, 2.0, 0.25], [1.0, 0.5, 2.0, 0.25])
    path = tmp_path / "model.qdq.onnx"
    onnx.save(InsertQDQ(plan)(fp), str(path))
    report = fusion_report(path)
    assert report["fraction_fused"] == 1.0 and report["integer_ops"].get(op, 0) == 1, report


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("which", [*KINDS, "tiny"])
def test_one_group_is_byte_identical_to_the_constant_graph(which: str, target: str) -> None:
    module, fp = tiny() if which == "tiny" else single_t(which)
    base = dyadic_plan(module, target)
    today = InsertQDQ(base)(fp).SerializeToString()
    one_group = grouped(base, T, [1.0], [1.0])
    graph = InsertQDQ(one_group)(fp)
    assert graph.SerializeToString() == today
    assert not [n.name for n in graph.graph.node if "timestep_ratio" in n.name or n.op_type in ("Gather", "Div")]


def test_simulation_and_graph_use_the_same_tables() -> None:
    module, _ = single_t("conv")
    x = torch.randn(SINGLE_SHAPES["conv"])
    plan = grouped(make_plan(module, (x, torch.zeros(2, dtype=torch.int64)), "ort-cpu"), T, [1.0, 0.6, 0.35, 0.8],
                   [0.9, 0.7, 0.3, 1.0])  # output not proportional to input: s_out0 = max(s_out·r)
    lp = plan.layers["layer"]
    tables = selector_tables("layer", lp.input, lp.output, T)
    layer = SimulatedLayer(module.layer, lp, TimestepClock(), T)
    np.testing.assert_array_equal(layer.ratio.numpy(), tables.ratio.numpy())
    assert layer.s0 == tables.input_scale and layer.s_out0 == tables.output_scale
    s_out, r = lp.output.scale.numpy(), tables.ratio.numpy()
    assert np.all(tables.output_scale / r >= s_out * (1 - 1e-6)), "the effective output scale never clips more"


# -- errors ------------------------------------------------------------------------------------------------

def _with_input(plan, q: ActQuant):
    plan.layers["layer"] = dataclasses.replace(plan.layers["layer"], input=q)  # bypasses QuantPlan.add's check
    return plan


@pytest.mark.parametrize("case,table,message", [
    ("length", torch.full((999,), 0.1), r"shape \(999,\), expected \(1000,\)"),
    ("zero", torch.cat([torch.full((500,), 0.1), torch.zeros(500)]), "finite and positive"),
    ("negative", torch.cat([torch.full((500,), 0.1), torch.full((500,), -0.1)]), "finite and positive"),
])
def test_bad_tables_are_clear_errors(case: str, table: torch.Tensor, message: str) -> None:
    module, fp = single_t("conv")
    plan = _with_input(grouped(dyadic_plan(module, "trt"), T, [1.0, 0.5]), ActQuant(8, True, 0, table))
    with pytest.raises(DenoqError, match=message) as info:
        InsertQDQ(plan)(fp)
    assert "\n" not in str(info.value) and ";" in str(info.value)
    with pytest.raises(DenoqError, match=message):
        SimulatedLayer(module.layer, plan.layers["layer"], TimestepClock(), T)


def test_grouped_plan_needs_the_timestep_input() -> None:
    module, fp = single("conv")  # no timestep input
    plan = grouped(dyadic_plan(module, "trt"), T, [1.0, 0.5])
    with pytest.raises(DenoqError, match="no 'timestep' input"):
        InsertQDQ(plan)(fp)


def test_simulated_model_builds_selector_layers() -> None:
    module, _ = single_t("conv")
    plan = grouped(dyadic_plan(module, "trt"), T, [1.0, 0.5])
    sim = simulate(module, plan)
    (layer,) = [m for m in sim.modules() if isinstance(m, SimulatedLayer)]
    assert layer.selected and layer.ratio is not None and layer.ratio.shape == (T,)
