"""The PTQD correction head (docs/architecture.md, Correction head (PTQD); He et al., arXiv 2305.10657): three-executor
parity of `apply_head` (PyTorch), ONNX Runtime (unoptimized and fully optimized) and `onnx.reference` on batches
mixing timesteps, the graph pattern, composition with Q/DQ, and the errors.

Exactness argument: with dyadic weights, biases and inputs (multiples of 2^-4, small) every partial sum of the
convolution is representable in float32, so all executors compute the same ε_q bit for bit; with dyadic tables
(bias: multiples of 2^-4; 1/(1+k): multiples of 2^-3 in (0, 1]) Sub and Mul are exact too, so the headed outputs
must be equal, not close. On non-dyadic data and tables each executor's head is two correctly rounded float32 ops on
its own ε_q, so headed output == apply_head(that executor's unheaded output), again bit for bit.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
from _qdq_models import SingleT, dyadic_plan, export_fp, run_ort, run_reference, single, single_t, tiny

from denoq.errors import DenoqError
from denoq.passes import InsertQDQ, PassManager
from denoq.passes.ptqd_head import AppendPtqdHead, apply_head

T = 1000
MIXED_T = torch.tensor([999, 0, 500, 3], dtype=torch.int64)  # one batch, four different timesteps


@functools.lru_cache
def _dyadic_conv() -> tuple[torch.nn.Module, onnx.ModelProto]:
    """Conv2d(3→4, 3×3) with weights and bias on the 2^-4 grid, exported with `sample` [4, 3, 5, 5] and `timestep`."""
    torch.manual_seed(11)
    module = SingleT(torch.nn.Conv2d(3, 4, 3, padding=1)).eval()
    with torch.no_grad():
        module.layer.weight.copy_(torch.randint(-8, 9, module.layer.weight.shape).float() * 2.0**-4)
        module.layer.bias.copy_(torch.randint(-16, 17, module.layer.bias.shape).float() * 2.0**-4)
    fp = export_fp(module, (torch.zeros(4, 3, 5, 5), torch.zeros(4, dtype=torch.int64)), ["sample", "timestep"])
    return module, fp


def _dyadic_tables(channels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    bias = torch.randint(-16, 17, (T, channels), generator=gen).float() * 2.0**-4
    inv = torch.randint(4, 9, (T,), generator=gen).float() * 2.0**-3  # 1/(1+k) ∈ {0.5, …, 1}: k ∈ [0, 1]
    return bias, inv


def _random_tables(channels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    bias = 0.1 * torch.randn(T, channels, generator=gen)
    inv = 1 / (1 + 0.3 * torch.rand(T, generator=gen))
    return bias, inv


def _executors(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    return {"reference": run_reference(model, feeds), "ort-disable": run_ort(model, feeds, "disable"),
            "ort-all": run_ort(model, feeds, "all")}


# -- parity --------------------------------------------------------------------------------------------------

def test_three_executors_agree_exactly_on_a_mixed_batch() -> None:
    module, fp = _dyadic_conv()
    bias, inv = _dyadic_tables(4)
    head = AppendPtqdHead(bias, inv)
    model = PassManager([head], verify=True)(fp)[0]
    x = torch.randint(-64, 65, (4, 3, 5, 5)).float() * 2.0**-4
    with torch.no_grad():
        eps_q = module(x, MIXED_T)
    want = apply_head(eps_q, MIXED_T, bias, inv).numpy()
    # the head does something different per sample: each sample's own row of the tables
    for i, t in enumerate(MIXED_T.tolist()):
        np.testing.assert_array_equal(want[i], ((eps_q[i] - bias[t][:, None, None]) * inv[t]).numpy())
    assert len({float(inv[t]) for t in MIXED_T.tolist()}) > 1
    for name, (got,) in _executors(model, {"sample": x.numpy(), "timestep": MIXED_T.numpy()}).items():
        np.testing.assert_array_equal(got, want, err_msg=f"{name} vs apply_head")


def test_head_is_two_float32_ops_on_each_executors_own_output() -> None:
    """Non-dyadic model (Tiny: seven layers, two graph outputs) and tables: each executor's headed `out_sample`
    equals apply_head of its own unheaded `out_sample` bit for bit; the other output `head` is untouched."""
    _, fp = tiny()
    bias, inv = _random_tables(2, seed=1)
    head = AppendPtqdHead(bias, inv)
    model = PassManager([head], verify=True)(fp)[0]
    assert [o.name for o in model.graph.output] == ["out_sample", "head"]
    b32, inv32 = (torch.from_numpy(a) for a in head.tables())
    t = torch.tensor([900, 17], dtype=torch.int64)
    feeds = {"sample": torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2)).numpy(),
             "timestep": t.numpy()}
    before = _executors(fp, feeds)
    for name, (got, got_head) in _executors(model, feeds).items():
        eps_q, fp_head = before[name]
        want = apply_head(torch.from_numpy(eps_q), t, b32, inv32).numpy()
        np.testing.assert_array_equal(got, want, err_msg=name)
        np.testing.assert_array_equal(got_head, fp_head, err_msg=f"{name}: the other output changed")
        assert not np.array_equal(got, eps_q)


@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_composes_with_insert_qdq(target: str) -> None:
    """After InsertQDQ (ort-cpu: `out_sample` is a DequantizeLinear output) the head reads the quantized output."""
    module, fp = single_t("conv")
    qdq = InsertQDQ(dyadic_plan(module, target))
    bias, inv = _random_tables(6, seed=3)
    head = AppendPtqdHead(bias, inv)
    quantized = qdq(fp)
    headed, records = PassManager([qdq, head], verify=True)(fp)
    assert records[-1].nodes_added == {"Gather": 2, "Sub": 1, "Mul": 1} and not records[-1].nodes_removed
    b32, inv32 = (torch.from_numpy(a) for a in head.tables())
    t = torch.tensor([5, 600], dtype=torch.int64)
    x = torch.randint(-60, 61, (2, 4, 6, 6), generator=torch.Generator().manual_seed(4)).float() * 2.0**-4
    feeds = {"sample": x.numpy(), "timestep": t.numpy()}
    before = _executors(quantized, feeds)
    for name, (got,) in _executors(headed, feeds).items():
        want = apply_head(torch.from_numpy(before[name][0]), t, b32, inv32).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"{name} ({target})")


# -- graph ---------------------------------------------------------------------------------------------------

def test_graph_pattern() -> None:
    _, fp = single_t("conv")
    original = fp.SerializeToString()
    bias, inv = _random_tables(6)
    model = PassManager([AppendPtqdHead(bias, inv)], verify=True)(fp)[0]
    assert fp.SerializeToString() == original, "the input model must not change"
    assert [i.name for i in model.graph.input] == ["sample", "timestep"]
    assert [o.name for o in model.graph.output] == ["out_sample"]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 2 and all(n.input[1] == "timestep" for n in gathers)
    assert all(a.name != "axis" or a.i == 0 for n in gathers for a in n.attribute)
    mul = producers["out_sample"]
    assert mul.op_type == "Mul"
    sub, inv_gather = producers[mul.input[0]], producers[mul.input[1]]
    assert sub.op_type == "Sub" and inv_gather.op_type == "Gather"
    conv, bias_gather = producers[sub.input[0]], producers[sub.input[1]]
    assert conv.op_type == "Conv" and bias_gather.op_type == "Gather"
    assert sub.input[0] == "ptqd_head.eps_q"

    b_table, k_table = inits[bias_gather.input[0]], inits[inv_gather.input[0]]
    assert b_table.shape == (T, 6, 1, 1) and b_table.dtype == np.float32
    assert k_table.shape == (T, 1, 1, 1) and k_table.dtype == np.float32
    np.testing.assert_array_equal(b_table.reshape(T, 6), bias.numpy())
    np.testing.assert_array_equal(k_table.reshape(T), inv.numpy())
    assert sorted(n.op_type for n in model.graph.node) == ["Conv", "Gather", "Gather", "Mul", "Sub"]


# -- errors --------------------------------------------------------------------------------------------------

def _renamed_output(fp: onnx.ModelProto, name: str) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(fp)
    old = out.graph.output[0].name
    out.graph.output[0].name = name
    for node in out.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
    return out


@pytest.mark.parametrize("model,tables,match", [
    ("no_timestep", (6, 6), "no 'timestep' input"),
    ("gemm", (8, 8), "rank 2"),
    ("conv", (5, 5), "has 6 channels but the bias table has 5"),
    ("no_out_sample", (6, 6), "no 'out_sample' output"),
    ("twice", (6, 6), "append the head once"),
])
def test_graph_errors(model: str, tables: tuple[int, int], match: str) -> None:
    fp = {"no_timestep": lambda: single("conv")[1], "gemm": lambda: single_t("gemm")[1],
          "conv": lambda: single_t("conv")[1], "no_out_sample": lambda: _renamed_output(single_t("conv")[1], "eps"),
          "twice": lambda: AppendPtqdHead(*_random_tables(6))(single_t("conv")[1])}[model]()
    head = AppendPtqdHead(*_random_tables(tables[0]))
    with pytest.raises(DenoqError, match=match) as err:
        head(fp)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bias,inv,match", [
    (torch.zeros(10, 6), torch.ones(9), "10 timesteps but 1/\\(1\\+k\\) has 9"),
    (torch.zeros(10), torch.ones(10), "expected \\[T, C\\]"),
    (torch.zeros(10, 6), torch.ones(10, 1), "expected \\[T\\]"),
    (torch.zeros(10, 6).index_put_((torch.tensor(3), torch.tensor(2)), torch.tensor(float("nan"))), torch.ones(10),
     "bias table is not finite in float32 \\(first at timestep 3\\)"),
    (torch.zeros(10, 6), torch.tensor([1.0] * 7 + [float("inf")] * 3), "1/\\(1\\+k\\) table is not finite"),
    (np.zeros((10, 6)), np.full(10, 1e300), "not finite in float32"),  # float64 overflows in the graph's type
])
def test_table_errors(bias, inv, match: str) -> None:
    with pytest.raises(DenoqError, match=match) as err:
        AppendPtqdHead(bias, inv)
    assert "\n" not in str(err.value)
