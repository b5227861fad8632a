"""Which recorded steps calibrate (`activations.calib_timesteps`): uniform, PTQ4DM's normal rule and ADP-DM's
structural-risk selection (`denoq.calibrators.calibtimes`), and how the compiler records the choice."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from test_cli import FAST, assert_nothing_written, run_error
from test_timegroups import T, calib_ts, make_stats, sse

from denoq.calibrators.baseline import activation_signed
from denoq.calibrators.calibset import CalibrationSet
from denoq.calibrators.calibtimes import (
    NORMAL_MEAN,
    NORMAL_STD,
    EmpiricalRisk,
    check_count,
    gaussian_kernel,
    mmd2,
    normal_steps,
    srm_steps,
    step_features,
    uniform_steps,
)
from denoq.calibrators.observers import ObserverSettings
from denoq.calibrators.stats import LayerStats
from denoq.errors import DenoqError
from denoq.layers import quantizable_layers, select_layers

SMALL = ["calib.samples=8", "calib.steps=10"]
FULL_POOL = list(range(T - 1, -1, -1))  # every training timestep, descending as a sampler visits them
DDIM50 = list(range(980, -1, -20))  # the 50 timesteps of a DDIM sampler with 50 steps


# -- uniform ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("pool", "k"), [(10, 2), (10, 4), (10, 9), (50, 7), (1000, 33)])
def test_uniform_is_evenly_spaced_with_both_ends(pool: int, k: int):
    idx = uniform_steps(pool, k)
    assert len(idx) == k == len(set(idx))
    assert idx == sorted(idx) and idx[0] == 0 and idx[-1] == pool - 1
    for n, i in enumerate(idx):
        assert abs(i - n * (pool - 1) / (k - 1)) <= 0.5


@pytest.mark.parametrize("k", [0, 10, 11, 50])
def test_uniform_keeps_every_step_when_k_is_zero_or_at_least_the_pool(k: int):
    assert uniform_steps(10, k) == list(range(10))


# -- normal (PTQ4DM) ----------------------------------------------------------------------------------------------
def _normal_targets(k: int, num_train_timesteps: int = T) -> list[float]:
    dist = statistics.NormalDist(NORMAL_MEAN * num_train_timesteps, NORMAL_STD * num_train_timesteps)
    return [dist.inv_cdf((n + 0.5) / k) for n in range(k)]


def test_normal_constants_are_ptq4dm():
    assert NORMAL_MEAN == NORMAL_STD == 0.4


def test_normal_on_a_full_pool_takes_the_normal_quantiles():
    k = 9
    idx = normal_steps(FULL_POOL, k, T)
    assert idx == sorted(idx) and len(set(idx)) == k
    chosen = sorted(FULL_POOL[i] for i in idx)
    # every training timestep is in the pool: each quantile maps to its nearest timestep (clamped to [0, T))
    assert chosen == sorted(min(T - 1, max(0, round(t))) for t in _normal_targets(k))
    assert statistics.median(chosen) == 0.4 * T


@pytest.mark.parametrize(("pool", "k"), [(FULL_POOL, 25), (FULL_POOL, 40), (DDIM50, 10), (DDIM50, 16), (DDIM50, 25)],
                         ids=["full-25", "full-40", "ddim50-10", "ddim50-16", "ddim50-25"])
def test_normal_weights_small_timesteps_more_than_uniform(pool: list[int], k: int):
    idx = normal_steps(pool, k, T)
    assert idx == sorted(idx) and len(set(idx)) == k and all(0 <= i < len(pool) for i in idx)
    chosen = [pool[i] for i in idx]
    assert abs(statistics.median(chosen) - 0.4 * T) <= 30  # the DDIM pool's spacing is 20
    uniform = [pool[i] for i in uniform_steps(len(pool), k)]
    below, below_uniform = sum(t < T // 2 for t in chosen), sum(t < T // 2 for t in uniform)
    assert below > below_uniform
    assert below / k == pytest.approx(statistics.NormalDist(0.4 * T, 0.4 * T).cdf(T / 2), abs=0.07)


@pytest.mark.parametrize("k", [1, 5, 8, 9])
def test_normal_on_a_coarse_pool_still_gives_k_distinct_steps(k: int):
    pool = list(range(900, -1, -100))  # 10 steps: most quantiles collide
    idx = normal_steps(pool, k, T)
    assert len(idx) == k == len(set(idx)) and idx == sorted(idx) and all(0 <= i < 10 for i in idx)
    if k == 1:
        assert pool[idx[0]] == 400  # the median of N(0.4 T, ·) is 0.4 T


def test_normal_is_deterministic():
    assert normal_steps(DDIM50, 12, T) == normal_steps(DDIM50, 12, T)


# -- check_count ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["normal", "srm"])
@pytest.mark.parametrize("k", [0, 10, 12])
def test_check_count_needs_fewer_steps_than_the_pool(strategy: str, k: int):
    with pytest.raises(DenoqError, match=rf"calib\.timesteps = {k}; set calib\.timesteps between 1 and 9") as exc:
        check_count(strategy, 10, k)
    assert strategy in str(exc.value) and "\n" not in str(exc.value)
    check_count(strategy, 10, 1)
    check_count(strategy, 10, 9)


@pytest.mark.parametrize("k", [0, 4, 10, 12])
def test_check_count_uniform_accepts_every_count(k: int):
    check_count("uniform", 10, k)


def test_check_count_unknown_strategy():
    with pytest.raises(DenoqError, match="uniform, normal, srm"):
        check_count("random", 10, 4)


# -- MMD² and the kernel ------------------------------------------------------------------------------------------
def _direct_mmd2(features: list[list[float]], subset: list[int]) -> float:
    """Eq. (2) written out: Gaussian kernel with h = median pairwise distance, empirical means over S and P."""
    p = len(features)
    h = statistics.median(math.dist(features[i], features[j]) for i in range(p) for j in range(i + 1, p))

    def k(a: int, b: int) -> float:
        return math.exp(-math.dist(features[a], features[b]) ** 2 / (2 * h * h))

    def mean(rows: list[int], cols: list[int]) -> float:
        return sum(k(a, b) for a in rows for b in cols) / (len(rows) * len(cols))

    pool = list(range(p))
    return mean(subset, subset) + mean(pool, pool) - 2 * mean(subset, pool)


def test_mmd2_equals_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(7, 3, generator=g, dtype=torch.float64)  # 21 pairs: an unambiguous median
    kernel = gaussian_kernel(features)
    assert torch.allclose(kernel.diagonal(), torch.ones(7, dtype=torch.float64))
    for subset in ([0], [1, 4], [0, 2, 3, 6], [1, 2, 3, 4, 5]):
        assert mmd2(kernel, subset) == pytest.approx(_direct_mmd2(features.tolist(), subset), rel=1e-9, abs=1e-12)


def test_mmd2_is_zero_on_the_pool_and_grows_when_the_subset_is_lopsided():
    features = torch.linspace(0, 5, 20, dtype=torch.float64).unsqueeze(1)
    kernel = gaussian_kernel(features)
    assert abs(mmd2(kernel, list(range(20)))) < 1e-12
    spread = uniform_steps(20, 5)
    one_end = [0, 1, 2, 3, 4]
    assert mmd2(kernel, one_end) > 10 * mmd2(kernel, spread) > 0


def test_step_features_are_log_input_ranges_by_layer_name():
    ts = calib_ts(5)
    probe = {"b": LayerStats(input=make_stats(ts, lambda t: 1.0 + t / 100)),
             "a": LayerStats(input=make_stats(ts, lambda t: 2.0))}
    feats = step_features(probe, ts)
    assert feats.shape == (5, 2) and feats.dtype == torch.float64
    for i, t in enumerate(ts):  # make_stats records the extremes -0.25 r and r exactly
        assert feats[i].tolist() == pytest.approx([math.log(1.25 * 2.0), math.log(1.25 * (1.0 + t / 100))])
    with pytest.raises(DenoqError, match="no statistics at timestep 5"):
        step_features(probe, [*ts, 5])


# -- empirical risk --------------------------------------------------------------------------------------------------
def test_empirical_risk_is_the_relative_minmax_error_on_the_subset():
    ts = calib_ts(6)
    radii = [1.0, 1.5, 3.0, 6.0, 12.0, 20.0]
    probe = {"x": LayerStats(input=make_stats(ts, lambda t: radii[ts.index(t)], n=512, seed=1)),
             "y": LayerStats(input=make_stats(ts, lambda t: 7.0 - radii[ts.index(t)] / 4, n=512, seed=2,
                                              gaussian=True))}
    risk = EmpiricalRisk(probe, ts, bits=8, signed=True)
    settings = ObserverSettings("minmax", bits=8, signed=True)

    def direct(subset: list[int]) -> float:
        total = 0.0
        for name in ("x", "y"):
            st = probe[name].input
            x = torch.cat([v for i in subset for v in st.values[ts[i]]])  # 512 values a step: none dropped
            scale = float(x.abs().max()) / 127
            total += sse(x, scale, 0, settings) / float(x.double().pow(2).sum())
        return total / 2

    for subset in ([0], [5], [0, 1], [0, 5], [1, 2, 3], list(range(6))):
        assert risk(subset) == pytest.approx(direct(subset), rel=1e-5)
    assert risk([0, 5]) > max(risk([0]), risk([5]))  # one scale for a narrow and a wide step wastes levels


# -- srm (ADP-DM) -------------------------------------------------------------------------------------------------
NARROW = 500  # t < NARROW: narrow uniform ranges (low min-max error); t ≥ NARROW: wide Gaussian ones


def _srm_probe(ts: list[int]) -> dict[str, LayerStats]:
    probe = {}
    for n, (narrow_r, wide_r) in enumerate([(1.0, 16.0), (0.5, 12.0), (2.0, 40.0)]):
        st = make_stats([t for t in ts if t < NARROW], lambda t, r=narrow_r: r * (1 + t / 5000), seed=n)
        wide = make_stats([t for t in ts if t >= NARROW], lambda t, r=wide_r: r * (1 + t / 2000), seed=10 + n,
                          gaussian=True)
        st.values.update(wide.values)
        st.amin.update(wide.amin)
        st.amax.update(wide.amax)
        probe[f"layer{n}"] = LayerStats(input=st)
    return probe


@pytest.fixture(scope="module")
def srm_case():
    pool_t = calib_ts(12)[::-1]  # descending, as recorded
    return _srm_probe(pool_t), pool_t


def test_srm_without_mmd_picks_the_lowest_risk_steps(srm_case):
    probe, pool_t = srm_case
    chosen, terms = srm_steps(probe, pool_t, 4, 8, True, 0.0)
    assert len(chosen) == 4 == len(set(chosen)) and chosen == sorted(chosen)
    assert all(pool_t[i] < NARROW for i in chosen), [pool_t[i] for i in chosen]
    assert terms["risk"] < 0.3 * terms["risk_uniform"]  # uniform mixes both regimes under one scale
    assert terms["mmd2"] > terms["mmd2_uniform"]


def test_srm_with_a_large_lambda_covers_both_regimes(srm_case):
    probe, pool_t = srm_case
    _, t0 = srm_steps(probe, pool_t, 4, 8, True, 0.0)
    chosen, terms = srm_steps(probe, pool_t, 4, 8, True, 1000.0)
    steps = [pool_t[i] for i in chosen]
    assert any(t < NARROW for t in steps) and any(t >= NARROW for t in steps)
    assert terms["mmd2"] < 0.25 * t0["mmd2"]
    assert terms["risk"] > t0["risk"]  # the capacity term is bought with empirical risk


def test_srm_terms_match_a_recomputation_and_are_deterministic(srm_case):
    probe, pool_t = srm_case
    chosen, terms = srm_steps(probe, pool_t, 5, 8, True, 3.0)
    assert (chosen, terms) == srm_steps(probe, pool_t, 5, 8, True, 3.0)
    risk = EmpiricalRisk(probe, pool_t, 8, True)
    kernel = gaussian_kernel(step_features(probe, pool_t))
    full = risk(list(range(len(pool_t))))
    uniform = uniform_steps(len(pool_t), 5)
    assert terms["risk"] == pytest.approx(risk(chosen) / full, rel=1e-9)
    assert terms["risk_uniform"] == pytest.approx(risk(uniform) / full, rel=1e-9)
    assert terms["mmd2"] == pytest.approx(mmd2(kernel, chosen), rel=1e-9)
    assert terms["mmd2_uniform"] == pytest.approx(mmd2(kernel, uniform), rel=1e-9)


# -- CalibrationSet.take ------------------------------------------------------------------------------------------
def test_take_keeps_steps_in_order_and_the_first_trajectories():
    x = [torch.full((4, 1, 2, 2), float(i)) + torch.arange(4.0).view(4, 1, 1, 1) / 10 for i in range(5)]
    cond = torch.arange(4.0).view(4, 1)
    calib = CalibrationSet(x, [80, 60, 40, 20, 0], cond)
    sub = calib.take([3, 0], samples=2)
    assert sub.t == [20, 80]
    assert torch.equal(sub.x[0], x[3][:2]) and torch.equal(sub.x[1], x[0][:2])
    assert torch.equal(sub.cond, cond[:2]) and len(sub) == 4
    everything = calib.take([0, 1, 2, 3, 4])
    assert everything.t == calib.t and len(everything) == 20


# -- the compiler ---------------------------------------------------------------------------------------------------
def _compile(pipeline, out, sets: list[str]):
    from denoq.compiler.pipeline import compile_model
    from denoq.compiler.recipe import load_recipe

    return compile_model(str(pipeline), load_recipe("w8a8", [*SMALL, *sets]), out)


@pytest.fixture(scope="module")
def recorded_pool(tiny_pipeline):
    """All 10 recorded steps (uniform, calib.timesteps = 0) and the model they were recorded with."""
    from denoq.compiler.calibrate import calibration_set
    from denoq.compiler.load import load_model
    from denoq.compiler.recipe import load_recipe

    spec = load_model(str(tiny_pipeline))
    layers, _ = select_layers(quantizable_layers(spec.module), ())
    pool, info, recorded = calibration_set(spec, load_recipe("w8a8", [*SMALL, "calib.timesteps=0"]), layers)
    assert recorded.t == pool.t
    assert info == {"strategy": "uniform"}
    return spec, layers, pool


@pytest.mark.parametrize("strategy", ["normal", "srm"])
def test_compile_records_the_chosen_steps(strategy: str, tiny_pipeline, recorded_pool, tmp_path):
    _, _, pool = recorded_pool
    art = _compile(tiny_pipeline, tmp_path / strategy, [f"activations.calib_timesteps={strategy}", "calib.timesteps=4"])
    calibration = art.manifest["calibration"]
    assert len(pool.t) == 10
    assert len(calibration["timesteps"]) == 4 and set(calibration["timesteps"]) < set(pool.t)
    assert calibration["inputs"] == 4 * 8
    selection = calibration["timestep_selection"]
    assert selection["strategy"] == strategy
    if strategy == "normal":
        idx = normal_steps(pool.t, 4, T)
        assert calibration["timesteps"] == [pool.t[i] for i in idx]
    else:
        assert set(selection) == {"strategy", "risk", "mmd2", "risk_uniform", "mmd2_uniform"}
        assert all(math.isfinite(selection[k]) for k in ("risk", "mmd2", "risk_uniform", "mmd2_uniform"))
        assert selection["risk"] > 0 and selection["mmd2"] >= 0 and selection["mmd2_uniform"] >= 0


def test_srm_calibration_set_is_the_pool_at_the_chosen_steps(recorded_pool):
    from denoq.calibrators.calibtimes import PROBE_SAMPLES
    from denoq.calibrators.stats import collect_stats
    from denoq.compiler.backends import torch_eps
    from denoq.compiler.calibrate import calibration_set
    from denoq.compiler.recipe import load_recipe

    spec, layers, pool = recorded_pool
    recipe = load_recipe("w8a8", [*SMALL, "activations.calib_timesteps=srm", "calib.timesteps=4"])
    calib, info, recorded = calibration_set(spec, recipe, layers)
    assert recorded.t == pool.t
    idx = [pool.t.index(t) for t in calib.t]
    assert idx == sorted(idx) and len(idx) == 4
    for i, xi in zip(idx, calib.x, strict=True):
        assert torch.equal(xi, pool.x[i])  # all 8 trajectories at the chosen steps
    # the rule saw probe statistics of every pool step and chose what srm_steps chooses on them
    probe = collect_stats(torch_eps(spec.module), layers, pool.take(list(range(10)), PROBE_SAMPLES), outputs=False,
                          seed=recipe["seed"])
    expected, terms = srm_steps(probe, pool.t, 4, recipe["activations.bits"], activation_signed(recipe["target"]),
                                recipe["activations.srm_lambda"])
    assert expected == idx
    assert info == {"strategy": "srm", **{k: round(v, 6) for k, v in terms.items()}}


def test_cli_srm_without_a_count_is_one_line_error(capsys, tmp_path, tiny_pipeline):
    err = run_error(capsys, ["compile", str(tiny_pipeline), "--out", str(tmp_path / "a"), *FAST,
                             "--set", "activations.calib_timesteps=srm", "--set", "calib.timesteps=0"])
    assert "calib.timesteps" in err and "between 1 and 4" in err  # FAST records 5 steps
    assert_nothing_written(tmp_path, "a")
