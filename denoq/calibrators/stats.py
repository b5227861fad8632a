"""Activation statistics of the quantizable layers on a CalibrationSet (observers only observe: `torch.ao` style).

For every layer and role (its input, and its output when the target quantizes outputs) this records, per
timestep, the exact min and max and a deterministic subsample of values. Observers turn the pooled values into a
clipping range; the per-timestep records are what timestep-grouped quantization partitions.

Under data-parallel calibration (`distributed`) each rank observes its rows of every batch, drawing the batch's
subsample as one process would (`RowLayout.subsample`), and `reduce_stats` makes every rank's statistics those of
one process: minima and maxima reduced exactly, the subsamples summed into place.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from denoq.calibrators.calibset import CalibrationSet
from denoq.calibrators.distributed import RowLayout, active, all_reduce, check_same
from denoq.errors import DenoqError

SAMPLES_PER_BATCH = 4096


def strided(values: torch.Tensor, m: int) -> torch.Tensor:
    """At most `m` of `values`, evenly strided over them (deterministic); all of them when there are ≤ m."""
    if values.numel() <= m:
        return values
    return values[torch.linspace(0, values.numel() - 1, m).round().long()]


@dataclass
class TensorStats:
    """min/max and sampled values of one tensor, per timestep."""

    amin: dict[int, float] = field(default_factory=dict)
    amax: dict[int, float] = field(default_factory=dict)
    values: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))

    def observe(self, x: torch.Tensor, t: int, generator: torch.Generator, name: str,
                layout: RowLayout | None = None) -> None:
        """Record one batch's activation `x` at timestep `t`; `layout`: where its rows sit in the one-process
        batch (data-parallel calibration), None in one process."""
        x = x.detach().to(torch.float32)
        if not torch.isfinite(x).all():
            raise DenoqError(f"NaN/Inf in the activations of {name} at timestep {t} during calibration; the FP "
                             "model is not finite on the calibration inputs (check weights and calib settings)")
        lo, hi = float(x.min()), float(x.max())
        self.amin[t] = min(lo, self.amin.get(t, lo))
        self.amax[t] = max(hi, self.amax.get(t, hi))
        if layout is not None:
            self.values[t].append(layout.subsample(x, SAMPLES_PER_BATCH, generator))
            return
        x = x.reshape(-1)
        if x.numel() > SAMPLES_PER_BATCH:
            x = x[torch.randint(0, x.numel(), (SAMPLES_PER_BATCH,), generator=generator)]
        self.values[t].append(x.clone())

    def pooled(self) -> tuple[torch.Tensor, float, float]:
        """(all sampled values, exact min, exact max) over every timestep."""
        vals = torch.cat([v for t in sorted(self.values) for v in self.values[t]])
        return vals, min(self.amin.values()), max(self.amax.values())


@dataclass
class LayerStats:
    """Statistics of a layer's input and output; `input_ndim` tells a linear layer on tokens ([B, L, C], exported
    as MatMul) from one on vectors ([B, C], exported as Gemm); `is_model_output` marks the layer whose output is
    the model's output (the ε prediction)."""

    input: TensorStats = field(default_factory=TensorStats)
    output: TensorStats = field(default_factory=TensorStats)
    input_ndim: int = 0
    is_model_output: bool = False


ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def collect_stats(forward: ForwardFn, layers: dict[str, nn.Module], calib: CalibrationSet, *, outputs: bool,
                  batch_size: int = 64, seed: int = 0) -> dict[str, LayerStats]:
    """Run `forward(x, t, cond)` over the calibration set with hooks on `layers` and gather their statistics."""
    stats = {name: LayerStats() for name in layers}
    generator = torch.Generator().manual_seed(seed)
    current_t = [0]
    layout: list[RowLayout | None] = [None]
    last_out: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in layers.items():
        def pre(mod: nn.Module, args: tuple, name: str = name) -> None:
            stats[name].input.observe(args[0], current_t[0], generator, name, layout[0])
            stats[name].input_ndim = args[0].dim()

        def post(mod: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            last_out[name] = out
            if outputs:
                stats[name].output.observe(out, current_t[0], generator, name, layout[0])

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            for (x, t, cond), layout[0] in zip(calib.progress_batches(batch_size, "activation statistics"),
                                               calib.layouts(batch_size), strict=True):
                current_t[0] = t[0].item()  # the sampler's timestep: int, or float (flow)
                result = forward(x, t, cond)
                for name, out in last_out.items():
                    stats[name].is_model_output |= out is result
    finally:
        for h in handles:
            h.remove()
    reduce_stats([s for st in stats.values() for s in (st.input, st.output)])
    return stats


def reduce_stats(stats: list[TensorStats]) -> None:
    """Make every rank's `stats` (the same list on every rank) those of one process over all ranks' rows: minima
    and maxima reduced, each batch's subsample summed into place. A no-op in one process."""
    if not active():
        return
    keys = [sorted(st.amin) for st in stats]
    check_same(repr([[(t, len(st.values[t])) for t in ts] for st, ts in zip(stats, keys, strict=True)]),
               "observed batches", "every rank must observe every batch of every calibration step: run the ranks "
               "with the same recipe and model")
    bounds = torch.tensor([[st.amin[t], -st.amax[t]] for st, ts in zip(stats, keys, strict=True) for t in ts],
                          dtype=torch.float64).reshape(-1, 2)
    bounds = all_reduce(bounds, "min", "activation ranges")
    parts = [v for st, ts in zip(stats, keys, strict=True) for t in ts for v in st.values[t]]
    summed = all_reduce(torch.cat(parts), "sum", "activation samples") if parts else torch.empty(0)
    pieces = iter(summed.split([v.numel() for v in parts]))
    row = iter(bounds.tolist())
    for st, ts in zip(stats, keys, strict=True):
        for t in ts:
            lo, neg_hi = next(row)
            st.amin[t], st.amax[t] = lo, -neg_hi
            st.values[t] = [next(pieces) for _ in st.values[t]]
