"""Timestep-grouped activation quantization (ADP-DM): the exact DP partition and the per-timestep scale table."""

from __future__ import annotations

import itertools

import pytest
import torch

from denoq.calibrators.baseline import _act_quant
from denoq.calibrators.observers import ObserverSettings, clip_range, qparams
from denoq.calibrators.quantizer import fake_quantize
from denoq.calibrators.stats import TensorStats
from denoq.calibrators.timegroups import (
    group_scale,
    grouped_act_quant,
    layer_zero_point,
    optimal_partition,
    partition_timesteps,
    scale_table,
    segment_costs,
    segment_of_timestep,
)
from denoq.errors import DenoqError
from denoq.plan import qrange

T = 1000
SETTINGS = [ObserverSettings(method=m, signed=s) for m in ("minmax", "mse") for s in (True, False)]


def step_range(t: int) -> float:
    return 1.0 if t < 300 else 4.0 if t < 700 else 16.0


def make_stats(ts: list[int], radius, n: int = 512, seed: int = 0, gaussian: bool = False) -> TensorStats:
    """Values in [-0.25 r, r] (asymmetric, so unsigned quantizers have a non-trivial zero point) with r = radius(t);
    uniform with the extremes recorded exactly, or Gaussian."""
    g = torch.Generator().manual_seed(seed)
    st = TensorStats()
    for t in ts:
        r = radius(t)
        if gaussian:
            x = torch.randn(n, generator=g) * r / 3
        else:
            x = torch.rand(n, generator=g) * 1.25 * r - 0.25 * r
            x[0], x[1] = -0.25 * r, r
        for chunk in x.split(n // 2):  # two batches per timestep, as collect_stats records them
            st.values[t].append(chunk)
        st.amin[t], st.amax[t] = float(x.min()), float(x.max())
    return st


def calib_ts(k: int) -> list[int]:
    return torch.linspace(0, T - 1, k).round().long().tolist()


def sse(values: torch.Tensor, scale: float, zp: int, s: ObserverSettings) -> float:
    qmin, qmax = qrange(s.bits, s.signed)
    return float((fake_quantize(values, torch.tensor(scale), zp, qmin, qmax) - values).double().pow(2).sum())


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.method}-{'s' if s.signed else 'u'}")
def test_dp_recovers_known_range_steps(settings: ObserverSettings):
    ts = calib_ts(30)
    st = make_stats(ts, step_range)
    segs = partition_timesteps(st, 3, settings)
    expected = [(ts[0], max(t for t in ts if t < 300)), (min(t for t in ts if t >= 300), max(t for t in ts if t < 700)),
                (min(t for t in ts if t >= 700), ts[-1])]
    assert segs == expected


def test_dp_equals_brute_force():
    k, groups = 8, 3
    # a real cost matrix (ranges drifting at random) and random matrices
    g = torch.Generator().manual_seed(1)
    radii = (torch.rand(k, generator=g) * 10 + 0.5).tolist()
    ts = calib_ts(k)
    st = make_stats(ts, lambda t: radii[ts.index(t)], gaussian=True)
    _, real = segment_costs(st, ObserverSettings("mse"), 0)
    matrices = [real] + [torch.rand(k, k, generator=g, dtype=torch.float64) for _ in range(20)]
    for cost in matrices:
        total, runs = optimal_partition(cost, groups)
        brute = min(sum(float(cost[i, j]) for i, j in zip((0, *cuts), (*(c - 1 for c in cuts), k - 1), strict=True))
                    for cuts in itertools.combinations(range(1, k), groups - 1))
        assert total == pytest.approx(brute, rel=1e-12)
        assert sum(float(cost[i, j]) for i, j in runs) == pytest.approx(total, rel=1e-12)
        assert len(runs) == groups and runs[0][0] == 0 and runs[-1][1] == k - 1
        assert all(runs[n + 1][0] == runs[n][1] + 1 for n in range(groups - 1))


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.method}-{'s' if s.signed else 'u'}")
def test_segment_cost_is_the_observer_quantizer_error(settings: ObserverSettings):
    """cost(i, j) = Σ (Q(x) − x)² with the observer's qparams on the pooled values (the fast mse grid included)."""
    ts = calib_ts(6)
    st = make_stats(ts, lambda t: 1.0 + t / 100, n=256, gaussian=True)
    zp = layer_zero_point(st, settings)
    _, cost = segment_costs(st, settings, zp, samples_per_timestep=256)  # no subsampling
    for i, j in itertools.combinations_with_replacement(range(len(ts)), 2):
        seg = ts[i:j + 1]
        values = torch.cat([v for t in seg for v in st.values[t]])
        lo, hi = clip_range(values, min(st.amin[t] for t in seg), max(st.amax[t] for t in seg), settings)
        assert float(cost[i, j]) == pytest.approx(sse(values, group_scale(lo, hi, settings, zp), zp, settings),
                                                  rel=1e-6)
    assert torch.isinf(cost[1, 0])


def test_cost_non_increasing_in_groups():
    ts = calib_ts(30)
    st = make_stats(ts, lambda t: 0.5 + t / 50, gaussian=True)
    settings = ObserverSettings("mse")
    _, cost = segment_costs(st, settings, 0)
    totals = [optimal_partition(cost, g)[0] for g in range(1, 11)]
    assert all(b <= a for a, b in itertools.pairwise(totals))
    assert totals[-1] < 0.5 * totals[0]  # groups do pay off on a drifting range


@pytest.mark.parametrize("method", ["minmax", "mse", "percentile", "large_magnitude"])
@pytest.mark.parametrize("signed", [True, False])
def test_one_group_is_the_baseline_table(method: str, signed: bool):
    ts = calib_ts(10)
    st = make_stats(ts, step_range, gaussian=True)
    settings = ObserverSettings(method, signed=signed)
    aq, segs = grouped_act_quant(st, 1, settings, T)
    base = _act_quant(st, settings, T)
    assert segs == [(ts[0], ts[-1])]
    assert aq.zero_point == base.zero_point and aq.signed == base.signed and aq.bits == base.bits
    assert torch.equal(aq.scale, base.scale)


def test_table_is_piecewise_constant_with_midpoint_boundaries():
    ts = [10, 20, 30, 40, 61, 80]
    st = make_stats(ts, lambda t: 1.0 if t < 25 else 3.0 if t < 50 else 9.0)
    segments = [(10, 20), (30, 40), (61, 80)]
    aq = scale_table(st, segments, ObserverSettings("minmax"), T)
    assert aq.scale.shape == (T,) and aq.scale.dtype == torch.float32
    # nearest calibrated timestep, ties to the smaller: 20|30 → last t of group 0 is 25; 40|61 → 50
    owner = segment_of_timestep(segments, T)
    assert owner[:26].tolist() == [0] * 26 and owner[26:51].tolist() == [1] * 25 and owner[51:].tolist() == [2] * 949
    s = aq.scale
    assert torch.all(s[:26] == s[0]) and torch.all(s[26:51] == s[26]) and torch.all(s[51:] == s[51])
    assert s[0] == pytest.approx(1.0 / 127) and s[26] == pytest.approx(3.0 / 127) and s[51] == pytest.approx(9.0 / 127)
    assert not aq.is_constant


def test_unsigned_zero_point_is_constant_and_covers_every_group():
    ts = calib_ts(30)
    # the negative tail shrinks relative to the positive side as t grows, so each group's own zero point differs
    st = TensorStats()
    g = torch.Generator().manual_seed(0)
    for t in ts:
        lo, hi = -0.05 - t / 1000, 1.0 + 3 * t / 1000
        x = torch.rand(400, generator=g) * (hi - lo) + lo
        x[0], x[1] = lo, hi
        st.values[t].append(x)
        st.amin[t], st.amax[t] = lo, hi
    settings = ObserverSettings("minmax", signed=False)
    aq, segs = grouped_act_quant(st, 3, settings, T)
    base = _act_quant(st, settings, T)
    assert aq.zero_point == base.zero_point == layer_zero_point(st, settings)
    qmin, qmax = aq.qrange
    owner = segment_of_timestep(segs, T)
    own_zps = set()
    for n, (first, last) in enumerate(segs):
        seg = [t for t in ts if first <= t <= last]
        lo, hi = min(st.amin[t] for t in seg), max(st.amax[t] for t in seg)
        s = float(aq.scale[owner == n][0])
        # the fixed zero point's representable interval covers the group's range (to the half step the observer's
        # own rounded zero point may miss by), tightly on one side
        assert (qmin - aq.zero_point) * s <= lo + 0.5 * s and (qmax - aq.zero_point) * s >= hi - 0.5 * s
        assert min(abs((qmin - aq.zero_point) * s - lo), abs((qmax - aq.zero_point) * s - hi)) <= 0.5 * s
        own_zps.add(qparams(lo, hi, 8, False)[1])
    assert len(own_zps) > 1  # the groups' own zero points differ: the constraint was exercised


def test_group_scale_under_a_fixed_zero_point():
    s = ObserverSettings("minmax", signed=False)
    assert group_scale(-1.0, 3.0, s, 64) == pytest.approx(4.0 / 255)       # the observer's own zero point is 64
    assert group_scale(-1.0, 3.0, s, 80) == pytest.approx(3.0 / 175)       # the positive side binds
    assert group_scale(-2.0, 1.0, s, 40) == pytest.approx(2.0 / 40)        # the negative side binds
    assert group_scale(-1.0, 3.0, s, 0) == pytest.approx(3.0 / 255)        # no negative side: it is clipped
    assert group_scale(-1.0, 1.0, ObserverSettings("minmax"), 0) == pytest.approx(1.0 / 127)


def test_errors():
    ts = calib_ts(5)
    st = make_stats(ts, step_range)
    with pytest.raises(DenoqError, match=r"timestep_groups = 6 exceeds the 5 calibrated timesteps"):
        partition_timesteps(st, 6, ObserverSettings())
    with pytest.raises(DenoqError, match="must be ≥ 1"):
        partition_timesteps(st, 0, ObserverSettings())
    for bad in (-1, T):
        st_bad = make_stats([*ts[:-1], bad] if bad == T else [bad, *ts[1:]], step_range)
        with pytest.raises(DenoqError, match=rf"timestep {bad} lies outside \[0, {T - 1}\]"):
            grouped_act_quant(st_bad, 2, ObserverSettings(), T)
        with pytest.raises(DenoqError, match="outside"):
            scale_table(st_bad, [(min(st_bad.values), max(st_bad.values))], ObserverSettings(), T)
    with pytest.raises(DenoqError, match="no activation statistics"):
        partition_timesteps(TensorStats(), 1, ObserverSettings())


def test_subsampled_cost_estimates_the_full_error():
    """Each subsampled value stands for n_t / m of the recorded ones, so the cost estimates the full-sample SSE."""
    ts = calib_ts(4)
    st = make_stats(ts, lambda t: 2.0, n=4096)
    settings = ObserverSettings("minmax")
    _, cost = segment_costs(st, settings, 0, samples_per_timestep=256)
    values = torch.cat(st.values[ts[0]])
    full = sse(values, group_scale(-2.0, 2.0, settings, 0), 0, settings)
    assert float(cost[0, 0]) == pytest.approx(full, rel=0.2)
