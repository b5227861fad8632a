"""Q/DQ insertion and the pass manager (docs/architecture.md: Quantizer semantics, Passes, Targets).

Parity is checked layer by layer between three executors of the same quantized layer: the PyTorch reference
(quantizer.fake_quantize + LayerPlan.dequantized_weight, i.e. division, round half to even, saturation),
onnx.reference.ReferenceEvaluator, and ONNX Runtime, unoptimized (`disable`) and fully optimized (`all`: ORT
replaces the ort-cpu groups DQ → Conv/Gemm/MatMul → Q by integer kernels).

- Dyadic data (power-of-two scales, small integers; `_qdq_models.dyadic_plan`): every value every executor
  computes is exact in float32 whatever the summation order, so all four must agree *bit for bit*, while the
  data is full of exact rounding ties (inputs on half-steps, coarse weights putting outputs on half-steps) and
  saturates both quantizers. A half-away-from-zero rounding, a reciprocal multiply, a wrong axis, transpose or
  zero point cannot pass this.
- Random data with data-derived scales and perturbed (GPTQ-like) integer weights: a float output (trt) may
  differ by summation order only, ≤ 1e-5 of the output's magnitude (float32 ε ≈ 6e-8 times ~K = 36 terms,
  with margin), far below one quantization step (~1/127 of it). A quantized output (ort-cpu) may differ by
  exactly one step, and only where the reference's pre-quantization value lies within float error (1e-4 step)
  of a rounding tie; for ORT's fused kernels that window widens by the bias they round to int32 on the
  s_x·s_w grid (0.5·s_x·s_w / s_y steps) — which is the one-step-in-rare-ties allowance, made exact.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from _qdq_models import (
    SINGLE_SHAPES,
    T,
    dyadic_plan,
    make_plan,
    run_ort,
    run_reference,
    run_torch,
    single,
    tiny,
    without_outputs,
)
from onnx_ir.passes import PassResult

from denoq.errors import DenoqError
from denoq.passes import LAYER_MAP_KEY, InsertQDQ, PassManager, read_layer_map
from denoq.passes.infra import InPlace
from denoq.plan import ActQuant, QuantPlan

KINDS = ("conv", "gemm", "matmul")
TARGETS = ("trt", "ort-cpu")


def _nodes(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if tensor in n.output), None)


def _consumers(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if tensor in n.input]


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def _all_executors(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    return {"reference": run_reference(model, feeds), "ort-disable": run_ort(model, feeds, "disable"),
            "ort-all": run_ort(model, feeds, "all")}


# -- parity ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_parity_exact_on_ties_and_saturation(kind: str, target: str) -> None:
    module, fp = single(kind)
    plan = dyadic_plan(module, target, coarse=True, out_scale=2.0**-3)
    gen = torch.Generator().manual_seed(5)
    k = torch.randint(-20, 21, SINGLE_SHAPES[kind], generator=gen)  # x/s_x = k/2: half of them exact ties
    k = torch.where(torch.rand(k.shape, generator=gen) < 0.1, 300 * torch.sign(k), k)  # saturate the input
    x = k.float() * 2.0**-4
    lp = plan.layers["layer"]
    s_in = lp.input.scale[0].item()
    assert (k % 2 != 0).any() and ((x / s_in).abs() > 128).any(), "data must hit input ties and saturation"

    (want,) = run_torch(module, plan, x)
    if lp.output is not None:  # the outputs must hit rounding ties and saturation too
        (pre,) = run_torch(module, without_outputs(plan), x)
        v = pre / lp.output.scale[0].item() + lp.output.zero_point
        assert (v - np.floor(v) == 0.5).sum() > 0.1 * v.size
        assert ((v < -0.5) | (v > 255.5)).any() and ((v > 0.5) & (v < 254.5)).any()
    model = InsertQDQ(plan)(fp)
    for name, (got,) in _all_executors(model, {"sample": x.numpy()}).items():
        np.testing.assert_array_equal(got, want, err_msg=f"{name} vs torch ({kind}, {target})")


def _near_tie(pre: np.ndarray, scale: float, zp: int, window: np.ndarray | float) -> np.ndarray:
    v = pre.astype(np.float64) / scale + zp
    return np.abs(v - np.floor(v) - 0.5) <= window


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_parity_random_data(kind: str, target: str) -> None:
    module, fp = single(kind)
    gen = torch.Generator().manual_seed(6)
    x = 2 * torch.randn(SINGLE_SHAPES[kind], generator=gen)
    plan = make_plan(module, (x,), target)  # shrink 0.7: saturation on both ends; perturbed integer weights
    lp = plan.layers["layer"]
    model = InsertQDQ(plan)(fp)
    (want,) = run_torch(module, plan, x)
    results = _all_executors(model, {"sample": x.numpy()})
    if lp.output is None:  # trt: float output
        for name, (got,) in results.items():
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=name)
        return
    s_y, z_y = lp.output.scale[0].item(), lp.output.zero_point
    (pre,) = run_torch(module, without_outputs(plan), x)
    axis = 1 if kind == "conv" else -1
    s_xw = lp.input.scale[0].item() * lp.weight_scale.numpy()
    bias_window = 0.5 * np.expand_dims(s_xw, tuple(range(1, pre.ndim - axis % pre.ndim))) / s_y
    for name, (got,) in results.items():
        diff = np.abs(got - want)
        assert diff.max() <= s_y * (1 + 1e-5), f"{name}: off by more than one output step"
        window = 1e-4 + (bias_window if name == "ort-all" else 0.0)
        off = diff > 0
        assert np.all(_near_tie(pre, s_y, z_y, window)[off]), f"{name}: a step off away from a rounding tie"
        assert off.mean() < 0.02, f"{name}: {off.sum()} of {off.size} outputs off by one step"


def test_weights_are_the_plans_integers_never_rerounded() -> None:
    module, fp = single("matmul")
    x = torch.randn(SINGLE_SHAPES["matmul"])
    plan = make_plan(module, (x,), "ort-cpu", perturb=True)
    lp = plan.layers["layer"]
    rtn = torch.round(module.layer.weight.detach() / lp.weight_scale[:, None]).to(torch.int8)
    assert not torch.equal(rtn, lp.weight_int), "the perturbed plan must differ from re-rounding"
    model = InsertQDQ(plan)(fp)
    inits = _inits(model)
    assert "layer.weight" not in inits, "the FP weight initializer must be gone"
    np.testing.assert_array_equal(inits["layer.weight_quantized"], lp.weight_int.numpy().T)  # [in, out]
    assert inits["layer.weight_quantized"].dtype == np.int8
    np.testing.assert_array_equal(inits["layer.weight_scale"], lp.weight_scale.numpy())
    np.testing.assert_array_equal(inits["layer.weight_zero_point"], np.zeros(8, np.int8))
    (matmul,) = _nodes(model, "MatMul")
    assert matmul.input[1] == "layer.weight"  # the layer map still names the weight input
    dq = _producer(model, "layer.weight")
    assert dq.op_type == "DequantizeLinear" and dq.input[0] == "layer.weight_quantized"
    assert onnx.helper.get_attribute_value(dq.attribute[0]) == 1  # MatMul [in, out]: output channels on axis 1


@pytest.mark.parametrize("kind,axis", [("conv", 0), ("gemm", 0)])
def test_weight_axis_for_conv_and_gemm(kind: str, axis: int) -> None:
    module, fp = single(kind)
    model = InsertQDQ(dyadic_plan(module, "trt"))(fp)
    dq = _producer(model, "layer.weight")
    assert dq.op_type == "DequantizeLinear" and {a.name: a.i for a in dq.attribute} == {"axis": axis}
    assert tuple(_inits(model)["layer.weight_quantized"].shape) == tuple(module.layer.weight.shape)


@pytest.mark.parametrize("target,dtype,zp", [("trt", np.int8, 0), ("ort-cpu", np.uint8, 128)])
def test_activation_zero_point_types(target: str, dtype: type, zp: int) -> None:
    module, fp = tiny()
    model = InsertQDQ(dyadic_plan(module, target))(fp)
    inits = _inits(model)
    for q in _nodes(model, "QuantizeLinear") + [n for n in _nodes(model, "DequantizeLinear")
                                                if not n.name.endswith("/weight/DequantizeLinear")]:
        assert inits[q.input[2]].dtype == dtype and inits[q.input[2]] == zp, q.name
        assert inits[q.input[1]].dtype == np.float32 and inits[q.input[1]].shape == ()
    n_out = sum(n.name.endswith("/output/QuantizeLinear") for n in _nodes(model, "QuantizeLinear"))
    assert n_out == (0 if target == "trt" else 7)


# -- graph structure ---------------------------------------------------------------------------------------

def test_nodes_reading_one_tensor_share_one_qdq() -> None:
    module, fp = tiny()
    model = InsertQDQ(dyadic_plan(module, "trt"))(fp)
    proj = {m: next(n for n in model.graph.node if n.name == read_layer_map(model)[m].node)
            for m in ("attn.to_q", "attn.to_k", "attn.to_v")}
    (shared,) = {n.input[0] for n in proj.values()}
    dq = _producer(model, shared)
    q = _producer(model, dq.input[0])
    assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")
    assert len([n for n in _consumers(model, q.input[0]) if n.op_type == "QuantizeLinear"]) == 1

    plan = dyadic_plan(module, "trt")  # a different scale for to_v: its own pair on the same tensor
    plan.layers["attn.to_v"].input = ActQuant(8, True, 0, torch.full((T,), 2.0**-2))
    model = InsertQDQ(plan)(fp)
    qs = [n for n in _consumers(model, q.input[0]) if n.op_type == "QuantizeLinear"]
    assert len(qs) == 2


def test_output_qdq_rewires_consumers_and_keeps_graph_output_names() -> None:
    module, fp = tiny()
    plan = dyadic_plan(module, "ort-cpu")
    model = InsertQDQ(plan)(fp)
    assert [o.name for o in model.graph.output] == ["out_sample", "head"]
    lmap = read_layer_map(model)
    for out in ("out_sample", "head"):
        dq = _producer(model, out)
        assert dq.op_type == "DequantizeLinear" and _producer(model, dq.input[0]).op_type == "QuantizeLinear"
    for name in ("conv_in", "conv_mid", "attn.to_q", "attn.to_k"):  # the FP output feeds only its Q
        node = next(n for n in model.graph.node if n.name == lmap[name].node)
        y = node.output[0]
        if name == "attn.to_q":  # MatMul + bias Add: the module's output is the Add's
            (add,) = _consumers(model, y)
            assert add.op_type == "Add"
            y = add.output[0]
        assert [n.op_type for n in _consumers(model, y)] == ["QuantizeLinear"], name
    conv_mid_dq = next(n for n in model.graph.node if n.name == "conv_mid/output/DequantizeLinear")
    readers = {n.op_type for n in _consumers(model, conv_mid_dq.output[0])}
    assert readers == {"Add", "QuantizeLinear"}  # residual Add and conv_out's input Q (different scale)


def test_quantized_output_reused_as_next_input_when_parameters_match() -> None:
    module, fp = tiny()
    plan = dyadic_plan(module, "ort-cpu", act_scale=2.0**-2, out_scale=2.0**-2)
    model = InsertQDQ(plan)(fp)
    lmap = read_layer_map(model)
    conv_out = next(n for n in model.graph.node if n.name == lmap["conv_out"].node)
    assert _producer(model, conv_out.input[0]).name == "conv_mid/output/DequantizeLinear"
    assert not any(n.name == "conv_out/input/QuantizeLinear" for n in model.graph.node)
    x = torch.randint(-40, 41, (2, 2, 4, 4)).float() * 2.0**-4
    t = torch.tensor([3, 7])
    want = run_torch(module, plan, x, t)
    for name, got in _all_executors(model, {"sample": x.numpy(), "timestep": t.numpy()}).items():
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=name)


@pytest.mark.parametrize("target", TARGETS)
def test_whole_model_exact_with_dyadic_plan(target: str) -> None:
    """End to end on a dyadic plan nothing rounds differently, so the executors agree exactly."""
    module, fp = tiny()
    plan = dyadic_plan(module, target)
    model = InsertQDQ(plan)(fp)
    x = torch.randint(-40, 41, (2, 2, 4, 4)).float() * 2.0**-4
    t = torch.tensor([3, 7])
    want = run_torch(module, plan, x, t)
    assert np.abs(want[0]).max() > 0
    for name, got in _all_executors(model, {"sample": x.numpy(), "timestep": t.numpy()}).items():
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=name)


def test_pass_leaves_its_input_untouched_and_the_result_verifies() -> None:
    module, fp = tiny()
    before = fp.SerializeToString()
    model = InsertQDQ(dyadic_plan(module, "ort-cpu"))(fp)
    assert fp.SerializeToString() == before
    onnx.checker.check_model(model, full_check=True)
    assert json.loads(dict((p.key, p.value) for p in model.metadata_props)[LAYER_MAP_KEY])


def test_layers_not_in_the_plan_stay_float() -> None:
    module, fp = tiny()
    plan = dyadic_plan(module, "trt")
    del plan.layers["head"]
    model = InsertQDQ(plan)(fp)
    inits = _inits(model)
    assert "head.weight" in inits and "head.weight_quantized" not in inits
    assert "conv_in.weight" not in inits


# -- errors ------------------------------------------------------------------------------------------------

def _with_map(fp: onnx.ModelProto, edit) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(fp)
    props = {p.key: p.value for p in model.metadata_props}
    del model.metadata_props[:]
    lmap = json.loads(props.pop(LAYER_MAP_KEY))
    edit(lmap)
    if lmap is not None:
        props[LAYER_MAP_KEY] = json.dumps(lmap)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    return model


def _plan_edit(plan: QuantPlan, **changes) -> QuantPlan:
    plan.layers["conv_in"] = dataclasses.replace(plan.layers["conv_in"], **changes)
    return plan


def _drop_map(fp: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(fp)
    keep = [(p.key, p.value) for p in model.metadata_props if p.key != LAYER_MAP_KEY]
    del model.metadata_props[:]
    for k, v in keep:
        model.metadata_props.add(key=k, value=v)
    return model


ERROR_CASES = {
    "no layer map": (lambda fp: _drop_map(fp), lambda plan: plan, "no 'denoq.layer_map' metadata"),
    "layer missing from map": (lambda fp: _with_map(fp, lambda m: m.pop("conv_in")), lambda plan: plan,
                               "plan layer 'conv_in' is not in the model's layer map"),
    "node not found": (lambda fp: _with_map(fp, lambda m: m["conv_in"].update(node="nope")), lambda plan: plan,
                       "names node 'nope' but the graph has no such node"),
    "op type differs": (lambda fp: _with_map(fp, lambda m: m["conv_in"].update(op_type="Gemm")),
                        lambda plan: plan, "is Conv, the layer map says Gemm"),
    "weight shape mismatch": (lambda fp: fp, lambda plan: _plan_edit(
        plan, weight_int=torch.zeros(4, 2, 1, 1, dtype=torch.int8)), "weight shape mismatch"),
    "blocked weights": (lambda fp: fp, lambda plan: _plan_edit(
        plan, weight_int=torch.zeros(4, 2, 3, 3, dtype=torch.int8), weight_scale=torch.ones(4, 0),
        block_size=3), "block size 3 does not divide its 2 input channels"),
    "uint8 for trt": (lambda fp: fp, lambda plan: _plan_edit(
        plan, input=ActQuant(8, False, 128, torch.full((T,), 0.1))), "TensorRT needs symmetric activations"),
    "3-bit activations": (lambda fp: fp, lambda plan: _plan_edit(
        plan, input=ActQuant(3, True, 0, torch.full((T,), 0.1))), "have 3 bits;.*set activations.bits to 4, 6 or 8"),
    "16-bit activations": (lambda fp: fp, lambda plan: _plan_edit(
        plan, input=ActQuant(16, True, 0, torch.full((T,), 0.1))), "have 16 bits;.*set activations.bits to 4, 6 or 8"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_name_the_problem_and_the_fix(case: str) -> None:
    module, fp = tiny()
    edit_model, edit_plan, message = ERROR_CASES[case]
    with pytest.raises(DenoqError, match=message) as info:
        InsertQDQ(edit_plan(dyadic_plan(module, "trt")))(edit_model(fp))
    assert "\n" not in str(info.value) and ";" in str(info.value)  # one line: problem; fix


def test_running_twice_is_an_error() -> None:
    module, fp = tiny()
    once = InsertQDQ(dyadic_plan(module, "trt"))(fp)
    with pytest.raises(DenoqError, match="not the FP weight initializer"):
        InsertQDQ(dyadic_plan(module, "trt"))(once)


# -- pass manager ------------------------------------------------------------------------------------------

class BreakGraph(InPlace):
    """A deliberately broken pass: drops the first DequantizeLinear, leaving its reader without an input."""

    name = "break_graph"

    def call(self, model: ir.Model) -> PassResult:
        model.graph.remove(next(n for n in model.graph if n.op_type == "DequantizeLinear"))
        return PassResult(model, True)


def test_pass_manager_records_what_each_pass_did() -> None:
    module, fp = tiny()
    model, records = PassManager([InsertQDQ(dyadic_plan(module, "ort-cpu"))], verify=True)(fp)
    weights, outputs, inputs = records  # InsertQDQ is a Sequential: each of its passes is recorded
    assert [r.name for r in records] == ["qdq_weights", "qdq_outputs", "qdq_inputs"]
    assert weights.nodes_added == {"DequantizeLinear": 7} and weights.initializers_removed == 7
    assert outputs.nodes_added == {"QuantizeLinear": 7, "DequantizeLinear": 7}  # 7 output pairs
    assert inputs.nodes_added == {"QuantizeLinear": 5, "DequantizeLinear": 5}  # to_q, to_k, to_v share one
    assert all(r.nodes_removed == {} for r in records)
    assert "qdq_weights" in weights.summary() and len(model.graph.node) == len(fp.graph.node) + 31


def test_pass_manager_names_the_pass_that_broke_the_graph() -> None:
    module, fp = tiny()
    passes = [InsertQDQ(dyadic_plan(module, "trt")), BreakGraph()]
    with pytest.raises(DenoqError, match="pass 'break_graph' produced an invalid ONNX graph"):
        PassManager(passes, verify=True)(fp)
    _, records = PassManager(passes, verify=False)(fp)  # without verify the broken graph goes through
    assert [r.name for r in records] == ["qdq_weights", "qdq_inputs", "break_graph"]
    assert records[-1].nodes_removed == {"DequantizeLinear": 1}


def test_pass_manager_takes_onnx_ir_passes_only() -> None:
    with pytest.raises(TypeError, match="not an onnx-ir pass"):
        PassManager([lambda model: model])(tiny()[1])


def test_passes_do_not_import_torch() -> None:
    import denoq.passes

    for path in pathlib.Path(denoq.passes.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path.name
