"""PTQD's statistics (denoq.calibrators.ptqd): the fit of ε_q = (1+k)·ε + b_c + ρ, the tables, storage, pictures."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from denoq.calibrators.calibset import CalibrationSet
from denoq.calibrators.ptqd import PtqdStats, StepFit, check_matches, collect_pairs, fit, fit_step, nearest_measured
from denoq.calibrators.ptqd_plot import ptqd_pictures
from denoq.calibrators.timegroups import segment_of_timestep
from denoq.errors import DenoqError

N, C, H, W = 64, 3, 16, 16


def synthetic(k: float, bias: list[float], sigma: float, seed: int, eps_mean: list[float] | None = None,
              noise: str = "normal", n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """ε ~ N(mean_c, 1) and ε_q = (1 + k)·ε + b_c + σ·z, z standard normal / uniform / Laplace (unit variance)."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, C, H, W, generator=g, dtype=torch.float64)
    if eps_mean is not None:
        eps = eps + torch.tensor(eps_mean, dtype=torch.float64)[None, :, None, None]
    if noise == "normal":
        z = torch.randn(eps.shape, generator=g, dtype=torch.float64)
    elif noise == "uniform":
        z = (torch.rand(eps.shape, generator=g, dtype=torch.float64) - 0.5) * math.sqrt(12)
    else:  # Laplace with unit variance: scale 1/√2
        u = torch.rand(eps.shape, generator=g, dtype=torch.float64) - 0.5
        z = -torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2)
    eps_q = (1 + k) * eps + torch.tensor(bias, dtype=torch.float64)[None, :, None, None] + sigma * z
    return eps.float(), eps_q.float()


def _tolerances(sigma: float, n: int = N) -> tuple[float, float, float]:
    """Five standard errors of k, b_c and σ² for the synthetic data (ε of unit variance)."""
    per_channel = n * H * W
    return 5 * sigma / math.sqrt(per_channel * C), 5 * sigma / math.sqrt(per_channel), \
        5 * sigma**2 * math.sqrt(2 / (per_channel * C))


# -- the fit -------------------------------------------------------------------------------------------------------
CASES = {100: (0.05, [0.01, -0.02, 0.03], 0.05), 400: (0.2, [0.0, 0.1, -0.05], 0.1), 800: (0.0, [0.2, 0.0, 0.0], 0.02)}


def test_fit_recovers_k_bias_and_residual_variance():
    pairs = [(t, *synthetic(k, b, s, seed=t)) for t, (k, b, s) in CASES.items()]
    stats = fit(pairs, num_train_timesteps=1000, sampler="ddim", num_steps=3)
    assert stats.steps == [100, 400, 800]
    for t, (k, b, s) in CASES.items():
        tol_k, tol_b, tol_v = _tolerances(s)
        assert abs(float(stats.k[t]) - k) < tol_k
        torch.testing.assert_close(stats.bias[t], torch.tensor(b), atol=tol_b, rtol=0)
        assert abs(float(stats.residual_var[t]) - s**2) < tol_v
    torch.testing.assert_close(stats.residual_std, torch.tensor([s for _, _, s in CASES.values()]), rtol=0.02, atol=0)
    # the head's multiplier and the variance left for the sampler follow from k and σ²
    torch.testing.assert_close(stats.inv_one_plus_k, 1 / (1 + stats.k))
    torch.testing.assert_close(stats.corrected_var, stats.residual_var / (1 + stats.k) ** 2)


def test_k_is_clamped_at_zero_when_the_noise_anticorrelates():
    sigma, b = 0.05, [0.1, -0.1, 0.0]
    f = fit_step(*synthetic(-0.3, b, sigma, seed=1))
    tol_k, _, _ = _tolerances(sigma)
    assert f.k == 0.0 and abs(f.slope + 0.3) < tol_k
    # with k = 0 the residual is Δ − b_c itself: the anticorrelated part stays in it (k² · Var ε = 0.09)
    _, tol_b, tol_v = _tolerances(math.sqrt(0.09 + sigma**2))
    torch.testing.assert_close(f.bias.float(), torch.tensor(b), atol=tol_b, rtol=0)
    assert abs(f.residual_var - (0.09 + sigma**2)) < tol_v


def test_bias_only_fit_keeps_k_at_zero_and_leaves_the_correlated_part_in_the_residual():
    """ptqd.correlation=false: b_c = mean_c(Δ) and σ² = the per-channel variance of Δ, which still holds k²·Var ε."""
    k, b, sigma = 0.2, [0.05, -0.1, 0.0], 0.05
    eps, eps_q = synthetic(k, b, sigma, seed=5)
    full, bias_only = fit_step(eps, eps_q), fit_step(eps, eps_q, correlated=False)
    assert bias_only.k == 0.0 and bias_only.slope == full.slope and abs(full.k - k) < _tolerances(sigma)[0]
    d = (eps_q - eps).double()
    torch.testing.assert_close(bias_only.bias, d.mean(dim=(0, 2, 3)), rtol=0, atol=1e-9)
    assert abs(bias_only.residual_var - float(d.var(dim=(0, 2, 3), unbiased=False).mean())) < 1e-9
    assert bias_only.residual_var > full.residual_var + 0.5 * k**2  # Var ε = 1: the correlated part stays
    stats = fit([(100, eps, eps_q)], num_train_timesteps=1000, sampler="ddim", num_steps=1, correlated=False)
    assert float(stats.k.abs().max()) == 0.0 and float(stats.inv_one_plus_k.min()) == 1.0


def test_k_is_fit_jointly_with_the_channel_bias():
    """With ε's channel means away from 0 a slope through the origin would absorb the bias; (2) does not."""
    k, b, sigma, mean = 0.1, [0.3, -0.2, 0.1], 0.05, [0.5, -1.0, 2.0]
    eps, eps_q = synthetic(k, b, sigma, seed=2, eps_mean=mean)
    f = fit_step(eps, eps_q)
    tol_k, tol_b, tol_v = _tolerances(sigma)
    assert abs(f.k - k) < tol_k
    torch.testing.assert_close(f.bias.float(), torch.tensor(b), atol=tol_b, rtol=0)
    assert abs(f.residual_var - sigma**2) < tol_v
    d, e = (eps_q - eps).double(), eps.double()
    through_origin = float((d * e).sum() / (e * e).sum())
    assert abs(through_origin - k) > 20 * tol_k  # the naive slope is far off: this test tells the two apart


def test_streaming_over_batches_equals_one_big_batch():
    eps, eps_q = synthetic(0.15, [0.05, 0.0, -0.05], 0.1, seed=3)
    one = fit([(500, eps, eps_q)], 1000, "ddpm", 10)
    cuts = [0, 5, 6, 30, 47, N]
    many = fit([(500, eps[a:b], eps_q[a:b]) for a, b in itertools.pairwise(cuts)], 1000, "ddpm", 10)
    for name, v in one.to_tensors().items():
        torch.testing.assert_close(many.to_tensors()[name], v, rtol=1e-6, atol=1e-9, msg=name)
    # the normality subsample does not depend on the split either
    assert many.normality_p.item() == pytest.approx(one.normality_p.item(), rel=1e-6)


def test_fit_refuses_bad_pairs():
    eps, eps_q = synthetic(0.1, [0.0] * C, 0.1, seed=4, n=2)
    with pytest.raises(DenoqError, match="outside"):
        fit([(1000, eps, eps_q)], 1000, "ddim", 10)
    with pytest.raises(DenoqError, match="same shape"):
        fit([(5, eps, eps_q[:1])], 1000, "ddim", 10)
    bad = eps_q.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DenoqError, match=r"timestep 5: the quantized model's prediction is not finite"):
        fit([(5, eps, bad)], 1000, "ddim", 10)
    with pytest.raises(DenoqError, match="no measured steps"):
        fit([], 1000, "ddim", 10)


# -- normality -----------------------------------------------------------------------------------------------------
def test_normality_p_is_large_for_a_gaussian_residual_and_tiny_otherwise():
    gauss = fit_step(*synthetic(0.1, [0.1, 0.0, -0.1], 0.1, seed=5))
    uniform = fit_step(*synthetic(0.1, [0.1, 0.0, -0.1], 0.1, seed=5, noise="uniform"))
    laplace = fit_step(*synthetic(0.1, [0.1, 0.0, -0.1], 0.1, seed=5, noise="laplace"))
    assert gauss.normality_p > 0.01
    assert uniform.normality_p < 1e-6 and laplace.normality_p < 1e-6
    # no residual at all (identical predictions): nothing to test
    eps = torch.randn(4, C, H, W, generator=torch.Generator().manual_seed(0))
    assert math.isnan(fit_step(eps, eps.clone()).normality_p)


# -- tables --------------------------------------------------------------------------------------------------------
def test_unmeasured_timesteps_take_the_nearest_measured_step_ties_to_the_smaller():
    steps, T = [2, 5, 9], 12
    expected = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]  # t = 3: 2 is nearer; t = 7: tie between 5 and 9 → 5
    assert nearest_measured(steps, T).tolist() == expected
    assert nearest_measured(steps, T).tolist() == segment_of_timestep([(s, s) for s in steps], T).tolist()
    fits = {s: StepFit(k=0.1 * i, slope=0.1 * i, bias=torch.full((2,), float(i), dtype=torch.float64),
                       residual_var=0.01 * (i + 1), normality_p=0.5, count=10) for i, s in enumerate(steps)}
    stats = PtqdStats.from_fits(fits, T, "ddim", 3)
    torch.testing.assert_close(stats.k, torch.tensor([0.1 * i for i in expected]))
    torch.testing.assert_close(stats.bias[:, 1], torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(stats.residual_var, torch.tensor([0.01 * (i + 1) for i in expected]))


def _small_stats() -> PtqdStats:
    pairs = [(t, *synthetic(0.1 * i, [0.01 * i] * C, 0.05, seed=10 + i, n=4)) for i, t in enumerate([3, 11, 17])]
    return fit(pairs, 20, "ddim", 3)


def test_tables_round_trip_through_safetensors_and_json(tmp_path):
    stats = _small_stats()
    save_file(stats.to_tensors(), str(tmp_path / "plan.safetensors"))
    meta = json.loads(json.dumps(stats.meta()))
    back = PtqdStats.from_tensors(load_file(str(tmp_path / "plan.safetensors")), meta)
    assert (back.num_train_timesteps, back.sampler, back.num_steps, back.steps) == (20, "ddim", 3, [3, 11, 17])
    for name, v in stats.to_tensors().items():
        assert torch.equal(back.to_tensors()[name], v), name
    assert back.k.dtype == back.bias.dtype == back.residual_var.dtype == torch.float32


def _corrupt(tensors: dict, meta: dict, what: str) -> None:
    if what == "negative k":
        tensors["ptqd.k"][4] = -0.5
    elif what == "nan variance":
        tensors["ptqd.residual_var"][0] = float("nan")
    elif what == "negative variance":
        tensors["ptqd.residual_var"][7] = -1.0
    elif what == "bias shape":
        tensors["ptqd.bias"] = tensors["ptqd.bias"][:, :2]
    elif what == "inconsistent T":
        meta["num_train_timesteps"] = 21
    elif what == "missing table":
        del tensors["ptqd.k"]
    elif what == "steps":
        meta["steps"] = [3, 25, 17]
    elif what == "p-value":
        tensors["ptqd.normality_p"][0] = 2.0
    elif what == "sampler":
        meta["sampler"] = "euler"


@pytest.mark.parametrize(("what", "message"), [
    ("negative k", r"table k is -0.5 < 0 at timestep 4"),
    ("nan variance", r"table residual_var holds NaN/Inf"),
    ("negative variance", r"table residual_var is -1.0 < 0 at timestep 7"),
    ("bias shape", r"table bias has shape \(20, 2\), expected \(20, 3\)"),
    ("inconsistent T", r"table k has shape \(20,\), expected \(21,\)"),
    ("missing table", r"lack or garble 'ptqd.k'"),
    ("steps", r"measured steps \[3, 25, 17\] are not sorted"),
    ("p-value", r"p-values outside \[0, 1\]"),
    ("sampler", r"sampler 'euler'"),
])
def test_corrupt_tables_are_refused_in_one_line(what, message):
    stats = _small_stats()
    tensors = {name: v.clone() for name, v in stats.to_tensors().items()}
    meta = stats.meta()
    _corrupt(tensors, meta, what)
    with pytest.raises(DenoqError, match=message) as info:
        PtqdStats.from_tensors(tensors, meta)
    assert "\n" not in str(info.value) and "recompile" in str(info.value)


def test_statistics_for_another_sampler_or_step_count_are_refused():
    meta = _small_stats().meta()
    check_matches(meta, "ddim", 3)
    with pytest.raises(DenoqError) as info:
        check_matches(dict(meta, num_steps=50), "ddpm", 1000)
    assert str(info.value) == ("PTQD statistics computed for ddim 50 steps, sampling with ddpm 1000 steps; recompile "
                               "with --set calib.sampler=ddpm --set calib.steps=1000 or sample with --sampler ddim "
                               "--steps 50")
    with pytest.raises(DenoqError, match="computed for ddim 3 steps, sampling with ddim 4 steps"):
        check_matches(meta, "ddim", 4)


# -- measuring -----------------------------------------------------------------------------------------------------
def test_collect_pairs_runs_both_backends_on_the_same_inputs_in_step_order():
    g = torch.Generator().manual_seed(0)
    calib = CalibrationSet(x=[torch.randn(4, 1, 2, 2, generator=g), torch.randn(4, 1, 2, 2, generator=g)],
                           t=[900, 500], cond=torch.arange(4, dtype=torch.float32))

    def fp(x, t, cond):
        return 2 * x + t[:, None, None, None] + cond[:, None, None, None]

    def quant(x, t, cond):
        return 3 * x - cond[:, None, None, None]

    got = list(collect_pairs(fp, quant, calib, batch_size=3))
    assert [(t, e.shape[0]) for t, e, _ in got] == [(900, 3), (900, 1), (500, 3), (500, 1)]
    for (t, e, q), (x, cond) in zip(got, [(calib.x[0][:3], calib.cond[:3]), (calib.x[0][3:], calib.cond[3:]),
                                          (calib.x[1][:3], calib.cond[:3]), (calib.x[1][3:], calib.cond[3:])],
                                    strict=True):
        torch.testing.assert_close(e, 2 * x + t + cond[:, None, None, None])
        torch.testing.assert_close(q, 3 * x - cond[:, None, None, None])
    stats = fit(collect_pairs(fp, quant, calib, batch_size=3), 1000, "ddim", 2)
    assert stats.steps == [500, 900]


# -- the picture ---------------------------------------------------------------------------------------------------
def test_picture_is_a_deterministic_png():
    stats = _small_stats()
    stats.normality_p = torch.tensor([0.5, 1e-40, float("nan")], dtype=torch.float64)  # one marked, one missing
    png = ptqd_pictures(stats)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert ptqd_pictures(stats) == png
    assert b"matplotlib" not in png  # no Software metadata
