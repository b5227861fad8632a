"""The passes on onnx-ir's pass infrastructure (docs/architecture.md, Contracts: Passes): each pass refuses a graph
that breaks its precondition and catches a rewrite that does not establish its invariant, with a one-line DenoqError
naming the pass; the manager converts protobuf ↔ onnx-ir once per pipeline and binds the plan once."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from _qdq_models import T, dyadic_plan, grouped, single, single_t, tiny
from onnx import TensorProto, helper
from onnx_ir.passes import PassResult

import denoq.passes.binding as binding
from denoq.calibrators.igq import fit_groups
from denoq.errors import DenoqError
from denoq.layermap import ATTENTION_MAP_KEY, LAYER_MAP_KEY
from denoq.passes import (
    AppendPtqdHead,
    InsertQDQ,
    InsertTimestepSelectors,
    PassManager,
    QuantizeAttention,
    QuantizeInputGroups,
    QuantizeInputs,
    QuantizeOutputs,
    QuantizeWeights,
)
from denoq.passes.binding import PlanBinding
from denoq.passes.fp16 import ConvertFp16
from denoq.passes.guidance import GuideClassFree
from denoq.passes.qdq_base import PlanPass
from denoq.plan import ActQuant, AttentionPlan, QuantPlan


def _refused(passes: list, model: onnx.ModelProto, name: str, what: str = "refused its input") -> str:
    with pytest.raises(DenoqError) as info:
        PassManager(passes, verify=True)(model)
    msg = str(info.value)
    assert msg.startswith(f"pass {name!r} {what}: ") and "\n" not in msg, msg
    return msg


def _lazy(cls: type) -> type:
    """`cls` with a rewrite that changes nothing: its postcondition must catch it."""
    if issubclass(cls, PlanPass):
        return type(f"Lazy{cls.__name__}", (cls,), {"rewrite": lambda self, b, g: False})
    return type(f"Lazy{cls.__name__}", (cls,), {"call": lambda self, model: PassResult(model, False)})


def _grouped(target: str) -> tuple[onnx.ModelProto, QuantPlan]:
    module, fp = single_t("conv")
    return fp, grouped(dyadic_plan(module, target), T, [1.0, 0.5], [1.0, 0.5])


def _igq() -> tuple[onnx.ModelProto, QuantPlan]:
    module, fp = single("matmul")
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    base = dyadic_plan(module, "ort-cpu")
    plan = QuantPlan(T, "ort-cpu")
    plan.add(dataclasses.replace(base.layers["layer"], output=None,
                                 input_groups=fit_groups(x.amin(1), x.amax(1), 2, 8, False, "layer")))
    return fp, plan


def _attention(p_log2: bool = False) -> tuple[onnx.ModelProto, QuantPlan]:
    """A bare attention: out_sample = Softmax(q · k) · v, with the attention map naming its three nodes."""
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["q", "k"], ["s"], name="qk"), helper.make_node("Softmax", ["s"], ["p"], name="sm"),
         helper.make_node("MatMul", ["p", "v"], ["out_sample"], name="pv")], "attention",
        [helper.make_tensor_value_info(n, f, shape) for n, shape in (("q", [1, 4, 8]), ("k", [1, 8, 4]),
                                                                      ("v", [1, 4, 8]))],
        [helper.make_tensor_value_info("out_sample", f, [1, 4, 8])])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    helper.set_model_props(model, {LAYER_MAP_KEY: "{}",
                                   ATTENTION_MAP_KEY: json.dumps({"attn": {"qk": "qk", "softmax": "sm", "pv": "pv"}})})
    plan = QuantPlan(T, "trt")
    quants = {r: ActQuant(8, True, 0, torch.full((T,), 2.0**-4)) for r in ("q", "k", "p", "v")}
    plan.add_attention(AttentionPlan("attn", quants, p_log2=p_log2))
    return model, plan


def _conditional() -> onnx.ModelProto:
    """(sample, timestep, class_labels) → out_sample = 2 · sample."""
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Mul", ["sample", "two"], ["out_sample"], name="mul")], "cond",
        [helper.make_tensor_value_info("sample", f, ["B", 1, 4, 4]),
         helper.make_tensor_value_info("timestep", TensorProto.INT64, ["B"]),
         helper.make_tensor_value_info("class_labels", TensorProto.INT64, ["B"])],
        [helper.make_tensor_value_info("out_sample", f, ["B", 1, 4, 4])],
        [helper.make_tensor("two", f, [], [2.0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


# -- preconditions: a graph the pass cannot rewrite is refused, naming the pass ----------------------------------

def test_weights_refuse_weights_already_quantized() -> None:
    module, fp = tiny()
    b = PlanBinding(dyadic_plan(module, "trt"))
    msg = _refused([QuantizeWeights(b), QuantizeWeights(b)], fp, "qdq_weights")
    assert "is not its FP weight initializer" in msg


@pytest.mark.parametrize("make,cls,match", [
    (lambda: _grouped("trt"), InsertTimestepSelectors, "already has its timestep selector"),
    (_igq, QuantizeInputGroups, "already has IGQ-ViT groups"),
    (_attention, QuantizeAttention, "already has attention quantizers"),
])
def test_a_second_run_is_refused(make, cls, match: str) -> None:
    fp, plan = make()
    b = PlanBinding(plan)
    assert match in _refused([cls(b), cls(b)], fp, cls.name)


@pytest.mark.parametrize("cls", [QuantizeOutputs, QuantizeInputs])
def test_selector_layers_need_their_selector_first(cls: type) -> None:
    fp, plan = _grouped("ort-cpu")
    b = PlanBinding(plan)
    assert "run timestep_selectors first" in _refused([QuantizeWeights(b), cls(b)], fp, cls.name)


def test_head_and_guidance_refuse_graphs_without_their_inputs() -> None:
    _, fp = single("conv")  # no timestep input
    head = AppendPtqdHead(np.zeros((T, 6)), np.ones(T))
    assert "no 'timestep' input" in _refused([head], fp, "ptqd_head")
    assert "no 'class_labels' input" in _refused([GuideClassFree(3)], single_t("conv")[1], "cfg")


def test_fp16_refuses_a_float16_graph() -> None:
    _, fp = single_t("conv")
    assert "already has float16 initializers" in _refused([ConvertFp16(()), ConvertFp16(())], fp, "fp16")


def test_a_plan_that_does_not_fit_keeps_its_own_message() -> None:
    """Plan/graph mismatches are the binding's DenoqErrors (problem; fix), raised before anything changes."""
    module, fp = tiny()
    plan = dyadic_plan(module, "trt")
    plan.layers["conv_in"] = dataclasses.replace(plan.layers["conv_in"], weight_bits=9)
    with pytest.raises(DenoqError, match=r"^layer conv_in: weights have 9 bits; .* set weights.bits"):
        PassManager([InsertQDQ(plan)], verify=True)(fp)


# -- postconditions: a rewrite that does not establish the invariant is caught -----------------------------------

@pytest.mark.parametrize("make,cls", [
    (lambda: (tiny()[1], dyadic_plan(tiny()[0], "ort-cpu")), QuantizeWeights),
    (lambda: _grouped("trt"), InsertTimestepSelectors),
    (lambda: (tiny()[1], dyadic_plan(tiny()[0], "ort-cpu")), QuantizeOutputs),
    (_igq, QuantizeInputGroups),
    (lambda: (tiny()[1], dyadic_plan(tiny()[0], "trt")), QuantizeInputs),
    (_attention, QuantizeAttention),
    (lambda: _attention(p_log2=True), QuantizeAttention),
])
def test_a_rewrite_that_does_nothing_breaks_the_postcondition(make, cls: type) -> None:
    fp, plan = make()
    _refused([_lazy(cls)(plan)], fp, cls.name, "broke its own postcondition")


def test_head_guidance_and_fp16_postconditions() -> None:
    _, fp = single_t("conv")
    _refused([_lazy(AppendPtqdHead)(np.zeros((T, 6)), np.ones(T))], fp, "ptqd_head", "broke its own postcondition")
    _refused([_lazy(GuideClassFree)(3)], _conditional(), "cfg", "broke its own postcondition")

    class HalfOutput(ConvertFp16):
        def call(self, model: ir.Model) -> PassResult:
            result = super().call(model)
            model.graph.outputs[0].dtype = ir.DataType.FLOAT16
            return result

    _refused([HalfOutput(())], fp, "fp16", "broke its own postcondition")


def test_each_pass_keeps_its_invariant_on_a_graph_it_can_rewrite() -> None:
    """The same passes, not sabotaged, pass their own checks (and the checker after each)."""
    fp, plan = _attention(p_log2=True)
    PassManager([QuantizeAttention(plan)], verify=True)(fp)
    guided, records = PassManager([GuideClassFree(3), AppendPtqdHead(np.zeros((T, 1)), np.ones(T))],
                                  verify=True)(_conditional())
    assert [r.name for r in records] == ["cfg", "ptqd_head"]
    assert [i.name for i in guided.graph.input] == ["sample", "timestep", "class_labels", "guidance_scale"]


# -- the manager ---------------------------------------------------------------------------------------------------

def _count(monkeypatch, target: object, name: str) -> list[int]:
    calls = [0]
    real = getattr(target, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, counted)
    return calls


@pytest.mark.parametrize("verify", [False, True])
def test_one_conversion_per_pipeline_and_one_binding(monkeypatch, verify: bool) -> None:
    """protobuf → ir once at the start, ir → protobuf once at the end, however many passes run; in verify mode
    each check reads a protobuf snapshot of the one ir model (never converted back). The plan is bound once."""
    fp, plan = _grouped("ort-cpu")
    head = AppendPtqdHead(np.zeros((T, 6)), np.ones(T))
    from_proto, to_proto = _count(monkeypatch, ir, "from_proto"), _count(monkeypatch, ir, "to_proto")
    binds = _count(monkeypatch, binding, "bind")
    _, records = PassManager([InsertQDQ(plan), head], verify=verify)(fp)
    assert [r.name for r in records] == ["qdq_weights", "timestep_selectors", "qdq_outputs", "qdq_inputs",
                                         "ptqd_head"]
    assert from_proto[0] == 1 and binds[0] == 1
    assert to_proto[0] == 1 + (len(records) if verify else 0)
