"""Latency of a model's graphs in ONNX Runtime, interleaved, and their integer-kernel fusion."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from denoq.engines.ort import OrtBackend
from denoq.engines.ort_report import fusion_report, latency
from toolkit.bench.prepare import Prepared
from toolkit.bench.variants import BY_KEY, CORE, HEADS, SELECTORS, base_of, variant_label
from toolkit.common import log

#: The timestep of every latency input (mid-schedule, as `denoq eval` times).
LATENCY_TIMESTEP = 500


def latency_inputs(shape: Sequence[int], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded N(0, 1) samples of `shape` and LATENCY_TIMESTEP for every sample."""
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
    return x, torch.full((batch,), LATENCY_TIMESTEP, dtype=torch.int64)


def time_interleaved(backends: dict[str, OrtBackend], x: torch.Tensor, t: torch.Tensor, rounds: int,
                     iters: int, target_s: float) -> dict[str, dict[str, Any]]:
    """Median ms per call of every backend on (x, t), the variants interleaved round-robin.

    Every session is warmed up first (3 calls); `iters` = 0 picks the number of calls per measurement so that the
    slowest variant takes about `target_s` (at least 5, at most 200). Round r times the variants in the order
    rotated by r, each with one warm-up call then `iters` calls; the result is the median of the round medians.
    """
    feeds = {k: b.feeds(x, t) for k, b in backends.items()}
    warm = {k: latency(b, feeds[k], warmup=3, iters=3)["median_ms"] for k, b in backends.items()}
    if iters <= 0:
        iters = int(min(200, max(5, round(target_s * 1e3 / max(warm.values())))))
    keys = list(backends)
    per_round: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            per_round[k].append(latency(backends[k], feeds[k], warmup=1, iters=iters)["median_ms"])
    return {k: {"median_ms": statistics.median(v), "round_medians_ms": [round(m, 4) for m in v], "iters": iters}
            for k, v in per_round.items()}


def round_ratios(num_ms: Sequence[float], den_ms: Sequence[float], name: str) -> dict[str, float]:
    """num / den per round (both timed within the same round, so slow load changes on a shared machine cancel),
    then their median (`name`) and range (`name_min`, `name_max`)."""
    ratios = [n / d for n, d in zip(num_ms, den_ms, strict=True)]
    return {name: statistics.median(ratios), f"{name}_min": min(ratios), f"{name}_max": max(ratios)}


def speedups(fp32_ms: Sequence[float], variant_ms: Sequence[float]) -> dict[str, float]:
    """FP32 / variant per round: `speedup`, `speedup_min`, `speedup_max` (`round_ratios`)."""
    return round_ratios(fp32_ms, variant_ms, "speedup")


def overheads(base_ms: Sequence[float], variant_ms: Sequence[float]) -> dict[str, float]:
    """Variant / its base graph per round: `overhead`, `overhead_min`, `overhead_max` (`round_ratios`)."""
    return round_ratios(variant_ms, base_ms, "overhead")


def ort_backend(prep: Prepared, key: str, threads: int) -> OrtBackend:
    """The session of variant `key`: ORT's default integer kernels where the variant says so, denoq's otherwise."""
    return OrtBackend(prep.paths[key], threads=threads, exact_integers=not BY_KEY[key].default_kernels)


def timed_keys(prep: Prepared) -> list[str]:
    """The variants of `prep` to time: the core ones, then the selector and head variants it has."""
    return [*CORE, *(k for k in [*SELECTORS, *HEADS] if k in prep.paths)]


def bench_latency(prep: Prepared, batches: Sequence[int], rounds: int, iters: int, threads: int,
                  target_s: float, groups: int = 1) -> dict[str, Any]:
    """Per batch size (`batch{B}`), every timed variant's `time_interleaved` entry with its `speedups` and, for
    the selector and head variants, its `overheads` against its base graph."""
    backends = {k: ort_backend(prep, k, threads) for k in timed_keys(prep)}
    out: dict[str, Any] = {}
    for batch in batches:
        log(f"{prep.name}: timing batch {batch} ({rounds} rounds × {len(backends)} variants)")
        x, t = latency_inputs(prep.spec.sample_shape, batch)
        res = time_interleaved(backends, x, t, rounds, iters, target_s)
        for k in res:
            res[k].update(speedups(res["fp32"]["round_medians_ms"], res[k]["round_medians_ms"]))
            base = base_of(k)
            if base is not None:
                res[k].update(overheads(res[base]["round_medians_ms"], res[k]["round_medians_ms"]))
        out[f"batch{batch}"] = res
        log("  " + ", ".join(f"{variant_label(k, groups)} {v['median_ms']:.2f} ms ({v['speedup']:.2f}×)"
                             for k, v in res.items()))
    return out


def bench_fusion(prep: Prepared) -> dict[str, Any]:
    """`fusion_report` of every quantized graph of `prep` (what ORT's CPU EP made of the quantized layers); the FP
    graph and graphs timed twice (`same`) are left out."""
    return {k: fusion_report(prep.paths[k], threads=1, exact_integers=not BY_KEY[k].default_kernels)
            for k in timed_keys(prep) if BY_KEY[k].made not in ("fp", "same")}
