"""INT4 and blocked weights in InsertQDQ (docs/architecture.md: Quantizer semantics, Targets and their rules).

MatMul / Gemm weights of ≤ 4 bits are ONNX `int4`; Conv weights stay in the int8 container; a plan's `block_size`
B becomes `DequantizeLinear(axis=<input-channel axis>, block_size=B)` with scales shaped like the weight, that axis
divided by B (a conv's repeated over kh, kw).

Parity follows tests/test_passes.py: the plans are dyadic (power-of-two scales varying along both the output
channels and the blocks, so a wrong axis, transpose or block layout shows; inputs on a 2^-4 grid), so every value
every executor computes is exact in float32 and the simulation (`SimulatedLayer`), `onnx.reference` and ONNX
Runtime (unoptimized and fully optimized) must agree bit for bit, with int8 activations (`trt`), uint8 activations
and outputs (`ort-cpu`) and without activation quantizers (W4A16: weights only).

ORT 1.31 limitation (measured): at `ORT_ENABLE_ALL` a weight-only `DQ → MatMul` (float activations; int4 or int8,
per channel on axis 1, or blocked on axis 0 with B ≥ 16 a power of two) is fused into `MatMulNBits` with the
session's `session.qdq_matmulnbits_accuracy_level`, default 4 = int8 compute: ORT then quantizes the activations
to int8 on the fly and no longer computes what the Q/DQ graph says. With that entry at 1 (float32) it is exact,
so the engine's `session_options` and the fused executor here set it; `test_ort_default_matmulnbits_is_close_not_exact`
bounds the default's error.
A second one: ORT's QDQ fusions ignore `block_size` on 8-bit weights: a blocked int8 `DQ → MatMul` with quantized
activations becomes MatMulIntegerToFloat (int8, 3-D input) or QLinearMatMul (uint8), which then fail at run time
("Per-column quantization parameter of batched matrix should have same dimension …", "QLinearMatmul : weight zero
point must be a scalar …"). Without `QDQSelectorActionTransformer` they run exactly, so the engine's
`disabled_optimizers` turns it off for graphs with blocked 8-bit weights; int4 weights and Conv / Gemm are not
affected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io

import numpy as np
import onnx
import pytest
import torch
from _qdq_models import (
    SINGLE_SHAPES,
    Single,
    dyadic_biases,
    dyadic_plan,
    export_fp,
    run_ort,
    run_reference,
    single_t,
    tiny,
)
from test_selector import _sim

from denoq.errors import DenoqError
from denoq.layermap import read_layer_map
from denoq.passes import InsertQDQ, PassManager
from denoq.plan import LayerPlan, QuantPlan, qrange

ACTS = ("trt", "ort-cpu", "none")  # none: no activation quantizers (W4A16 / W8A16)
BLOCKS = {"conv": (0, 2, 4), "gemm": (0, 4, 16), "matmul": (0, 4, 16)}  # conv: 4 input channels, linear: 16
CASES = [(kind, bits, block) for kind in BLOCKS for bits in (3, 4, 8) for block in BLOCKS[kind]]
FP32_MATMULNBITS = {"session.qdq_matmulnbits_accuracy_level": "1"}


EXECUTORS = {"reference": run_reference, "ort-disable": lambda m, f: run_ort(m, f, "disable"),
             "ort-all": lambda m, f: run_ort(m, f, "all", FP32_MATMULNBITS)}


def weight_plan(module: torch.nn.Module, bits: int, block: int, acts: str, seed: int = 0) -> QuantPlan:
    """`dyadic_plan`'s activations (`acts`, or none at all; output step 2^-4 below 8 bits) with symmetric
    `bits`-bit integer weights in [-qmax, qmax] (both ends present) and power-of-two scales 2^-(5 + (o + 2j) mod 3)
    for output channel o and input block j (per output channel when `block` is 0)."""
    base = dyadic_plan(module, "trt" if acts == "none" else acts, out_scale=2.0**-2 if bits == 8 else 2.0**-4)
    gen = torch.Generator().manual_seed(seed)
    qmax = qrange(bits, signed=True)[1]
    plan = QuantPlan(num_train_timesteps=base.num_train_timesteps, target=base.target)
    for lp in base.layers.values():
        out, cin = lp.weight_int.shape[:2]
        q = torch.randint(-qmax, qmax + 1, lp.weight_int.shape, generator=gen).to(torch.int8)
        q.view(-1)[:2] = torch.tensor([-qmax, qmax], dtype=torch.int8)
        e = (torch.arange(out)[:, None] + 2 * torch.arange(1 if block == 0 else cin // block)[None, :]) % 3
        s = (2.0 ** -(5 + e)).to(torch.float32)
        plan.add(dataclasses.replace(lp, weight_bits=bits, weight_int=q, weight_scale=s[:, 0] if block == 0 else s,
                                     block_size=block, input=None if acts == "none" else lp.input,
                                     output=None if acts == "none" else lp.output))
    return plan


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _weight_dq(model: onnx.ModelProto, module: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == f"{module}/weight/DequantizeLinear")


def _attrs(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _x(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(-20, 21, shape, generator=torch.Generator().manual_seed(seed)).float() * 2.0**-4


# -- parity ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("acts", ACTS)
@pytest.mark.parametrize("kind,bits,block", CASES)
def test_single_layer_exact_in_every_executor(kind: str, bits: int, block: int, acts: str) -> None:
    """Conv (int8 container), Gemm (transB=1, blocked on axis 1) and MatMul on a 3-D input ([in, out] weight,
    blocked on axis 0) at 3, 4 and 8 bits, per channel and blocked, with and without activation quantizers."""
    module, fp = single_t(kind)
    plan = weight_plan(module, bits, block, acts)
    model = PassManager([InsertQDQ(plan)], verify=True)(fp)[0]
    x, t = _x(SINGLE_SHAPES[kind], 7), torch.tensor([3] * SINGLE_SHAPES[kind][0])
    (want,) = _sim(module, plan, x, t)
    assert len(np.unique(want)) > 10, "the quantized layer must not collapse to a few values"
    for name, run in EXECUTORS.items():
        (got,) = run(model, {"sample": x.numpy(), "timestep": t.numpy()})
        np.testing.assert_array_equal(got, want, err_msg=f"{name} vs torch ({kind}, W{bits} B{block}, {acts})")


@pytest.mark.parametrize("acts", ACTS)
@pytest.mark.parametrize("bits,block", [(4, 0), (4, 2), (8, 2)])
def test_tiny_model_exact_in_every_executor(bits: int, block: int, acts: str) -> None:
    """Seven layers: convs, three 3-D MatMuls sharing one input, a Gemm head, residuals, two outputs. Quantized
    activations put every layer's input back on a dyadic grid: exact. Without them (weights only) the values
    leave the grid (to_q · to_k, means), so the executors agree to float rounding, 1e-5 of each output's range."""
    module, fp = tiny()
    plan = weight_plan(module, bits, block, acts)
    model = PassManager([InsertQDQ(plan)], verify=True)(fp)[0]
    x, t = _x((2, 2, 4, 4), 3), torch.tensor([3, 7])
    want = _sim(module, plan, x, t)
    for name, run in EXECUTORS.items():
        got = run(model, {"sample": x.numpy(), "timestep": t.numpy()})
        for g, w in zip(got, want, strict=True):
            msg = f"{name} vs torch (W{bits} B{block}, {acts})"
            if acts == "none":
                np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=msg)
            else:
                np.testing.assert_array_equal(g, w, err_msg=msg)


def test_blocked_scales_differ_from_per_channel() -> None:
    """A block layout taken along the wrong axis or ignored would give other numbers: the simulation differs
    between per-channel and blocked plans with the same integers, and the graph follows each."""
    module, fp = single_t("matmul")
    blocked = weight_plan(module, 4, 4, "none")
    lp = blocked.layers["layer"]
    per_channel = QuantPlan(num_train_timesteps=blocked.num_train_timesteps, target=blocked.target)
    per_channel.add(dataclasses.replace(lp, weight_scale=lp.weight_scale[:, 0].contiguous(), block_size=0))
    x, t = _x(SINGLE_SHAPES["matmul"], 8), torch.tensor([0, 0])
    want_b, want_c = _sim(module, blocked, x, t)[0], _sim(module, per_channel, x, t)[0]
    assert not np.array_equal(want_b, want_c)
    for plan, want in ((blocked, want_b), (per_channel, want_c)):
        (got,) = run_reference(InsertQDQ(plan)(fp), {"sample": x.numpy(), "timestep": t.numpy()})
        np.testing.assert_array_equal(got, want)


def rtn_plan(module: torch.nn.Module, bits: int, block: int) -> QuantPlan:
    """Round-to-nearest symmetric `bits`-bit weights of every Linear, scales per row and block (weights only)."""
    plan = QuantPlan(num_train_timesteps=10, target="trt")
    qmax = qrange(bits, signed=True)[1]
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight.detach().reshape(m.out_features, -1, block)
            s = (w.abs().amax(dim=2) / qmax).to(torch.float32)
            q = torch.clamp(torch.round(w / s[:, :, None]), -qmax, qmax).reshape(m.weight.shape).to(torch.int8)
            plan.add(LayerPlan(name=name, op="linear", weight_bits=bits, weight_int=q, weight_scale=s,
                               block_size=block))
    return plan


@pytest.mark.parametrize("block", [4, 16])
def test_ort_default_matmulnbits_is_close_not_exact(block: int) -> None:
    """W4A16 MatMul under ORT's defaults (as `run_ort` in _qdq_models and the engine create sessions): where ORT
    fuses the weight DQ into MatMulNBits (B = 16 here, not B = 4) at accuracy level 4 it quantizes the activations
    to int8 on the fly. Its difference from the simulation stays a small fraction of the W4 quantization error
    itself (docs/architecture.md: parity against the quantization error); float32 MatMulNBits agrees to float
    rounding."""
    module, fp = single_t("matmul")
    plan = rtn_plan(module, 4, block)
    model = InsertQDQ(plan)(fp)
    x, t = 2 * torch.randn(SINGLE_SHAPES["matmul"], generator=torch.Generator().manual_seed(9)), torch.tensor([0, 0])
    feeds = {"sample": x.numpy(), "timestep": t.numpy()}
    (want,) = _sim(module, plan, x, t)
    with torch.no_grad():
        quant_error = np.abs(want - module(x, t).numpy()).max()
    (default,) = run_ort(model, feeds)
    (fp32,) = run_ort(model, feeds, "all", FP32_MATMULNBITS)
    np.testing.assert_allclose(fp32, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.abs(default - want).max() <= 0.2 * quant_error


# -- graph ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [3, 4])
def test_graph_pattern_low_bit_blocked(bits: int) -> None:
    """MatMul / Gemm: INT4 weights and zero points, DQ(axis = the input axis the layer map implies, block_size);
    Conv: INT8 container with values in [-qmax, qmax], DQ(axis=1, block_size), scales repeated over kh, kw."""
    module, fp = tiny()
    plan = weight_plan(module, bits, 2, "trt")
    model = InsertQDQ(plan)(fp)
    lmap, inits = read_layer_map(model), _inits(model)
    qmax = qrange(bits, signed=True)[1]
    for name, lp in plan.layers.items():
        ref = lmap[name]
        dq = _weight_dq(model, name)
        w, s, z = (inits[i] for i in dq.input)
        in_axis = 0 if ref.transposed else 1
        assert _attrs(dq) == {"axis": in_axis, "block_size": 2}, name
        ints = lp.weight_int.numpy().T if ref.transposed else lp.weight_int.numpy()
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(w).astype(np.int8), ints, err_msg=name)
        want_type = onnx.TensorProto.INT8 if ref.op_type == "Conv" else onnx.TensorProto.INT4
        assert w.data_type == z.data_type == want_type, name
        assert -qmax <= ints.min() and ints.max() <= qmax
        shape = list(w.dims)
        shape[in_axis] //= 2
        assert list(s.dims) == list(z.dims) == shape, name
        assert not onnx.numpy_helper.to_array(z).astype(np.int8).any()
        scale = lp.weight_scale.numpy()  # [out, in / 2]
        if ref.op_type == "Conv":
            scale = np.broadcast_to(scale[:, :, None, None], shape)
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(s), scale.T if ref.transposed else scale, name)
        assert ref.op_type != "Conv" or len(shape) == 4


@pytest.mark.parametrize("bits,qtype", [(4, onnx.TensorProto.INT4), (8, onnx.TensorProto.INT8)])
def test_graph_pattern_per_channel(bits: int, qtype: int) -> None:
    """Per channel: DQ(axis=weight_axis) without block_size, scale and zero point [out], for 8 bits and for Conv's
    int8 container; an INT4 MatMul / Gemm weight is one block spanning its whole row (TensorRT takes INT4 blocked
    only): block_size = input channels, scale [out, 1] in ONNX layout, the same dequantized weight."""
    module, fp = tiny()
    plan = weight_plan(module, bits, 0, "trt")
    model = InsertQDQ(plan)(fp)
    lmap, inits = read_layer_map(model), _inits(model)
    for name, ref in lmap.items():
        dq = _weight_dq(model, name)
        w, s, z = (inits[i] for i in dq.input)
        assert w.data_type == z.data_type == (onnx.TensorProto.INT8 if ref.op_type == "Conv" else qtype), name
        if w.data_type == onnx.TensorProto.INT4:
            in_axis = 0 if ref.transposed else 1
            assert _attrs(dq) == {"axis": in_axis, "block_size": int(w.dims[in_axis])}, name
            shape = list(w.dims)
            shape[in_axis] = 1
            assert list(s.dims) == list(z.dims) == shape, name
            scale = plan.layers[name].weight_scale.numpy().reshape(-1, 1)
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(s), scale.T if ref.transposed else scale)
        else:
            assert _attrs(dq) == {"axis": ref.weight_axis}, name
            assert list(s.dims) == list(z.dims) == [w.dims[ref.weight_axis]], name


def test_int4_weights_halve_the_weight_bytes() -> None:
    """Linear(256 → 128) on [B, L, C] (MatMul): the int4 model file is smaller by about half the weight count in
    bytes (two int4 values per byte), the int4 weight initializer holds exactly n / 2 bytes; both run in ORT."""
    torch.manual_seed(4)
    module = dyadic_biases(Single(torch.nn.Linear(256, 128))).eval()
    with contextlib.redirect_stdout(io.StringIO()):
        fp = export_fp(module, (torch.zeros(1, 4, 256),), ["sample"])
    n = 256 * 128
    sizes, outs = {}, {}
    x = _x((1, 4, 256), 2).numpy()
    for bits in (4, 8):
        model = InsertQDQ(weight_plan(module, bits, 32, "none"))(fp)
        sizes[bits] = len(model.SerializeToString())
        w = _inits(model)["layer.weight_quantized"]
        assert len(w.raw_data) == (n // 2 if bits == 4 else n)
        outs[bits] = run_ort(model, {"sample": x}, "all", FP32_MATMULNBITS)[0]
        np.testing.assert_array_equal(outs[bits], run_reference(model, {"sample": x})[0])
    saved = sizes[8] - sizes[4]
    assert sizes[4] < sizes[8] and 0.45 * n <= saved <= 0.55 * n, sizes


# -- errors ------------------------------------------------------------------------------------------------

def _edit(kind: str, **changes) -> tuple[QuantPlan, onnx.ModelProto]:
    module, fp = single_t(kind)
    plan = weight_plan(module, 4, 0, "trt")
    plan.layers["layer"] = dataclasses.replace(plan.layers["layer"], **changes)
    return plan, fp


def _old_opset(fp: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(fp)
    next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 19
    return model


ERRORS = {
    "block not dividing gemm": (lambda: _edit("gemm", block_size=3, weight_scale=torch.ones(8, 5)), None,
                                r"block size 3 does not divide its 16 input channels; set weights.group_size to a "
                                r"divisor of 16"),
    "block not dividing conv": (lambda: _edit("conv", block_size=3, weight_scale=torch.ones(6, 1)), None,
                                r"block size 3 does not divide its 4 input channels"),
    "int4 above range": (lambda: _edit("matmul", weight_int=torch.full((8, 16), 8, dtype=torch.int8)), None,
                         r"span \[8, 8\], outside the 4-bit range \[-8, 7\]; the plan is corrupt, recalibrate"),
    "int3 below range": (lambda: _edit("conv", weight_bits=3, weight_int=torch.full((6, 4, 3, 3), -5,
                                                                                    dtype=torch.int8)), None,
                         r"outside the 3-bit range \[-4, 3\]"),
    "weight bits": (lambda: _edit("gemm", weight_bits=9), None, r"weights have 9 bits;.*set weights.bits"),
    "int4 needs opset 21": (lambda: _edit("matmul"), _old_opset,
                            r"4-bit int4 weights need ONNX opset >= 21 .*; re-export with opset_version=21"),
    "blocked needs opset 21": (lambda: _edit("conv", weight_bits=8, block_size=2, weight_scale=torch.ones(6, 2)),
                               _old_opset, r"blocked weights \(block size 2\) need ONNX opset >= 21"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_plans_are_one_line_errors(case: str) -> None:
    make, edit_model, message = ERRORS[case]
    plan, fp = make()
    with pytest.raises(DenoqError, match=message) as info:
        InsertQDQ(plan)(fp if edit_model is None else edit_model(fp))
    assert "\n" not in str(info.value) and ";" in str(info.value)  # one line: problem; fix
