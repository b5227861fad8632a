"""4- and 6-bit activations in InsertQDQ (docs/architecture.md, Quantizer semantics): ONNX `int4` / `uint4` Q/DQ for A4,
`Q → Clip(qmin, qmax) → DQ` in the 8-bit container for A6, as the simulation quantizes with `qrange(bits, signed)`.

Parity follows tests/test_selector.py: on dyadic plans every executor computes every value exactly, so the
simulation, `onnx.reference` and ONNX Runtime (unoptimized and fused) must agree bit for bit, with constant tables
and with four timestep groups on a batch mixing groups.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from _qdq_models import SINGLE_SHAPES, dyadic_plan, grouped, run_ort, run_reference, single, tiny
from test_selector import GROUP_T, _sim, _timesteps

from denoq.errors import DenoqError
from denoq.layermap import read_layer_map
from denoq.passes import InsertQDQ, PassManager
from denoq.plan import ActQuant, QuantPlan, qrange

TARGETS = ("trt", "ort-cpu")
BITS = (4, 6)
T = 1000
SCALES = {4: (2.0**-1, 2.0**1), 6: (2.0**-3, 2.0**-1), 8: (2.0**-3, 2.0**-2)}  # (input, output): ranges in use
EXECUTORS = {"reference": run_reference, "ort-disable": lambda m, f: run_ort(m, f, "disable"), "ort-all": run_ort}
BITS_TARGETS = [(b, t) for b in BITS for t in TARGETS]
ZERO_POINT_TYPES = {(4, True): onnx.TensorProto.INT4, (4, False): onnx.TensorProto.UINT4,
                    (6, True): onnx.TensorProto.INT8, (6, False): onnx.TensorProto.UINT8,
                    (8, True): onnx.TensorProto.INT8, (8, False): onnx.TensorProto.UINT8}


def low_bit(plan: QuantPlan, bits: int) -> QuantPlan:
    """`plan` with `bits`-bit activations: zero point 0 when signed, else mid-range 2^(bits-1) (128 at 8 bits)."""
    def requant(q: ActQuant | None) -> ActQuant | None:
        return None if q is None else dataclasses.replace(q, bits=bits, zero_point=0 if q.signed else 2 ** (bits - 1))

    out = QuantPlan(num_train_timesteps=plan.num_train_timesteps, target=plan.target)
    for lp in plan.layers.values():
        out.add(dataclasses.replace(lp, input=requant(lp.input), output=requant(lp.output)))
    return out


def dyadic_low_bit(module: torch.nn.Module, target: str, bits: int, groups: int) -> QuantPlan:
    """The dyadic plan at `bits` with scales suiting that range, over `groups` timestep groups (1 = constant)."""
    act_scale, out_scale = SCALES[bits]
    factors = [1.0, 2.0, 0.5, 4.0][:groups]
    return grouped(low_bit(dyadic_plan(module, target, act_scale=act_scale, out_scale=out_scale), bits), T,
                   factors, factors)


def _tensor_inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def _consumers(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if tensor in n.input]


# -- parity ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("bits,target", BITS_TARGETS)
def test_tiny_model_exact_in_every_executor(bits: int, target: str, groups: int) -> None:
    """Seven layers (Conv, 3-D MatMul with a shared input, Gemm), residuals, two outputs; constant tables and
    timestep groups, one batch per group and a batch mixing groups. Executors run in EXECUTORS' order, so the
    reference and unoptimized ORT are checked before a fused session is created."""
    module, fp = tiny()
    plan = dyadic_low_bit(module, target, bits, groups)
    model = PassManager([InsertQDQ(plan)], verify=True)(fp)[0]
    assert any(n.op_type == "Gather" for n in model.graph.node) == (groups > 1)
    x = torch.randint(-40, 41, (2, 2, 4, 4), generator=torch.Generator().manual_seed(3)).float() * 2.0**-4
    outs = []
    for t in _timesteps(x.shape[0]):
        want = _sim(module, plan, x, t)
        outs.append(want[0])
        assert len(np.unique(want[0])) > 8, "the quantized model must not collapse to a few values"
        for name, run in EXECUTORS.items():
            got = run(model, {"sample": x.numpy(), "timestep": t.numpy()})
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w, err_msg=f"{name} vs torch (A{bits}, {target}, t={t.tolist()})")
    assert (groups > 1) != np.array_equal(outs[0], outs[1]), "groups quantize differently, one group does not"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits", BITS)
def test_low_bits_differ_from_8_bits(bits: int, target: str) -> None:
    """The same scales at 8 bits give other results: the parity above is not 8-bit parity by accident."""
    module, _ = tiny()
    plan = dyadic_low_bit(module, target, bits, 1)
    x = torch.randint(-40, 41, (2, 2, 4, 4), generator=torch.Generator().manual_seed(3)).float() * 2.0**-4
    t = torch.tensor(GROUP_T[:2])
    assert not np.array_equal(_sim(module, plan, x, t)[0], _sim(module, low_bit(plan, 8), x, t)[0])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits", BITS)
def test_values_saturate_at_the_low_bit_range(bits: int, target: str) -> None:
    """Inputs far beyond the range give exactly (qmax − z)·s and (qmin − z)·s after the input DQ (and, on
    ort-cpu, at the quantized graph output): an 8-bit container without Clip or int4 type would pass ±127·s."""
    module, fp = single("gemm")
    plan = low_bit(dyadic_plan(module, target, act_scale=2.0**-3, out_scale=2.0**-4), bits)
    model = InsertQDQ(plan)(fp)
    model.graph.output.append(onnx.helper.make_tensor_value_info("layer.input_dequantized", onnx.TensorProto.FLOAT,
                                                                 None))
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(-40, 41, SINGLE_SHAPES["gemm"], generator=gen).float() * 2.0**-5
    x[0, :4] = torch.tensor([1000.0, -1000.0, 7.0, -7.0])
    x = x.numpy()
    lp = plan.layers["layer"]
    lo, hi = qrange(bits, lp.input.signed)
    s, z = lp.input.scale[0].item(), lp.input.zero_point
    want = ((np.clip(np.round(x / s) + z, lo, hi) - z) * s).astype(np.float32)
    assert want.max() == (hi - z) * s and want.min() == (lo - z) * s
    assert ((want > (lo - z) * s) & (want < (hi - z) * s)).mean() > 0.5, "most values are not saturated"
    for name, run in EXECUTORS.items():
        out, x_hat = run(model, {"sample": x})
        np.testing.assert_array_equal(x_hat, want, err_msg=f"{name}: input DQ (A{bits}, {target})")
        if lp.output is not None:
            s_out, z_out = lp.output.scale[0].item(), lp.output.zero_point
            assert out.max() == (hi - z_out) * s_out and out.min() == (lo - z_out) * s_out, name


# -- graph ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_graph_pattern(bits: int, target: str, groups: int) -> None:
    """Every activation Q: the zero point's type for `bits`, and Q → DQ (A4, A8) or Q → Clip(qrange) → DQ (A6)."""
    module, fp = tiny()
    model = InsertQDQ(dyadic_low_bit(module, target, bits, groups))(fp)
    inits = _tensor_inits(model)
    signed = target == "trt"
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == (5 if signed else 12)  # 5 input pairs (to_q/to_k/to_v share one), 7 outputs on ort-cpu
    for q in qs:
        zp = inits[q.input[2]]
        assert zp.data_type == ZERO_POINT_TYPES[(bits, signed)] and zp.dims == [], q.name
        (after,) = _consumers(model, q.output[0])
        if bits == 6:
            assert after.op_type == "Clip", q.name
            bounds = [inits[b] for b in after.input[1:]]
            assert [b.data_type for b in bounds] == [zp.data_type] * 2
            assert tuple(int(onnx.numpy_helper.to_array(b)) for b in bounds) == qrange(6, signed)
            (after,) = _consumers(model, after.output[0])
        assert after.op_type == "DequantizeLinear" and after.input[1:] == q.input[1:], q.name
    assert any(n.op_type == "Clip" for n in model.graph.node) == (bits == 6)


@pytest.mark.parametrize("other", [4, 6, 8])
@pytest.mark.parametrize("bits", BITS)
def test_shared_input_pair_needs_identical_bits(bits: int, other: int) -> None:
    """to_q / to_k / to_v read one tensor: one quantizer, unless to_v's has other bits (same scale, zero point)."""
    module, fp = tiny()
    plan = low_bit(dyadic_plan(module, "trt"), bits)
    plan.layers["attn.to_v"].input = dataclasses.replace(plan.layers["attn.to_v"].input, bits=other)
    model = InsertQDQ(plan)(fp)
    to_q = next(n for n in model.graph.node if n.name == read_layer_map(model)["attn.to_q"].node)
    q = _producer(model, to_q.input[0])  # the DQ, then Clip (A6), then Q
    while q.op_type != "QuantizeLinear":
        q = _producer(model, q.input[0])
    readers = [n for n in _consumers(model, q.input[0]) if n.op_type == "QuantizeLinear"]
    assert len(readers) == (1 if other == bits else 2)


@pytest.mark.parametrize("out_bits,in_bits,reused", [(6, 6, True), (4, 4, True), (8, 6, False), (6, 8, False),
                                                      (6, 4, False), (4, 8, False)])
def test_output_reused_as_next_input_only_with_identical_bits(out_bits: int, in_bits: int, reused: bool) -> None:
    """conv_mid's quantized output feeds conv_out: with the same scale, zero point 0 and signedness it is read
    as it is only when the bits (hence the integer type and range) match too; the executors agree either way."""
    module, fp = tiny()
    plan = dyadic_plan(module, "ort-cpu")
    s = torch.full((plan.num_train_timesteps,), 2.0**-2)
    plan.layers["conv_mid"].output = ActQuant(out_bits, True, 0, s)
    plan.layers["conv_out"].input = ActQuant(in_bits, True, 0, s)
    model = PassManager([InsertQDQ(plan)], verify=True)(fp)[0]
    lmap = read_layer_map(model)
    conv_out = next(n for n in model.graph.node if n.name == lmap["conv_out"].node)
    assert (_producer(model, conv_out.input[0]).name == "conv_mid/output/DequantizeLinear") == reused
    assert any(n.name == "conv_out/input/QuantizeLinear" for n in model.graph.node) != reused
    x = torch.randint(-40, 41, (2, 2, 4, 4), generator=torch.Generator().manual_seed(5)).float() * 2.0**-4
    t = torch.tensor([3, 7])
    want = _sim(module, plan, x, t)
    for name, run in EXECUTORS.items():
        for g, w in zip(run(model, {"sample": x.numpy(), "timestep": t.numpy()}), want, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=name)


# -- errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["input", "output"])
@pytest.mark.parametrize("bits", [2, 3, 5, 7, 16])
def test_unsupported_bits_are_a_clear_error(bits: int, role: str) -> None:
    module, fp = single("conv")
    plan = dyadic_plan(module, "ort-cpu")
    q = ActQuant(bits, False, 0, torch.full((plan.num_train_timesteps,), 0.1))
    plan.layers["layer"] = dataclasses.replace(plan.layers["layer"], **{role: q})
    with pytest.raises(DenoqError) as info:
        InsertQDQ(plan)(fp)
    assert str(info.value) == (f"layer layer: {role} activations have {bits} bits; insert_qdq supports 4-, 6- and "
                               "8-bit activations, set activations.bits to 4, 6 or 8")
