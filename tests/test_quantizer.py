"""Quantizer semantics (ONNX QuantizeLinear exactly), observers, weight rounding and the QuantPlan files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from denoq.calibrators.observers import ObserverSettings, clip_range, observe_qparams, qparams
from denoq.calibrators.quantizer import dequantize, fake_quantize, quantize, symmetric_weight_quant
from denoq.errors import DenoqError
from denoq.plan import ActQuant, LayerPlan, QuantPlan, qrange


def onnx_quantize(x: np.ndarray, scale: float, zp: int, dtype: int) -> np.ndarray:
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", dtype, None)],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
                               helper.make_tensor("z", dtype, [], [zp])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return ReferenceEvaluator(model).run(None, {"x": x})[0]


def test_round_half_to_even_and_saturation():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 1000.0, -1000.0])
    assert quantize(x, torch.tensor(1.0), 0, -128, 127).tolist() == [0, 2, 2, 0, -2, -2, 127, -128]
    assert quantize(x, torch.tensor(1.0), 128, 0, 255).tolist() == [128, 130, 130, 128, 126, 126, 255, 0]


def test_division_not_reciprocal_multiply_matches_onnx():
    """ONNX divides by the scale; a multiply by 1/s (torch.fake_quantize_*) rounds differently at some values."""
    g = torch.Generator().manual_seed(0)
    scale = np.float32(0.1)
    # values one ulp from rounding ties, where x / s and x · (1 / s) land on different sides of .5
    ties = (torch.randint(-120, 120, (20000,), generator=g).float() + 0.5) * torch.tensor(scale)
    x = torch.nextafter(ties, ties + torch.randn(ties.shape, generator=g).sign()).numpy()
    ours = quantize(torch.from_numpy(x), torch.tensor(scale), 0, -128, 127).numpy()
    ref = onnx_quantize(x, float(scale), 0, TensorProto.INT8).astype(np.float32)
    np.testing.assert_array_equal(ours, ref)
    reciprocal = torch.round(torch.from_numpy(x) * (1 / torch.tensor(scale))).numpy()
    assert (reciprocal != ref).any(), "test data does not separate the two rounding orders"


def test_uint8_with_zero_point_matches_onnx():
    x = np.linspace(-3, 5, 1001, dtype=np.float32)
    scale, zp = qparams(-2.0, 4.0, 8, signed=False)
    ours = quantize(torch.from_numpy(x), torch.tensor(np.float32(scale)), zp, 0, 255).numpy()
    np.testing.assert_array_equal(ours, onnx_quantize(x, scale, zp, TensorProto.UINT8).astype(np.float32))
    assert float(dequantize(torch.tensor(float(zp)), torch.tensor(scale), zp)) == 0.0  # zero is exact


def test_symmetric_weight_quant_per_channel():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-3.0, 1.0, 2.0]])
    q, s = symmetric_weight_quant(w, 8)
    assert q.dtype == torch.int8
    torch.testing.assert_close(s, torch.tensor([1 / 127, 1.0, 3 / 127]))
    assert q[0].tolist() == [127, -64, 32] and q[1].tolist() == [0, 0, 0] and q[2, 0] == -127
    assert int(q.abs().max()) <= 127  # symmetric range, no -128


@pytest.mark.parametrize("signed", [True, False])
def test_minmax_range_covers_extremes(signed):
    v = torch.tensor([-1.0, 0.2, 3.0])
    lo, hi = clip_range(v, -1.0, 3.0, ObserverSettings("minmax", signed=signed))
    assert (lo, hi) == ((-3.0, 3.0) if signed else (-1.0, 3.0))


def test_large_magnitude_saturates_rho_over_levels():
    """Kim et al. (ECCV 2024): the clipping value leaves a fraction ρ/(2^b − 1) of values saturated."""
    v = torch.randn(400_000, generator=torch.Generator().manual_seed(0))
    for bits, rho in ((8, 1.0), (4, 1.0), (4, 2.0)):
        lo, hi = clip_range(v, float(v.min()), float(v.max()), ObserverSettings("large_magnitude", bits=bits,
                                                                                  lm_rho=rho))
        saturated = float((v.abs() > hi).float().mean())
        assert saturated == pytest.approx(rho / (2**bits - 1), rel=0.05)
        assert lo == -hi


def test_percentile_and_mse_clip_outliers():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(100_000, generator=g), torch.tensor([80.0])])  # one huge outlier
    amin, amax = float(v.min()), float(v.max())
    pct = clip_range(v, amin, amax, ObserverSettings("percentile", percentile=99.9))
    assert 3.0 < pct[1] < 3.6  # the 99.9th percentile of |N(0,1)| is ≈ 3.29
    settings = ObserverSettings("mse")
    mse_lo, mse_hi = clip_range(v, amin, amax, settings)
    assert mse_hi < amax  # it clips the outlier (how far depends on its weight in the mean)

    def err(lo: float, hi: float) -> float:
        s, z = qparams(lo, hi, 8, True)
        return float((fake_quantize(v, torch.tensor(s), z, *qrange(8, True)) - v).pow(2).mean())

    assert err(mse_lo, mse_hi) < err(-amax, amax)


def test_observe_qparams_asymmetric_contains_zero():
    v = torch.linspace(0.5, 4.0, 100)  # all positive (e.g. after an activation)
    s, z = observe_qparams(v, 0.5, 4.0, ObserverSettings("minmax", signed=False))
    assert z == 0 and s == pytest.approx(4.0 / 255)


def test_plan_roundtrip_and_validation(tmp_path):
    q, s = symmetric_weight_quant(torch.randn(4, 3, 3, 3), 8)
    table = torch.full((10,), 0.05)
    plan = QuantPlan(num_train_timesteps=10, target="trt")
    plan.add(LayerPlan("a.conv", "conv", 8, q, s, input=ActQuant(8, True, 0, table)))
    meta = plan.save(tmp_path / "plan.safetensors")
    back = QuantPlan.load(tmp_path / "plan.safetensors", meta)
    assert torch.equal(back.layers["a.conv"].weight_int, q)
    assert torch.equal(back.layers["a.conv"].input.scale, table)
    with pytest.raises(DenoqError, match="scale table"):
        plan.add(LayerPlan("b", "conv", 8, q, s, input=ActQuant(8, True, 0, torch.ones(7))))
    with pytest.raises(DenoqError, match="int8"):
        LayerPlan("c", "conv", 8, q.to(torch.int32), s)
    with pytest.raises(DenoqError, match="unknown target"):
        QuantPlan(10, "tflite")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(DenoqError, match="cannot read quantization plan"):
        QuantPlan.load(tmp_path / "bad.safetensors", meta)
