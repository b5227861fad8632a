"""The trt-rules check (denoq.passes.trt_rules): a real trt-profile graph passes; graphs that break each rule fail,
naming the rule and the node; the compile records the verdict."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from denoq.errors import DenoqError
from denoq.passes.trt_rules import CheckTrtRules, summarize, trt_violations


@pytest.fixture(scope="module")
def graph(tiny_artifact_trt) -> onnx.ModelProto:
    return onnx.load(str(tiny_artifact_trt.file("model.qdq.onnx")))


def _nodes(model: onnx.ModelProto, op: str, weight: bool) -> list[onnx.NodeProto]:
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == op and (n.input[0] in inits) == weight]


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == name)


def _set(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    _init(model, name).CopyFrom(numpy_helper.from_array(array, name))


def _rules(model: onnx.ModelProto) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for v in trt_violations(model):
        out.setdefault(v.rule, set()).add(v.node)
    return out


def test_the_trt_profile_graph_keeps_every_rule(graph, tiny_artifact_trt):
    assert trt_violations(graph) == []
    assert CheckTrtRules()(graph).SerializeToString() == graph.SerializeToString()  # a check: the graph unchanged
    assert tiny_artifact_trt.manifest["trt_rules"] == {"count": 0, "violations": []}


def test_the_ort_cpu_profile_breaks_the_zero_point_rule(tiny_artifact_ort):
    rules = _rules(onnx.load(str(tiny_artifact_ort.file("model.qdq.onnx"))))
    assert "zero-point" in rules  # uint8 asymmetric activations
    assert "trt_rules" not in tiny_artifact_ort.manifest  # only the trt profile is checked at compile


def _break(graph: onnx.ModelProto, how: str) -> tuple[onnx.ModelProto, str]:
    m = copy.deepcopy(graph)
    q = _nodes(m, "QuantizeLinear", weight=False)[0]
    wdq = _nodes(m, "DequantizeLinear", weight=True)[0]
    if how == "scale-not-constant":
        scale = _init(m, q.input[1])
        m.graph.initializer.remove(scale)
        m.graph.input.append(helper.make_tensor_value_info(scale.name, scale.data_type, list(scale.dims)))
        return m, q.name
    if how == "scale-not-positive":
        _set(m, wdq.input[1], -numpy_helper.to_array(_init(m, wdq.input[1])))
        return m, wdq.name
    if how == "zero-point":
        _set(m, q.input[2], np.array(3, dtype=np.int8))
        return m, q.name
    if how == "channel-axis":
        for a in [a for a in wdq.attribute if a.name == "axis"]:
            wdq.attribute.remove(a)
        wdq.attribute.append(helper.make_attribute("axis", 1))
        return m, wdq.name
    if how == "blocked-int8":
        wdq.attribute.append(helper.make_attribute("block_size", 4))
        return m, wdq.name
    if how == "int4-placement":
        m.graph.initializer.append(helper.make_tensor("int4.zp", TensorProto.INT4, [], [0]))
        dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
        q.input[2] = dq.input[2] = "int4.zp"
        for vi in m.graph.value_info:
            if vi.name == q.output[0]:
                vi.type.tensor_type.elem_type = TensorProto.INT4
        return m, q.name
    if how == "dtype":
        scale = numpy_helper.to_array(_init(m, q.input[1]))
        _set(m, q.input[1], scale.astype(np.float16))
        dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
        dq.input[1] = q.input[1] + "_f32"  # keep the DQ valid: only the Q's scale type changes
        m.graph.initializer.append(numpy_helper.from_array(scale, dq.input[1]))
        return m, q.name
    # stray-qdq: a Q/DQ pair in front of the first Sigmoid (of a SiLU)
    target = next(n for n in m.graph.node if n.op_type == "Sigmoid")
    names = [i.name for i in m.graph.initializer]
    scale, zp = "stray.scale", "stray.zp"
    assert scale not in names
    m.graph.initializer.extend([numpy_helper.from_array(np.array(0.1, np.float32), scale),
                                numpy_helper.from_array(np.array(0, np.int8), zp)])
    src = target.input[0]
    qn = helper.make_node("QuantizeLinear", [src, scale, zp], ["stray.q"], name="stray/QuantizeLinear")
    dqn = helper.make_node("DequantizeLinear", ["stray.q", scale, zp], ["stray.dq"], name="stray/DequantizeLinear")
    target.input[0] = "stray.dq"
    idx = list(m.graph.node).index(target)
    m.graph.node.insert(idx, dqn)
    m.graph.node.insert(idx, qn)
    return m, "stray/DequantizeLinear"


@pytest.mark.parametrize("rule", ["scale-not-constant", "scale-not-positive", "zero-point", "channel-axis",
                                  "blocked-int8", "int4-placement", "stray-qdq"])
def test_each_broken_rule_is_named_with_its_node(graph, rule):
    broken, node = _break(graph, rule)
    rules = _rules(broken)
    assert node in rules.get(rule, set()), rules
    with pytest.raises(DenoqError) as info:
        CheckTrtRules()(broken)
    msg = str(info.value)
    assert "\n" not in msg and rule in msg and "TensorRT rule violation" in msg
    assert msg.startswith("pass 'trt_rules' refused its input: ")


def test_a_dequantize_without_its_quantize_is_stray(graph):
    m = copy.deepcopy(graph)
    q = _nodes(m, "QuantizeLinear", weight=False)[0]
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    m.graph.node.insert(list(m.graph.node).index(dq), helper.make_node("Identity", [q.output[0]], ["orphan.int8"],
                                                                       name="orphan/Identity"))
    dq.input[0] = "orphan.int8"
    assert any(v.rule == "stray-qdq" and v.node == dq.name and "does not read a QuantizeLinear" in v.detail
               for v in trt_violations(m))


def test_a_scale_in_another_float_type_fails_type_inference_first(graph):
    """The dtype rule: an FP16 scale on an FP32 input is what strong typing refuses; ONNX's type constraints say
    the same, so the check reports it from type inference, in one line."""
    broken, _ = _break(graph, "dtype")
    with pytest.raises(DenoqError, match="trt-rules: ONNX type inference fails") as info:
        trt_violations(broken)
    assert "\n" not in str(info.value)


def test_summary_counts_rules_and_shows_the_first():
    from denoq.passes.trt_rules import Violation

    vs = [Violation("b", f"n{i}", "x") for i in range(7)] + [Violation("a", "m", "y")]
    text = summarize(sorted(vs))
    assert text.startswith("8 TensorRT rule violation(s) (a ×1, b ×7); first: a: m: y; b: n0: x")
    assert "n5" not in text
