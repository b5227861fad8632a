"""Timestep-grouped activation quantization: the exact optimal partition of the calibrated timesteps (ADP-DM).

Wang et al., "Towards Accurate Post-training Quantization for Diffusion Models" (ADP-DM, CVPR 2024,
arXiv 2305.18723) observe that a layer's activation range drifts with the denoising timestep, so one quantizer
for all timesteps wastes levels; they give each layer G *group-wise* activation quantizers, one per contiguous
group of timesteps. This module chooses the groups per layer, exactly, by dynamic programming (the fast default;
ADP-DM's own differentiable search is `timegroups_search.py`):

Let t_1 < … < t_K be the layer's calibrated timesteps and X_k its sampled activations at t_k. For a segment
S = {t_i, …, t_j} the observer picks qparams (s_S, z) on the pooled values X_S = X_i ∪ … ∪ X_j and

    cost(i, j) = Σ_{x ∈ X_S} (Q_S(x) − x)²,        Q_S = fake_quantize(·, s_S, z)  (ONNX semantics)     (1)

The partition into G contiguous segments minimizing Σ_g cost(i_g, j_g) satisfies, with D[0][0] = 0,

    D[g][j] = min_{g ≤ i ≤ j} D[g−1][i−1] + cost(i, j),     answer D[G][K]                             (2)

computed over all O(K²) segments and in O(G·K²) steps. The zero point z is the same for every segment (the graph
keeps zero points constant, docs/architecture.md, Timestep selector); see `group_scale` for how a segment's scale is
chosen under that constraint. The segments become a per-training-timestep scale table (`scale_table`) that the
timestep-selector pass turns into `Gather(r, t)` multiplies.

To keep (1) cheap for K = 25–50, the DP evaluates the observer on a deterministic subsample of at most
`samples_per_timestep` values per timestep (each weighted by the number of values it stands for), and the mse
observer's clipping grid is evaluated as one [grid, n] tensor. The scales written to the table are then computed
by the observer itself (`observe_qparams`) on each segment's full values, so G = 1 reproduces the baseline
plan's constant table exactly.
"""

from __future__ import annotations

import torch

from denoq.calibrators.observers import (
    MIN_RANGE,
    MSE_GRID,
    ObserverSettings,
    clip_range,
    grid_range,
    observe_qparams,
    qparams,
)
from denoq.calibrators.quantizer import fake_quantize
from denoq.calibrators.stats import TensorStats, strided
from denoq.errors import DenoqError
from denoq.plan import ActQuant, qrange

SAMPLES_PER_TIMESTEP = 256

Segment = tuple[int, int]


# -- the quantizer of one segment ---------------------------------------------------------------------------------
def layer_zero_point(stats: TensorStats, settings: ObserverSettings) -> int:
    """The layer's one zero point: 0 when signed (trt); when unsigned (ort-cpu), the zero point the observer
    chooses on the values pooled over *all* timesteps, i.e. exactly the baseline plan's zero point."""
    if settings.signed:
        return 0
    values, amin, amax = stats.pooled()
    return observe_qparams(values, amin, amax, settings)[1]


def group_scale(lo: float, hi: float, settings: ObserverSettings, zero_point: int) -> float:
    """The scale of one timestep group whose observer chose the clipping interval [lo, hi], given the layer's fixed
    `zero_point`.

    If the observer's own zero point for [lo, hi] (`qparams`) equals the fixed one, its scale is used unchanged
    (always the case when signed, and for G = 1). Otherwise the scale is the smallest one with which the fixed zero
    point still covers [lo, hi] (widened to contain 0): the representable interval is [(qmin − z)·s, (qmax − z)·s],
    so s = max(hi / (qmax − z), lo / (qmin − z)), a side whose denominator is 0 dropping out (it cannot be covered
    at any scale and is clipped).
    """
    scale, zp = qparams(lo, hi, settings.bits, settings.signed, settings.format)
    if zp == zero_point:
        return scale
    qmin, qmax = qrange(settings.bits, settings.signed)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    candidates = [MIN_RANGE / (qmax - qmin)]
    if qmax > zero_point:
        candidates.append(hi / (qmax - zero_point))
    if qmin < zero_point:
        candidates.append(lo / (qmin - zero_point))
    return max(candidates)


def _mse_grid(lo0: float, hi0: float, settings: ObserverSettings) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """The mse observer's grid (`observers._mse_range`): shrink factors α and the [grid, 1] scales and zero points
    of the intervals α·[lo0, hi0]."""
    alphas = torch.linspace(1.0 / MSE_GRID, 1.0, MSE_GRID).tolist()
    qp = [qparams(lo0 * a, hi0 * a, settings.bits, settings.signed, settings.format) for a in alphas]
    return (alphas, torch.tensor([s for s, _ in qp], dtype=torch.float32).unsqueeze(1),
            torch.tensor([z for _, z in qp], dtype=torch.float32).unsqueeze(1))


# -- cost(i, j) and the DP ----------------------------------------------------------------------------------------
def _check_timesteps(stats: TensorStats, num_train_timesteps: int | None = None) -> list[int]:
    ts = sorted(t for t in stats.values if len(stats.values[t]) > 0)
    if not ts:
        raise DenoqError("no activation statistics to partition into timestep groups; run calibration first "
                         "(calib.samples > 0)")
    # integral timesteps index the tables themselves: [0, T); a flow sampler's are 1000 σ ∈ [0, T], read at the
    # nearest training timestep (`denoq.sampling.cond.timestep_index`)
    top = num_train_timesteps if num_train_timesteps is None or isinstance(ts[-1], float) else \
        num_train_timesteps - 1
    if num_train_timesteps is not None and (ts[0] < 0 or ts[-1] > top):
        bad = ts[0] if ts[0] < 0 else ts[-1]
        raise DenoqError(f"calibrated timestep {bad} lies outside [0, {top}] = the scheduler's num_train_timesteps "
                         "range; calibrate with the model's own scheduler config")
    return ts


def _subsample(stats: TensorStats, t: int, m: int) -> tuple[torch.Tensor, float]:
    """At most `m` of timestep t's values, evenly strided (deterministic), and the weight n_t / m_t of each."""
    v = torch.cat(stats.values[t])
    sub = strided(v, m)
    return sub, v.numel() / sub.numel()


def segment_costs(stats: TensorStats, settings: ObserverSettings, zero_point: int,
                  samples_per_timestep: int = SAMPLES_PER_TIMESTEP) -> tuple[list[int], torch.Tensor]:
    """(t_1 < … < t_K, C) with C[i, j] = cost(i, j) of eq. (1) for i ≤ j (inf below the diagonal), float64.

    Q_S uses the observer's clipping interval on the segment's (subsampled) pooled values, the layer's fixed
    `zero_point` and the scale `group_scale` derives from the two: exactly the quantizer the table deploys.

    The mse observer is the expensive one (a grid of MSE_GRID fake-quantizations per segment). Its grid depends
    only on the segment's min-max interval [lo0, hi0], which takes few distinct values (signed: one per timestep
    at most), and the grid errors are sums over timesteps. So, per distinct [lo0, hi0], the per-timestep errors
    of the whole grid are computed once in one [grid, n] tensor and each segment sums its timesteps' columns;
    the first minimum of the sum is the observer's choice (same grid and criterion as `observers.clip_range`).
    """
    ts = _check_timesteps(stats)
    qmin, qmax = grid_range(settings)
    subs = [_subsample(stats, t, samples_per_timestep) for t in ts]
    k = len(ts)
    runs = [(i, j) for i in range(k) for j in range(i, k)]
    extremes = {(i, j): (min(stats.amin[t] for t in ts[i:j + 1]), max(stats.amax[t] for t in ts[i:j + 1]))
                for i, j in runs}
    clip: dict[tuple[int, int], tuple[float, float]] = {}
    if settings.method == "mse":
        minmax = ObserverSettings("minmax", settings.bits, settings.signed, format=settings.format)
        by_key: dict[tuple[float, float], list[tuple[int, int]]] = {}
        for run in runs:
            by_key.setdefault(clip_range(torch.empty(0), *extremes[run], minmax), []).append(run)
        for (lo0, hi0), key_runs in by_key.items():
            need = sorted({t for i, j in key_runs for t in range(i, j + 1)})
            column = {t: c for c, t in enumerate(need)}
            values = torch.cat([subs[t][0] for t in need])
            owner = torch.repeat_interleave(torch.arange(len(need)), torch.tensor([subs[t][0].numel() for t in need]))
            alphas, scales, zps = _mse_grid(lo0, hi0, settings)
            sq = (fake_quantize(values.unsqueeze(0), scales, zps, qmin, qmax, settings.format) - values).pow(2)
            per_t = torch.zeros(len(alphas), len(need), dtype=torch.float64).index_add_(1, owner, sq.double())
            for i, j in key_runs:
                a = alphas[int(torch.argmin(per_t[:, column[i]:column[j] + 1].sum(dim=1)))]
                clip[(i, j)] = (lo0 * a, hi0 * a)
    cost = torch.full((k, k), float("inf"), dtype=torch.float64)
    for i, j in runs:
        values = torch.cat([v for v, _ in subs[i:j + 1]])
        if (i, j) not in clip:
            clip[(i, j)] = clip_range(values, *extremes[(i, j)], settings)
        scale = torch.tensor(group_scale(*clip[(i, j)], settings, zero_point), dtype=torch.float32)
        sq = (fake_quantize(values, scale, zero_point, qmin, qmax, settings.format) - values).pow(2)
        weights = torch.cat([torch.full_like(v, w) for v, w in subs[i:j + 1]])
        cost[i, j] = float((weights.double() * sq.double()).sum())
    return ts, cost


def optimal_partition(cost: torch.Tensor, groups: int) -> tuple[float, list[tuple[int, int]]]:
    """Eq. (2): the split of indices 0..K−1 into `groups` non-empty contiguous runs minimizing Σ cost[i, j].

    Returns (total cost, [(i_1, j_1), …, (i_G, j_G)]) with i_1 = 0, j_G = K − 1, i_{g+1} = j_g + 1. Ties go to the
    smallest split index (deterministic). O(G·K²).
    """
    k = cost.shape[0]
    c = cost.tolist()
    inf = float("inf")
    # best[g][j]: least cost of covering indices 0..j−1 with g runs; arg[g][j]: start of the last run
    best = [[inf] * (k + 1) for _ in range(groups + 1)]
    arg = [[0] * (k + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for g in range(1, groups + 1):
        for j in range(g, k + 1):
            for i in range(g - 1, j):
                total = best[g - 1][i] + c[i][j - 1]
                if total < best[g][j]:
                    best[g][j], arg[g][j] = total, i
    runs, j = [], k
    for g in range(groups, 0, -1):
        i = arg[g][j]
        runs.append((i, j - 1))
        j = i
    return best[groups][k], runs[::-1]


def partition_timesteps(stats: TensorStats, groups: int, settings: ObserverSettings,
                        samples_per_timestep: int = SAMPLES_PER_TIMESTEP) -> list[Segment]:
    """The G contiguous groups of the calibrated timesteps minimizing the layer's quantization error, eq. (1)–(2).

    Returns [(first_t, last_t), …] in ascending t, covering every calibrated timestep once. G = 1 gives the single
    segment (t_1, t_K) without computing costs. G > K (fewer calibrated timesteps than groups) → DenoqError.
    """
    ts = _check_timesteps(stats)
    if groups < 1:
        raise DenoqError(f"activations.timestep_groups = {groups}, but it must be ≥ 1 (1 = off)")
    if groups > len(ts):
        raise DenoqError(f"activations.timestep_groups = {groups} exceeds the {len(ts)} calibrated timesteps; "
                         f"lower activations.timestep_groups to ≤ {len(ts)} or raise calib.steps")
    if groups == 1:
        return [(ts[0], ts[-1])]
    _, cost = segment_costs(stats, settings, layer_zero_point(stats, settings), samples_per_timestep)
    _, runs = optimal_partition(cost, groups)
    return [(ts[i], ts[j]) for i, j in runs]


# -- the per-timestep table ---------------------------------------------------------------------------------------
def segment_of_timestep(segments: list[Segment], num_train_timesteps: int) -> torch.Tensor:
    """For every training timestep t ∈ [0, T) the index of its segment (int64, length T).

    Boundary rule: t belongs to the segment of its *nearest calibrated timestep*, ties going to the smaller one.
    So between segments ending at calibrated timestep a and starting at b, the last t of the earlier segment is
    ⌊(a + b) / 2⌋ (the midpoint, inclusive), and timesteps below the smallest / above the largest calibrated one
    take the first / last segment.
    """
    owner = torch.full((num_train_timesteps,), len(segments) - 1, dtype=torch.int64)
    start = 0
    for g in range(len(segments) - 1):
        last = (segments[g][1] + segments[g + 1][0]) // 2
        owner[start:last + 1] = g
        start = last + 1
    return owner


def scale_table(stats: TensorStats, segments: list[Segment], settings: ObserverSettings,
                num_train_timesteps: int, labels: list[int] | None = None) -> ActQuant:
    """The layer's ActQuant: a float32 scale table of length T, constant on each segment (`segment_of_timestep`).

    `labels[i]` names the group of segment i (default: every segment its own group); segments with one label
    share one scale (the differentiable search's groups need not be contiguous). Zero point: 0 when signed; when
    unsigned the layer's one zero point (`layer_zero_point`: the observer's on all pooled values). Each group's
    scale: the observer's clipping interval on the group's full pooled values (`observe_qparams` semantics, exact
    extremes), turned into a scale under that zero point by `group_scale`. With a single segment this is exactly
    the baseline plan's constant table. Calibrated timesteps outside [0, T) → DenoqError.
    """
    ts = _check_timesteps(stats, num_train_timesteps)
    labels = list(range(len(segments))) if labels is None else labels
    zero_point = layer_zero_point(stats, settings)
    scale_of: dict[int, float] = {}
    for label in sorted(set(labels)):
        seg = [t for t in ts if any(first <= t <= last for (first, last), lb in zip(segments, labels, strict=True)
                                    if lb == label)]
        values = torch.cat([v for t in seg for v in stats.values[t]])
        lo, hi = clip_range(values, min(stats.amin[t] for t in seg), max(stats.amax[t] for t in seg), settings)
        scale_of[label] = group_scale(lo, hi, settings, zero_point)
    scales = torch.tensor([scale_of[lb] for lb in labels], dtype=torch.float32)
    table = scales[segment_of_timestep(segments, num_train_timesteps)]
    return ActQuant(bits=settings.bits, signed=settings.signed, zero_point=zero_point, scale=table,
                    format=settings.format)


def grouped_act_quant(stats: TensorStats, groups: int, settings: ObserverSettings, num_train_timesteps: int,
                      samples_per_timestep: int = SAMPLES_PER_TIMESTEP) -> tuple[ActQuant, list[Segment]]:
    """One layer role's activation quantizer with `groups` timestep groups (ADP-DM): partition, then table.

    The drop-in for the baseline's constant table: with groups = 1 the ActQuant equals `baseline._act_quant`'s.
    Returns the ActQuant and the segments [(first_t, last_t), …] (for the manifest / logs).
    """
    _check_timesteps(stats, num_train_timesteps)
    segments = partition_timesteps(stats, groups, settings, samples_per_timestep)
    return scale_table(stats, segments, settings, num_train_timesteps), segments
