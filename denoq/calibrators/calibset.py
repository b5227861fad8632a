"""CalibrationSet: model inputs (x_t, t, cond) recorded on seeded FP sampling trajectories (DESIGN.md, Flow).

Quantization ranges are taken where the deployed sampler goes: the FP model is run through the sampler from
seeded noise and the input of every step is recorded. The set is grouped by step, so that every batch drawn from
it holds one timestep (timestep-resolved statistics come for free).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from denoq.errors import DenoqError
from denoq.sampling import NoiseSchedule, sample

EpsFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


@dataclass
class CalibrationSet:
    """`x[i]` is the `[N, C, H, W]` batch of trajectory states at timestep `t[i]`; `cond` the conditioning of
    the N trajectories (or None)."""

    x: list[torch.Tensor]
    t: list[int]
    cond: torch.Tensor | None = None

    def __len__(self) -> int:
        return sum(xi.shape[0] for xi in self.x)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(x, t [B] int64, cond) batches in step order; each batch holds a single timestep."""
        for xi, ti in zip(self.x, self.t, strict=True):
            for lo in range(0, xi.shape[0], batch_size):
                xb = xi[lo:lo + batch_size]
                cb = None if self.cond is None else self.cond[lo:lo + batch_size]
                yield xb, torch.full((xb.shape[0],), ti, dtype=torch.int64), cb

    def take(self, steps: list[int], samples: int | None = None) -> CalibrationSet:
        """The recorded steps at indices `steps` (in that order), of the first `samples` trajectories (all: None)."""
        n = self.x[0].shape[0] if samples is None else samples
        cond = None if self.cond is None else self.cond[:n]
        return CalibrationSet([self.x[i][:n] for i in steps], [self.t[i] for i in steps], cond)


def record_trajectories(eps: EpsFn, schedule: NoiseSchedule, *, sampler: str, steps: int, n_samples: int,
                        sample_shape: tuple[int, ...], seed: int, cond: torch.Tensor | None = None,
                        progress: bool = True) -> CalibrationSet:
    """Run the FP sampler from seeded noise and record the model input at every step.

    Raises DenoqError when the FP model produces NaN/Inf: the calibration would be meaningless.
    """
    xs: list[torch.Tensor] = []
    ts: list[int] = []

    def record(step: int, t: torch.Tensor, x_t: torch.Tensor, eps_t: torch.Tensor) -> None:
        if not (torch.isfinite(x_t).all() and torch.isfinite(eps_t).all()):
            raise DenoqError(f"NaN/Inf in calibration at step {step} (timestep {int(t[0])}): the FP model's output "
                             "is not finite; check the model weights and its scheduler config")
        xs.append(x_t.detach().clone())
        ts.append(int(t[0]))

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sample(eps, schedule, sampler=sampler, steps=steps, shape=(n_samples, *sample_shape), generator=generator,
               cond=cond, callback=record, progress=progress)
    return CalibrationSet(xs, ts, cond)
