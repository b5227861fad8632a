"""Variance schedule calibration (PTQD, He et al., arXiv 2305.10657; `denoq.sampling.vsc`).

- the ε coefficient c_t = ∂x_{t'}/∂(model output) of the DDPM and DDIM steps against central finite differences of
  the step functions themselves (no noise), for every prediction type, and its closed forms;
- Monte Carlo on synthetic Gaussian residuals: ε_q = ε + r, r ~ N(0, σ_q²). One DDPM step and one DDIM η = 1 step,
  N draws: with VSC the variance of x_{t'} around the FP mean equals the FP step's σ_t² (exact ε); without it,
  σ_t² + c_t²σ_q²; with a large σ_q² the calibrated noise is clamped at 0;
- the loop passes the table through, draws the same random numbers, and changes nothing with residual_var=None, a zero
  table, or DDIM η = 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from denoq.errors import DenoqError
from denoq.sampling import NoiseSchedule, ddim_step, ddpm_step, sample
from denoq.sampling.names import PREDICTION_TYPES
from denoq.sampling.vsc import ddim_eps_coefficient, ddpm_eps_coefficient, vsc_sigma

T = 1000
STEPS = 10
N = 400_000  # Monte Carlo draws: the variance estimate's relative standard error is sqrt(2/N) ≈ 0.22 %
MC_RTOL = 0.015


pytestmark = pytest.mark.usefixtures("one_thread")


def _schedule(**cfg) -> NoiseSchedule:
    return NoiseSchedule.from_config({"num_train_timesteps": T, "clip_sample": False, **cfg})


def _pairs(schedule: NoiseSchedule, sampler: str) -> list[tuple[int, int]]:
    return list(zip(schedule.timesteps(STEPS, sampler).tolist(), schedule.prev_timesteps(STEPS, sampler).tolist(),
                    strict=True))


def _mean(schedule: NoiseSchedule, sampler: str, eta: float, out: torch.Tensor, t: int, prev_t: int,
          x: torch.Tensor) -> torch.Tensor:
    if sampler == "ddpm":
        return ddpm_step(schedule, out, t, prev_t, x).mean
    return ddim_step(schedule, out, t, prev_t, x, eta).mean


def _coefficient(schedule: NoiseSchedule, sampler: str, eta: float, t: int, prev_t: int) -> torch.Tensor:
    if sampler == "ddpm":
        return ddpm_eps_coefficient(schedule, t, prev_t)
    return ddim_eps_coefficient(schedule, t, prev_t, eta)


# -- the coefficient ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0)])
def test_coefficient_matches_finite_differences(sampler: str, eta: float, prediction_type: str) -> None:
    """Perturb the model output by ±δ·u (u = ±1 per element), no noise: (mean(+) − mean(−)) / (2δ u) = c_t, every
    element, every step of a 10-step schedule (the last one included)."""
    schedule = _schedule(prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    out = torch.randn(2, 3, 4, 4, generator=gen)
    u = torch.where(torch.rand(2, 3, 4, 4, generator=gen) < 0.5, -1.0, 1.0)
    delta = 0.5
    for t, prev_t in _pairs(schedule, sampler):
        plus = _mean(schedule, sampler, eta, out + delta * u, t, prev_t, x)
        minus = _mean(schedule, sampler, eta, out - delta * u, t, prev_t, x)
        fd = (plus - minus) / (2 * delta) * u
        c = _coefficient(schedule, sampler, eta, t, prev_t)
        # float32 cancellation in plus − minus: ~1e-7 of the step's magnitude, divided by 2δ
        tol = 1e-6 * float(plus.abs().max()) / delta + 1e-5 * abs(float(c))
        torch.testing.assert_close(fd, c.expand_as(fd), rtol=0, atol=tol, msg=f"{sampler} η={eta} t={t}")


def test_closed_forms_and_ddim_eta_one_is_ddpm() -> None:
    """c_t = −β_t/(√α_t √(1−ᾱ_t)) (DDPM), √(1−ᾱ_{t'}−σ_t²) − √ᾱ_{t'}√(1−ᾱ_t)/√ᾱ_t (DDIM), in float64; and DDIM with
    η = 1 has DDPM's coefficient (its σ_t² is the posterior variance β̃_t)."""
    schedule = _schedule()
    ac = schedule.alphas_cumprod.double()
    for t, prev_t in _pairs(schedule, "ddpm"):
        a_prev = ac[prev_t] if prev_t >= 0 else torch.tensor(1.0, dtype=torch.float64)
        alpha_t = ac[t] / a_prev
        want = -(1 - alpha_t) / (alpha_t.sqrt() * (1 - ac[t]).sqrt())
        got = ddpm_eps_coefficient(schedule, t, prev_t)
        assert math.isclose(float(got), float(want), rel_tol=1e-5), (t, float(got), float(want))
        ddim_prev = t - T // STEPS
        assert ddim_prev == prev_t or (prev_t == -1 and ddim_prev < 0)  # same pairs for leading spacing
        assert math.isclose(float(ddim_eps_coefficient(schedule, t, ddim_prev, 1.0)), float(want), rel_tol=1e-4)
        for eta in (0.0, 0.3):
            sigma2 = eta**2 * (1 - a_prev) / (1 - ac[t]) * (1 - ac[t] / a_prev)
            want_ddim = (1 - a_prev - sigma2).sqrt() - a_prev.sqrt() * (1 - ac[t]).sqrt() / ac[t].sqrt()
            got_ddim = ddim_eps_coefficient(schedule, t, ddim_prev, eta)
            assert math.isclose(float(got_ddim), float(want_ddim), rel_tol=1e-4), (t, eta)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_clipped_x0_elements_do_not_carry_the_residual_through_x0(sampler: str, eta: float) -> None:
    """With clip_sample (diffusers' DDPM default) the step is piecewise linear: unclipped elements have c_t; clipped
    ones only the ε̂ term (DDPM: 0; DDIM: √(1−ᾱ_{t'}−σ_t²)). VSC uses the unclipped c_t for all (vsc.py)."""
    schedule = _schedule(clip_sample=True)
    t, prev_t = _pairs(schedule, sampler)[5]
    gen = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(4000, generator=gen)
    out = torch.randn(4000, generator=gen)
    a_t = schedule.alphas_cumprod[t]
    x0 = (x - (1 - a_t) ** 0.5 * out) / a_t**0.5
    delta = 1e-2
    fd = (_mean(schedule, sampler, eta, out + delta, t, prev_t, x)
          - _mean(schedule, sampler, eta, out - delta, t, prev_t, x)) / (2 * delta)
    margin = 3 * delta * float((1 - a_t) ** 0.5 / a_t**0.5)
    inside, outside = x0.abs() < 1 - margin, x0.abs() > 1 + margin
    assert inside.sum() > 100 and outside.sum() > 100
    c = float(_coefficient(schedule, sampler, eta, t, prev_t))
    torch.testing.assert_close(fd[inside], torch.full_like(fd[inside], c), rtol=1e-3, atol=1e-3 * abs(c))
    # clipped: the ε̂ term alone, c_t minus its x̂_0 part √ᾱ_{t'}·(−√(1−ᾱ_t)/√ᾱ_t) (DDIM), 0 for DDPM
    a_prev = schedule.alphas_cumprod[prev_t]
    eps_only = 0.0 if sampler == "ddpm" else c + float(a_prev**0.5 * (1 - a_t) ** 0.5 / a_t**0.5)
    assert sampler == "ddpm" or eps_only > 0.1
    torch.testing.assert_close(fd[outside], torch.full_like(fd[outside], eps_only), rtol=1e-3, atol=1e-3 * abs(c))


# -- vsc_sigma -------------------------------------------------------------------------------------------------

def test_vsc_sigma_formula_clamp_and_identity() -> None:
    assert math.isclose(float(vsc_sigma(1.0, 2.0, 0.1)), math.sqrt(0.6), rel_tol=1e-6)
    assert float(vsc_sigma(1.0, -2.0, 0.1)) == float(vsc_sigma(1.0, 2.0, 0.1))  # only c_t² matters
    assert float(vsc_sigma(1.0, 2.0, 1.0)) == 0.0  # clamped at zero
    sigma = torch.tensor(0.1234567, dtype=torch.float32)
    assert torch.equal(vsc_sigma(sigma, 3.0, 0.0), sigma)  # no residual: σ_t bit for bit (not sqrt(σ_t²))
    for bad in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(DenoqError, match="must be finite and >= 0"):
            vsc_sigma(sigma, 1.0, bad)


def test_fixed_small_log_variance_is_calibrated_too() -> None:
    schedule = _schedule(variance_type="fixed_small_log")
    t, prev_t = _pairs(schedule, "ddpm")[4]
    x = torch.randn(8)
    fp = ddpm_step(schedule, x, t, prev_t, x)
    var = 0.3 * float(fp.std) ** 2 / float(ddpm_eps_coefficient(schedule, t, prev_t)) ** 2
    got = ddpm_step(schedule, x, t, prev_t, x, residual_var=var)
    assert math.isclose(float(got.std), math.sqrt(0.7) * float(fp.std), rel_tol=1e-5)
    assert torch.equal(got.mean, fp.mean)


# -- Monte Carlo ------------------------------------------------------------------------------------------------

def _mc(sampler: str, eta: float, ratio: float) -> dict[str, float]:
    """One step at t = 500 over N elements. ε = 0.5·x_t + 0.1 is the FP prediction, ε_q = ε + r with
    r ~ N(0, σ_q²), σ_q² = ratio·σ_t²/c_t². Returns σ_t², c_t²σ_q² and the variance of x_{t'} − μ_FP for the FP step,
    the quantized step without VSC and with it, with σ'_t of the calibrated step."""
    schedule = _schedule()
    t, prev_t = next(p for p in _pairs(schedule, sampler) if p[0] == 500)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(N, generator=gen)
    eps = 0.5 * x + 0.1

    def step(out: torch.Tensor, residual_var: float | None = None):
        if sampler == "ddpm":
            return ddpm_step(schedule, out, t, prev_t, x, residual_var=residual_var)
        return ddim_step(schedule, out, t, prev_t, x, eta, residual_var=residual_var)

    fp = step(eps)
    sigma2 = float(fp.std) ** 2
    c = float(_coefficient(schedule, sampler, eta, t, prev_t))
    var_q = ratio * sigma2 / c**2
    r = math.sqrt(var_q) * torch.randn(N, generator=gen)

    def spread(s) -> float:
        z = torch.randn(N, generator=gen)
        return float(((s.mean + s.std * z) - fp.mean).double().var())

    calibrated = step(eps + r, var_q)
    assert torch.equal(calibrated.mean, step(eps + r).mean), "VSC changes the noise only, never the mean"
    return {"sigma2": sigma2, "carried": c**2 * var_q, "fp": spread(fp), "plain": spread(step(eps + r)),
            "vsc": spread(calibrated), "sigma_vsc": float(calibrated.std)}


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_monte_carlo_vsc_restores_the_fp_variance(sampler: str, eta: float) -> None:
    mc = _mc(sampler, eta, ratio=0.6)
    s2 = mc["sigma2"]
    assert math.isclose(mc["fp"], s2, rel_tol=MC_RTOL), mc  # the MC itself measures σ_t²
    assert math.isclose(mc["vsc"], mc["fp"], rel_tol=2 * MC_RTOL), mc  # calibrated ≈ FP
    assert math.isclose(mc["plain"] - mc["fp"], mc["carried"], abs_tol=2 * MC_RTOL * s2), mc  # + c_t²σ_q² without
    assert math.isclose(mc["plain"], 1.6 * s2, rel_tol=MC_RTOL), mc
    assert math.isclose(mc["sigma_vsc"] ** 2, 0.4 * s2, rel_tol=1e-4), mc


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_monte_carlo_large_residual_clamps_at_zero(sampler: str, eta: float) -> None:
    """σ_q² beyond σ_t²/c_t²: σ'_t = 0 (still a tensor, so the loop still draws z); the variance of x_{t'} is then
    all residual, c_t²σ_q² = 4σ_t² > σ_t²: VSC cannot remove noise that the sampler did not add."""
    mc = _mc(sampler, eta, ratio=4.0)
    assert mc["sigma_vsc"] == 0.0
    assert math.isclose(mc["vsc"], mc["carried"], rel_tol=MC_RTOL), mc
    assert math.isclose(mc["plain"], mc["carried"] + mc["sigma2"], rel_tol=MC_RTOL), mc


# -- the loop ---------------------------------------------------------------------------------------------------

def _eps(x: torch.Tensor, t: torch.Tensor, cond: object = None) -> torch.Tensor:
    return 0.5 * x + 0.3 * torch.sin(t.to(torch.float32) / 50)[:, None, None, None]


def _table(seed: int = 3) -> torch.Tensor:
    return 0.05 * torch.rand(T, generator=torch.Generator().manual_seed(seed))


def _run(sampler: str, eta: float, residual_var: torch.Tensor | None, seed: int = 11) -> torch.Tensor:
    schedule = _schedule(clip_sample=True)
    return sample(_eps, schedule, sampler=sampler, steps=STEPS, eta=eta, shape=(2, 3, 4, 4),
                  generator=torch.Generator().manual_seed(seed), residual_var=residual_var)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0), ("ddim", 0.4)])
def test_loop_passes_the_table_to_the_steps(sampler: str, eta: float) -> None:
    """`sample(residual_var=table)` is the manual loop with `step(..., residual_var=table[t])`, same random numbers."""
    schedule = _schedule(clip_sample=True)
    table = _table()
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    for t, prev_t in _pairs(schedule, sampler):
        out = _eps(x, torch.full((2,), t))
        if sampler == "ddpm":
            s = ddpm_step(schedule, out, t, prev_t, x, residual_var=table[t])
        else:
            s = ddim_step(schedule, out, t, prev_t, x, eta, residual_var=table[t])
        x = s.mean if s.std is None else s.mean + s.std * torch.randn(x.shape, generator=gen)
    got = _run(sampler, eta, table)
    assert torch.equal(got, x)
    assert not torch.equal(got, _run(sampler, eta, None)), "the calibration must change the noise"


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0), ("ddim", 0.0)])
def test_none_and_zero_tables_change_nothing(sampler: str, eta: float) -> None:
    base = _run(sampler, eta, None)
    assert torch.equal(_run(sampler, eta, torch.zeros(T)), base)


def test_eta_zero_ddim_is_unchanged_by_any_table() -> None:
    """η = 0: the DDIM step adds no noise, so VSC has nothing to lower (PTQD notes it is a no-op there)."""
    base = _run("ddim", 0.0, None)
    assert torch.equal(_run("ddim", 0.0, 10 * _table()), base)
    schedule = _schedule()
    x = torch.randn(4)
    assert ddim_step(schedule, x, 500, 400, x, 0.0, residual_var=1.0).std is None


@pytest.mark.parametrize("table,match", [
    (torch.zeros(T - 1), "expected \\[1000\\]"),
    (torch.zeros(T, 1), "expected \\[1000\\]"),
    (torch.zeros(T).index_fill_(0, torch.tensor([7]), -0.1), "residual_var\\[7\\] = -0.1"),
    (torch.zeros(T).index_fill_(0, torch.tensor([9]), float("nan")), "residual_var\\[9\\] = nan"),
])
def test_bad_tables_are_errors(table: torch.Tensor, match: str) -> None:
    with pytest.raises(DenoqError, match=match):
        _run("ddpm", 0.0, table)
