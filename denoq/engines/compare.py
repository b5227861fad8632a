"""Per-tensor comparison of executors of one quantized graph through polygraphy's Comparator (docs/architecture.md,
engines).

Runners are polygraphy runners named after the sampler backends; `REFERENCE` (ORT CPU on the float32 Q/DQ
graph) and `FP` (ORT CPU on the FP graph) must be among them. The tolerances are stated against the quantization
error e = RMS(reference − FP) rather than elementwise: two correct executors of one quantized graph differ by
rounding flips that propagate, i.e. by errors of the quantization's own size (see `denoq.compiler.validate`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

REFERENCE, FP = "ort", "ort-fp"
DIFF_LIMIT = 2 ** 0.5  # RMS(backend − reference) ≤ √2 · e: equally good executions with independent roundings
ERROR_LIMIT = 1.25  # RMS(backend − FP) ≤ 1.25 · e: the backend adds at most 25 % to the quantization error


def run_comparison(runners: Sequence[Any], feeds: Iterable[Mapping[str, np.ndarray]]) -> Any:
    """polygraphy's `Comparator.run` of every runner over the same feeds (its INFO logging silenced)."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # its per-runner INFO lines would bury the report
    return Comparator.run(list(runners), data_loader=list(feeds))


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a.astype(np.float64)))))


def tensor_checks(results: Any, output: str = "out_sample") -> dict[str, dict[str, Any]]:
    """Per runner (other than the reference and FP), per batch: RMS(backend − reference) and RMS(backend − FP)
    over the quantization error RMS(reference − FP), the SQNR to the reference, and the verdict."""
    by_name = dict(results.items())
    ref, fp = by_name[REFERENCE], by_name[FP]
    out = {}
    for name, iters in by_name.items():
        if name in (REFERENCE, FP):
            continue
        diff, error, sqnr = [], [], []
        for got, r, f in zip(iters, ref, fp, strict=True):
            quant = max(_rms(r[output] - f[output]), 1e-12)
            d = _rms(got[output] - r[output])
            diff.append(d / quant)
            error.append(_rms(got[output] - f[output]) / quant)
            sqnr.append(20 * np.log10(_rms(r[output]) / max(d, 1e-12)))
        out[name] = {"diff_over_quant_error": [round(v, 4) for v in diff],
                     "error_over_quant_error": [round(v, 4) for v in error],
                     "sqnr_db": [round(float(v), 2) for v in sqnr],
                     "passed": max(diff) <= DIFF_LIMIT and max(error) <= ERROR_LIMIT}
    out["reference"] = {"sqnr_vs_fp_db": [round(20 * float(np.log10(_rms(r[output]) / max(_rms(r[output] - f[output]),
                                                                                          1e-12))), 2)
                                          for r, f in zip(ref, fp, strict=True)]}
    return out


