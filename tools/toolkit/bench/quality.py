"""Sample quality of a model's graphs: the same sampler and noise for the FP model and every core variant."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from denoq.compiler.backends import EpsFn, torch_eps
from denoq.metrics import fd_between, fd_digits, psnr
from denoq.sampling import NoiseSchedule, sample
from toolkit.bench.prepare import Prepared
from toolkit.bench.timing import ort_backend
from toolkit.bench.variants import CORE, TORCH_FP, label_quality
from toolkit.common import log

#: The sample shape FD-digits measures; other models get PSNR only.
DIGITS_SHAPE = (1, 16, 16)
def sample_from(eps: EpsFn, scheduler_config: dict[str, Any], shape: Sequence[int], *, steps: int, seed: int,
                n: int) -> torch.Tensor:
    """`n` DDIM (η = 0) samples driven by `eps`, from the noise of `seed` (as `denoq.compiler.generate.generate`)."""
    return sample(eps, NoiseSchedule.from_config(scheduler_config), sampler="ddim", steps=steps, eta=0.0,
                  shape=(n, *shape), generator=torch.Generator().manual_seed(seed), cond=None)


def bench_quality(prep: Prepared, *, steps: int, seed: int, n: int, threads: int) -> dict[str, Any]:
    """FD-digits (and its ratio to FP), FD to FP and PSNR vs FP of the FP model and every core variant.

    The FP reference is the PyTorch model; every graph runs in ONNX Runtime through the same sampler and noise.
    FD needs 1×16×16 samples; for other models only PSNR is reported. RuntimeError for a conditional model.
    """
    if prep.spec.cond_shape is not None:
        raise RuntimeError(f"{prep.name} is conditional; the quality bench samples unconditional models only")
    config = prep.artifacts["trt"].manifest["scheduler"]
    shape = prep.spec.sample_shape
    digits = tuple(shape) == DIGITS_SHAPE
    eps: dict[str, EpsFn] = {TORCH_FP: torch_eps(prep.spec.module)}
    eps.update({k: ort_backend(prep, k, threads) for k in CORE})
    samples: dict[str, torch.Tensor] = {}
    rows: dict[str, Any] = {}
    for k, fn in eps.items():
        log(f"{prep.name}: sampling {n} × DDIM {steps} steps with {label_quality(k)}")
        start = time.perf_counter()
        samples[k] = sample_from(fn, config, shape, steps=steps, seed=seed, n=n)
        fp = samples[TORCH_FP]
        rows[k] = {
            "fd_digits": fd_digits(samples[k]) if digits else None,
            "fd_to_fp": fd_between(samples[k], fp) if digits else None,
            "psnr_vs_fp": psnr(samples[k], fp) if k != TORCH_FP else None,
            "seconds": round(time.perf_counter() - start, 1),
        }
        if digits:
            rows[k]["fd_ratio"] = rows[k]["fd_digits"] / rows[TORCH_FP]["fd_digits"]
    return {"sampler": "ddim", "steps": steps, "eta": 0.0, "seed": seed, "n": n, "threads": threads,
            "reference": TORCH_FP, "rows": rows}
