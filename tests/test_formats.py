"""FP8, NVFP4, dynamic INT4 blocks and SVDQuant's branch: the grids against `onnx.reference` and `ml_dtypes`, and
each layer form through three executors: denoq's PyTorch simulation (`SimulatedLayer`), ONNX Runtime (where its CPU
kernels run the format) and `onnx.reference` (with TensorRT's FP4 op from `denoq.engines.reference`)."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from _qdq_models import SINGLE_SHAPES, T, run_ort, single
from onnx import TensorProto, helper

from denoq.calibrators.gptq import GptqSettings, gptq, layer_plan, rtn
from denoq.calibrators.layer_matrix import HessianAccumulator, weight_matrix
from denoq.calibrators.simulate import SimulatedLayer, TimestepClock
from denoq.calibrators.svdquant import SvdQuantSettings, decompose
from denoq.engines.reference import run_reference
from denoq.errors import DenoqError
from denoq.formats import FP4_MAX, FP8_MAX, fp4_round, fp8_round
from denoq.passes.qdq import InsertQDQ
from denoq.passes.trt_rules import trt_violations
from denoq.plan import ActQuant, LayerPlan, QuantPlan


# -- the grids ---------------------------------------------------------------------------------------------------
def _reference_qdq(x: np.ndarray, scale: float, to: int, opset: int) -> np.ndarray:
    node_q = helper.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=to)
    node_dq = helper.make_node("DequantizeLinear", ["q", "s"], ["y"])
    graph = helper.make_graph([node_q, node_dq], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [scale])])
    return run_reference(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), {"x": x})[0]


def test_fp8_and_fp4_rounding_match_onnx_quantize_linear() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=gen) * 3, torch.linspace(-8, 8, 257),  # every E2M1 tie
                   torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 1e4, -1e4, 0.0])])
    grids = (("fp8", TensorProto.FLOAT8E4M3FN, 21, 0.01), ("fp4", TensorProto.FLOAT4E2M1, 23, 1.0))
    for fmt, to, opset, scale in grids:
        want = _reference_qdq(x.numpy(), scale, to, opset)
        v = x / torch.tensor(scale)
        got = (fp8_round(v) if fmt == "fp8" else fp4_round(v)) * torch.tensor(scale)
        np.testing.assert_array_equal(got.numpy(), want, err_msg=fmt)
    assert float(fp8_round(torch.tensor(1e6))) == FP8_MAX and float(fp4_round(torch.tensor(-9.0))) == -FP4_MAX
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6.0])
    assert torch.equal(fp4_round(grid), grid)
    np.testing.assert_array_equal(fp4_round(x).numpy(), x.numpy().astype(ml_dtypes.float4_e2m1fn).astype(np.float32))


# -- single layers through three executors ------------------------------------------------------------------------
def _sim(module: torch.nn.Module, lp: LayerPlan, x: torch.Tensor) -> np.ndarray:
    clock = TimestepClock()
    clock.t = torch.zeros(x.shape[0], dtype=torch.int64)
    with torch.no_grad():
        return SimulatedLayer(module.layer, lp, clock, T)(x).numpy()


def _weights(module: torch.nn.Module, bits: int, fmt: str, group: int = 0, hessian_input: torch.Tensor | None = None
             ) -> LayerPlan:
    layer = module.layer
    settings = GptqSettings(bits=bits, group_size=group, format=fmt)
    w = weight_matrix(layer)
    cpg = group * layer.weight[0, 0].numel() if group else None
    if hessian_input is None:
        wq = rtn(w, settings, cpg)
    else:
        acc = HessianAccumulator(layer)
        acc.add(hessian_input)
        wq = gptq(w, acc.hessian, settings, cpg)
    return layer_plan("layer", layer, wq, settings)


def _table(value: float) -> torch.Tensor:
    return torch.full((T,), value, dtype=torch.float32)


def _check(module: torch.nn.Module, fp: onnx.ModelProto, lp: LayerPlan, x: torch.Tensor, ort: bool,
           rel: float = 1e-6) -> onnx.ModelProto:
    plan = QuantPlan(num_train_timesteps=T, target="trt")
    plan.add(lp)
    model = InsertQDQ(plan)(fp)
    want = _sim(module, lp, x)
    runs = {"reference": run_reference(model, {"sample": x.numpy()})[0]}
    if ort:
        runs.update({f"ort-{level}": run_ort(model, {"sample": x.numpy()}, level)[0] for level in ("disable", "all")})
    for name, got in runs.items():
        np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.abs(want).max(), err_msg=name)
    return model


@pytest.mark.parametrize("kind", ["conv", "gemm", "matmul"])
def test_fp8_layer_three_executors(kind: str) -> None:
    module, fp = single(kind)
    gen = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(SINGLE_SHAPES[kind], generator=gen)
    lp = _weights(module, 8, "fp8")
    assert lp.weight_int.dtype == torch.float8_e4m3fn
    scale = float(x.abs().max()) / FP8_MAX * 0.5  # the largest inputs saturate
    lp = dataclasses.replace(lp, input=ActQuant(8, True, 0, _table(scale), format="fp8"))
    model = _check(module, fp, lp, x, ort=True)
    assert trt_violations(model) == []
    assert {i.data_type for i in model.graph.initializer if i.name.endswith("weight_quantized")} == {
        TensorProto.FLOAT8E4M3FN}


@pytest.mark.parametrize("kind", ["conv", "matmul"])
def test_dynamic_int4_blocks_three_executors(kind: str) -> None:
    module, fp = single(kind)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(SINGLE_SHAPES[kind], generator=gen) * torch.linspace(0.1, 5, SINGLE_SHAPES[kind][1 if kind ==
                                                                                                     "conv" else -1]
                                                                         ).view(-1, *([1, 1] if kind == "conv" else []))
    lp = _weights(module, 4, "int")
    block = 2 if kind == "conv" else 8
    lp = dataclasses.replace(lp, input=ActQuant(4, True, 0, _table(1.0), block_size=block))
    model = _check(module, fp, lp, x, ort=True)
    rules = {v.rule for v in trt_violations(model)}
    assert "scale-not-constant" in rules  # run-time int4 scales: ONNX Runtime's, not TensorRT's


def test_nvfp4_layer_simulation_matches_onnx_reference() -> None:
    module, fp = single("matmul")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(SINGLE_SHAPES["matmul"], generator=gen) * 4
    x[0, 0, :3] = 0.0  # a block with zeros, and one whose amax is tiny
    x[1, 1, :16] *= 1e-6
    lp = _weights(module, 4, "fp4", group=16, hessian_input=torch.randn(64, 16, generator=gen))
    assert lp.weight_global_scale is not None and lp.block_size == 16
    s8 = lp.weight_scale.numpy()
    np.testing.assert_array_equal(s8.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), s8)
    g = float(x.abs().max()) / (FP4_MAX * FP8_MAX)
    lp = dataclasses.replace(lp, input=ActQuant(4, True, 0, _table(g), format="fp4", block_size=16))
    model = _check(module, fp, lp, x, ort=False)
    assert model.opset_import[0].version >= 23 and any(n.op_type == "TRT_FP4DynamicQuantize" for n in model.graph.node)
    assert trt_violations(model) == []


def test_nvfp4_gptq_beats_rtn_on_its_own_grid() -> None:
    gen = torch.Generator().manual_seed(4)
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)  # correlated inputs
    acc = HessianAccumulator(layer)
    acc.add(x)
    for fmt, bits, group in (("fp4", 4, 16), ("fp8", 8, 0)):
        settings = GptqSettings(bits=bits, group_size=group, format=fmt)
        w = weight_matrix(layer)
        err = {}
        for name, fn in (("rtn", rtn), ("gptq", gptq)):
            wq = fn(w, settings) if name == "rtn" else fn(w, acc.hessian, settings)
            values = wq.q
            on_grid = fp4_round(values) if fmt == "fp4" else fp8_round(values)
            assert torch.equal(on_grid, values), f"{fmt} {name}: values off the grid"
            err[name] = float(((w - wq.dequantized()) @ x.T).pow(2).mean())
        assert err["gptq"] < 0.8 * err["rtn"], (fmt, err)


# -- SVDQuant -----------------------------------------------------------------------------------------------------
def test_svdquant_decomposition_rebuilds_the_layer() -> None:
    gen = torch.Generator().manual_seed(5)
    conv = torch.nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(4, 8, 6, 6, generator=gen) * torch.tensor([1, 1, 20, 1, 1, 1, 1, 0.1]).view(1, -1, 1, 1)
    amax = x.abs().transpose(0, 1).flatten(1).amax(1)
    norms = []
    for rank in (0, 2, 6):
        part, residual = decompose(conv, amax, SvdQuantSettings(rank=rank, alpha=0.5))
        assert part.factors[2] < part.factors[0] < part.factors[7]  # the outlier channel is scaled down
        branch = 0 if part.up is None else torch.nn.functional.conv2d(
            torch.nn.functional.conv2d(x * part.factors.view(1, -1, 1, 1), part.down, padding=1),
            part.up[:, :, None, None])
        rebuilt = torch.nn.functional.conv2d(x * part.factors.view(1, -1, 1, 1), residual, conv.bias, padding=1)
        torch.testing.assert_close(rebuilt + branch, conv(x), rtol=1e-4, atol=1e-4)
        if part.up is not None:
            assert torch.equal(part.up.half().float(), part.up) and torch.equal(part.down.half().float(), part.down)
        norms.append(float(residual.norm()))
    assert norms[0] > norms[1] > norms[2]


@pytest.mark.parametrize("kind", ["conv", "gemm", "matmul"])
def test_svdquant_branch_three_executors(kind: str) -> None:
    module, fp = single(kind)
    gen = torch.Generator().manual_seed(6)
    x = 2 * torch.randn(SINGLE_SHAPES[kind], generator=gen)
    channels = SINGLE_SHAPES[kind][1 if kind == "conv" else -1]
    amax = x.abs().transpose(0, 1).flatten(1).amax(1) if kind == "conv" else x.abs().flatten(0, -2).amax(0)
    part, residual = decompose(module.layer, amax, SvdQuantSettings(rank=2, alpha=0.5))
    work = torch.nn.Module()
    work.layer = type(module.layer)(*([4, 6, 3] if kind == "conv" else [16, 8]), **({"padding": 1} if kind ==
                                                                                      "conv" else {}))
    with torch.no_grad():
        work.layer.weight.copy_(residual)
    lp = part.attach(_weights(work, 4, "int"))
    block = 2 if kind == "conv" else 8
    lp = dataclasses.replace(lp, input=ActQuant(4, True, 0, _table(1.0), block_size=block))
    assert lp.rank == 2 and lp.input_factors is not None and lp.input_factors.numel() == channels
    model = _check(module, fp, lp, x, ort=True, rel=1e-5)
    assert sum(n.op_type == "Add" and n.name.endswith("/lowrank/Add") for n in model.graph.node) == 1


def test_plan_round_trips_formats_and_branch(tmp_path) -> None:
    module, _ = single("matmul")
    lp = _weights(module, 4, "fp4", group=16)
    part, _ = decompose(module.layer, torch.ones(16), SvdQuantSettings(rank=2, alpha=0.5))
    lp = dataclasses.replace(part.attach(lp), input=ActQuant(4, True, 0, _table(0.01), format="fp4", block_size=16))
    plan = QuantPlan(num_train_timesteps=T, target="trt")
    plan.add(lp)
    meta = plan.save(tmp_path / "plan.safetensors")
    back = QuantPlan.load(tmp_path / "plan.safetensors", meta).layers["layer"]
    assert back.weight_format == "fp4" and back.weight_global_scale == lp.weight_global_scale and back.rank == 2
    assert back.input.format == "fp4" and back.input.block_size == 16
    assert torch.equal(back.dequantized_weight(), lp.dequantized_weight())
    with pytest.raises(DenoqError, match="fp8 weights must be held as"):
        dataclasses.replace(lp, weight_format="fp8", weight_int=lp.weight_int.to(torch.int8), weight_global_scale=None)
