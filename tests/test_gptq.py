"""OBQ and GPTQ weight rounding (denoq.calibrators.gptq): the Hessian, the layouts, and the solvers' math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from denoq.calibrators.gptq import GptqSettings, gptq, group_columns, layer_output_error, layer_plan, obq, rtn
from denoq.calibrators.layer_matrix import HessianAccumulator, from_matrix, layer_inputs, weight_matrix
from denoq.calibrators.quantizer import symmetric_weight_quant
from denoq.errors import DenoqError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2XXᵀ/N of inputs given as rows `[N, cols]`, directly."""
    x = x.double()
    return 2 * x.T @ x / x.shape[0]


def correlated_inputs(cols: int, n: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    """Rows of X with covariance AAᵀ + noise²·I (A `[cols, rank]`): low rank plus noise."""
    g = gen(seed)
    a = torch.randn(cols, rank, generator=g)
    return (a @ torch.randn(rank, n, generator=g) + noise * torch.randn(cols, n, generator=g)).T


def dampened(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    return h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)


# -- Hessian and layouts ---------------------------------------------------------------------------------------
def test_linear_hessian_is_2xxt_over_n_across_batches():
    lin = nn.Linear(12, 5)
    g = gen(0)
    batches = [torch.randn(b, 3, 12, generator=g) for b in (2, 5, 1)]
    acc = HessianAccumulator(lin)
    handle = acc.attach()
    for x in batches:
        lin(x)
    handle.remove()
    lin(torch.randn(4, 12))  # not recorded after remove()
    expected = hessian(torch.cat([x.reshape(-1, 12) for x in batches]))
    assert acc.count == 8 * 3
    torch.testing.assert_close(acc.hessian, expected, rtol=1e-12, atol=1e-12)


def test_conv_hessian_matches_unfold_of_all_data():
    conv = nn.Conv2d(3, 4, kernel_size=(3, 2), stride=2, padding=(1, 2), dilation=(2, 1))
    g = gen(1)
    batches = [torch.randn(b, 3, 9, 8, generator=g) for b in (2, 3)]
    acc = HessianAccumulator(conv)
    for x in batches:
        acc.add(x)
    patches = F.unfold(torch.cat(batches), (3, 2), dilation=(2, 1), padding=(1, 2), stride=2)  # [B, cols, L]
    expected = hessian(patches.transpose(1, 2).reshape(-1, 3 * 3 * 2))
    assert acc.count == patches.shape[0] * patches.shape[2]
    torch.testing.assert_close(acc.hessian, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 2},
    {"kernel_size": (2, 3), "padding": "same", "dilation": (1, 2)},
    {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    {"kernel_size": 1},
])
def test_weight_matrix_times_unfolded_input_is_the_conv(kwargs):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, bias=False, **kwargs)
    x = torch.randn(2, 3, 8, 7)
    y = conv(x)
    ours = layer_inputs(conv, x) @ weight_matrix(conv).T  # [B·L, out]
    torch.testing.assert_close(ours, y.permute(0, 2, 3, 1).reshape(-1, 5), rtol=1e-5, atol=1e-5)
    assert torch.equal(from_matrix(conv, weight_matrix(conv)), conv.weight)


def test_rtn_8bit_per_row_is_symmetric_weight_quant():
    torch.manual_seed(3)
    for module in (nn.Linear(40, 7), nn.Conv2d(6, 5, 3)):
        module.weight.data[1] = 0  # all-zero row: scale 1
        wq = rtn(weight_matrix(module), GptqSettings(bits=8))
        q, s = symmetric_weight_quant(module.weight, 8)
        assert torch.equal(from_matrix(module, wq.q), q)
        assert torch.equal(wq.scale[:, 0], s) and wq.scale.shape == (module.weight.shape[0], 1)


@pytest.mark.parametrize("bits,group_size", [(8, 0), (4, 0), (4, 2), (3, 4)])
def test_integers_scales_and_dequantization_follow_the_plan_layout(bits, group_size):
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 6, 3)
    x = torch.randn(4, 8, 7, 7)
    acc = HessianAccumulator(conv)
    acc.add(x)
    settings = GptqSettings(bits=bits, group_size=group_size)
    cpg = group_columns(conv, group_size)
    assert cpg == group_size * 9  # a group of input channels spans group_size·kh·kw columns
    w = weight_matrix(conv)
    qmax = 2 ** (bits - 1) - 1
    for method in (gptq, obq):
        wq = method(w, acc.hessian, settings, cpg)
        n_groups = 1 if group_size == 0 else 8 // group_size
        assert wq.q.dtype == torch.float32 and torch.equal(wq.q, wq.q.round()) and wq.q.shape == (6, 72)
        assert wq.scale.dtype == torch.float32 and wq.scale.shape == (6, n_groups)
        assert int(wq.q.abs().max()) <= qmax and int(wq.q.abs().max()) >= qmax - 1
        per_column = wq.scale.repeat_interleave(72 // n_groups, dim=1)
        assert torch.equal(wq.dequantized(), wq.q.float() * per_column)
        plan = layer_plan("conv", conv, wq, settings)
        assert plan.block_size == group_size and plan.weight_int.shape == conv.weight.shape
        assert torch.equal(plan.dequantized_weight(), from_matrix(conv, wq.dequantized()))
        # each weight is within the few steps of its own group's grid that error compensation moves it
        assert float(((w - wq.dequantized()).abs() / per_column).max()) < 4
    static = gptq(w, acc.hessian, GptqSettings(bits=bits, group_size=group_size, static_groups=True), cpg)
    assert torch.equal(static.scale, rtn(w, settings, cpg).scale)  # static scales: from the original W


# -- the solvers' math -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group_size", [(4, 0), (3, 8), (8, 16)])
def test_without_correlation_gptq_and_obq_are_rtn(bits, group_size):
    """H diagonal: no other weight can absorb an error, so nothing moves and every method rounds to nearest."""
    w = torch.randn(16, 64, generator=gen(5))
    settings = GptqSettings(bits=bits, group_size=group_size)
    expected = rtn(w, settings)
    diag = torch.diag(torch.rand(64, generator=gen(6), dtype=torch.float64) + 0.5)
    for h in (torch.eye(64, dtype=torch.float64), diag):
        for method in (gptq, obq):
            wq = method(w, h, settings)
            assert torch.equal(wq.q, expected.q) and torch.equal(wq.scale, expected.scale)


def test_gptq_with_huge_damp_rounds_to_nearest():
    w = torch.randn(16, 64, generator=gen(7))
    h = hessian(correlated_inputs(64, 512, 8, 0.1, seed=8))
    settings = GptqSettings(bits=4, damp=1e9)
    assert torch.equal(gptq(w, h, settings).q, rtn(w, settings).q)
    assert not torch.equal(gptq(w, h, GptqSettings(bits=4)).q, rtn(w, settings).q)


@pytest.mark.parametrize("settings", [
    GptqSettings(bits=4), GptqSettings(bits=3, group_size=8), GptqSettings(bits=4, group_size=8, act_order=True),
    GptqSettings(bits=4, block=5, damp=0.1)])
def test_reported_loss_is_the_output_error_of_the_dampened_hessian(settings):
    """Each OBS step is the exact constrained optimum, so Σ δE_q = ½ tr(ΔW (H + λI) ΔWᵀ): a wrong update (eq. 2),
    elimination (eq. 3), Cholesky row or lazy batch would break the equality."""
    w = torch.randn(24, 48, generator=gen(9))
    h = hessian(correlated_inputs(48, 1024, 12, 0.3, seed=10))
    for method in (gptq, obq):
        wq = method(w, h, settings)
        exact = layer_output_error(w, wq.dequantized(), dampened(h, settings.damp))
        assert wq.loss == pytest.approx(exact, rel=1e-9)


def test_layer_output_error_is_the_output_mse():
    x = correlated_inputs(20, 300, 5, 0.2, seed=11).double()
    w, w_hat = torch.randn(6, 20, generator=gen(12)).double(), torch.randn(6, 20, generator=gen(13)).double()
    direct = float(((x @ w.T - x @ w_hat.T) ** 2).sum()) / x.shape[0]  # ‖WX − ŴX‖²_F / N
    assert layer_output_error(w, w_hat, hessian(x)) == pytest.approx(direct, rel=1e-10)


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_and_obq_beat_rtn_on_correlated_inputs(bits):
    x = correlated_inputs(64, 2048, 32, 1.0, seed=14)  # rank 32 + unit noise
    h = hessian(x)
    w = torch.randn(32, 64, generator=gen(15))
    settings = GptqSettings(bits=bits)
    e_rtn = layer_output_error(w, rtn(w, settings).dequantized(), h)
    e_gptq = layer_output_error(w, gptq(w, h, settings).dequantized(), h)
    e_obq = layer_output_error(w, obq(w, h, settings).dequantized(), h)
    print(f"{bits} bits: GPTQ/RTN {e_gptq / e_rtn:.3f}, OBQ/RTN {e_obq / e_rtn:.3f}, OBQ/GPTQ {e_obq / e_gptq:.3f}")
    assert e_gptq <= 0.5 * e_rtn and e_obq <= 0.5 * e_rtn
    assert e_obq <= 1.0 * e_gptq


def test_act_order_is_permutation_consistent():
    """act order sorts by diag H, so the result cannot depend on how the columns were ordered on input: permuting
    whole groups and the columns inside each group permutes the integers the same way (groups keep their scales)."""
    w = torch.randn(16, 48, generator=gen(16))
    x = correlated_inputs(48, 1024, 12, 0.3, seed=17) * torch.rand(48, generator=gen(18)) * 3
    h = hessian(x)
    settings = GptqSettings(bits=4, group_size=8, act_order=True)
    groups = torch.randperm(6, generator=gen(19))
    perm = torch.cat([8 * int(gi) + torch.randperm(8, generator=gen(20 + i)) for i, gi in enumerate(groups)])
    base, permuted = gptq(w, h, settings), gptq(w[:, perm], h[perm][:, perm], settings)
    assert torch.equal(permuted.q, base.q[:, perm])
    assert torch.equal(permuted.scale, base.scale[:, groups])


def test_act_order_helps_on_unequal_column_scales():
    scales = torch.logspace(-1.5, 1.5, 64)[torch.randperm(64, generator=gen(21))]
    h = hessian(correlated_inputs(64, 2048, 16, 0.3, seed=22) * scales)
    w = torch.randn(32, 64, generator=gen(23))
    for group_size in (0, 16):
        plain, ordered = GptqSettings(bits=4, group_size=group_size), \
            GptqSettings(bits=4, group_size=group_size, act_order=True)
        e_rtn = layer_output_error(w, rtn(w, plain).dequantized(), h)
        e_plain = layer_output_error(w, gptq(w, h, plain).dequantized(), h)
        e_ordered = layer_output_error(w, gptq(w, h, ordered).dequantized(), h)
        print(f"group {group_size}: GPTQ/RTN {e_plain / e_rtn:.3f}, act-order GPTQ/RTN {e_ordered / e_rtn:.3f}")
        assert e_ordered <= 0.8 * e_plain


@pytest.mark.parametrize("group_size", [0, 16])
def test_block_size_does_not_change_the_result(group_size):
    """Lazy batching is exact, also when a (dynamic) group straddles two blocks (block 7, group 16)."""
    w = torch.randn(16, 64, generator=gen(24))
    h = hessian(correlated_inputs(64, 1024, 16, 0.3, seed=25))
    results = [gptq(w, h, GptqSettings(bits=3, group_size=group_size, block=b)) for b in (1, 7, 128)]
    for other in results[1:]:
        assert torch.equal(other.q, results[0].q) and torch.equal(other.scale, results[0].scale)
        assert other.loss == pytest.approx(results[0].loss, rel=1e-9)


def test_dead_inputs_quantize_to_zero():
    lin = nn.Linear(32, 8)
    x = correlated_inputs(32, 512, 8, 0.3, seed=26)
    x[:, [3, 17, 30]] = 0  # three inputs that are always zero: H_ii = 0
    acc = HessianAccumulator(lin)
    acc.add(x)
    assert float(acc.hessian.diagonal()[[3, 17, 30]].abs().sum()) == 0
    for method in (gptq, obq):
        wq = method(weight_matrix(lin), acc.hessian, GptqSettings(bits=4, group_size=8))
        assert int(wq.q[:, [3, 17, 30]].abs().sum()) == 0
        assert bool(torch.isfinite(wq.scale).all()) and wq.loss == wq.loss
        assert torch.isfinite(wq.dequantized()).all()


def test_bad_input_is_one_line_error_naming_the_fix():
    with pytest.raises(DenoqError, match=r"weights.bits=5 .* use one of 8, 7, 6, 4, 3"):
        GptqSettings(bits=5)
    with pytest.raises(DenoqError, match="does not divide this layer's 12 input channels"):
        group_columns(nn.Conv2d(12, 4, 3), 8)
    with pytest.raises(DenoqError, match="does not divide this layer's 40 weight columns"):
        gptq(torch.randn(4, 40), torch.eye(40), GptqSettings(bits=4, group_size=16))
    with pytest.raises(DenoqError, match=r"grouped convolutions \(groups=2\).*weights.method=rtn"):
        weight_matrix(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(DenoqError, match="Hessian of shape"):
        obq(torch.randn(4, 8), torch.eye(6), GptqSettings(bits=4))
    with pytest.raises(DenoqError, match=r"not positive definite .* raise weights\.damp"):
        gptq(torch.randn(4, 8), -torch.eye(8), GptqSettings(bits=4))
    with pytest.raises(DenoqError, match="no calibration inputs reached this layer") as info:
        _ = HessianAccumulator(nn.Linear(3, 3)).hessian
    assert "\n" not in str(info.value)
