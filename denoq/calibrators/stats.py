"""Activation statistics of the quantizable layers on a CalibrationSet (observers only observe: `torch.ao` style).

For every layer and role (its input, and its output when the target quantizes outputs) this records, per
timestep, the exact min and max and a deterministic subsample of values. Observers turn the pooled values into a
clipping range; the per-timestep records are what timestep-grouped quantization partitions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from denoq.calibrators.calibset import CalibrationSet
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

    def observe(self, x: torch.Tensor, t: int, generator: torch.Generator, name: str) -> None:
        x = x.detach().reshape(-1).to(torch.float32)
        if not torch.isfinite(x).all():
            raise DenoqError(f"NaN/Inf in the activations of {name} at timestep {t} during calibration; the FP "
                             "model is not finite on the calibration inputs (check weights and calib settings)")
        lo, hi = float(x.min()), float(x.max())
        self.amin[t] = min(lo, self.amin.get(t, lo))
        self.amax[t] = max(hi, self.amax.get(t, hi))
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
    last_out: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in layers.items():
        def pre(mod: nn.Module, args: tuple, name: str = name) -> None:
            stats[name].input.observe(args[0], current_t[0], generator, name)
            stats[name].input_ndim = args[0].dim()

        def post(mod: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            last_out[name] = out
            if outputs:
                stats[name].output.observe(out, current_t[0], generator, name)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            for x, t, cond in calib.progress_batches(batch_size, "activation statistics"):
                current_t[0] = t[0].item()  # the sampler's timestep: int, or float (flow)
                result = forward(x, t, cond)
                for name, out in last_out.items():
                    stats[name].is_model_output |= out is result
    finally:
        for h in handles:
            h.remove()
    return stats
