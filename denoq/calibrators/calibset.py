"""CalibrationSet: model inputs (x_t, t, cond) recorded on seeded FP sampling trajectories (docs/architecture.md, Flow).

Quantization ranges are taken where the deployed sampler goes: the FP model is run through the sampler from
seeded noise and the input of every step is recorded. The set is grouped by step, so that every batch drawn from
it holds one timestep (timestep-resolved statistics come for free).

Guided trajectories (a class-conditional model sampled with classifier-free guidance, `record_trajectories(...,
guidance=…)`) are recorded as the deployed sampler runs them: every step calls the model once on the doubled batch
(null label, then the label). `batches` yields those doubled model inputs, so activation statistics, timestep
groups and weight rounding see both halves; `guided_batches` yields the trajectories themselves with their scale,
for PTQD, whose statistics are taken on the guidance-combined output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from denoq.errors import DenoqError
from denoq.log import bar
from denoq.sampling import FlowSchedule, NoiseSchedule, sample
from denoq.sampling.cond import Cond, Conditioning, batch_of, call_denoiser, cat, repeat_rows
from denoq.sampling.guidance import classifier_free

EpsFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


@dataclass
class CalibrationSet:
    """`x[i]` is the `[N, C, H, W]` batch of trajectory states at timestep `t[i]`; `cond` the conditioning of
    the N trajectories (None, one tensor or a `Conditioning`); for guided trajectories `guidance` holds each one's
    scale [N] and `null_cond` the null conditioning (one sample's: the null label, the empty prompt's encoding)."""

    x: list[torch.Tensor]
    t: list[int] | list[float]  # the sampler's timesteps: training timesteps (DDPM/DDIM), 1000 σ (flow matching)
    cond: Cond = None
    guidance: torch.Tensor | None = None
    null_cond: Cond = None
    conditioning: dict[str, Any] = field(default_factory=dict)  # what conditioned them (the manifest's words)

    def __len__(self) -> int:
        """The number of model inputs (a guided trajectory state counts twice: both halves of the batch)."""
        return sum(xi.shape[0] for xi in self.x) * (1 if self.guidance is None else 2)

    def guided_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, Cond, torch.Tensor | None]]:
        """(x, t [B], cond, guidance scales [B] or None) per batch of trajectory states, in step order; each batch
        holds a single timestep (int64, or float32 for a flow-matching sampler's)."""
        for xi, ti in zip(self.x, self.t, strict=True):
            for lo in range(0, xi.shape[0], batch_size):
                xb = xi[lo:lo + batch_size]
                cb = None if self.cond is None else self.cond[lo:lo + batch_size]
                gb = None if self.guidance is None else self.guidance[lo:lo + batch_size]
                dtype = torch.float32 if isinstance(ti, float) else torch.int64
                yield xb, torch.full((xb.shape[0],), ti, dtype=dtype), cb, gb

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, Cond]]:
        """(x, t [B] int64, cond) model inputs in step order; each batch holds a single timestep. For guided
        trajectories each batch of states is the doubled batch the model sees (null half first, `B` = 2 × at most
        `batch_size` // 2 states)."""
        states = batch_size if self.guidance is None else max(1, batch_size // 2)
        for xb, tb, cb, gb in self.guided_batches(states):
            if gb is None:
                yield xb, tb, cb
            else:
                yield torch.cat([xb, xb]), torch.cat([tb, tb]), cat([repeat_rows(self.null_cond, cb, batch_of(cb)), cb])

    def num_batches(self, batch_size: int) -> int:
        """How many batches `batches(batch_size)` yields."""
        states = batch_size if self.guidance is None else max(1, batch_size // 2)
        return sum(-(-xi.shape[0] // states) for xi in self.x)

    def progress_batches(self, batch_size: int, desc: str
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Cond]]:
        """`batches(batch_size)` under a progress bar named `desc` (`denoq.log.bar`)."""
        return bar(self.batches(batch_size), total=self.num_batches(batch_size), desc=desc, unit="batch")

    def take(self, steps: list[int], samples: int | None = None) -> CalibrationSet:
        """The recorded steps at indices `steps` (in that order), of the first `samples` trajectories (all: None)."""
        n = self.x[0].shape[0] if samples is None else samples
        cond = None if self.cond is None else self.cond[:n]
        guidance = None if self.guidance is None else self.guidance[:n]
        return CalibrationSet([self.x[i][:n] for i in steps], [self.t[i] for i in steps], cond, guidance,
                              self.null_cond, self.conditioning)

    def guided_eps(self, eps: EpsFn, scales: torch.Tensor | None) -> EpsFn:
        """`eps` as the sampler calls it on these trajectories: guided with `scales` (one per sample of the batch,
        from `guided_batches`) when the trajectories are guided, else `eps` itself."""
        if scales is None:
            return eps
        return classifier_free(eps, self.null_cond, scales)


def record_trajectories(eps: EpsFn, schedule: NoiseSchedule | FlowSchedule, *, sampler: str, steps: int, n_samples: int,
                        sample_shape: tuple[int, ...], seed: int, cond: Cond = None,
                        guidance: torch.Tensor | None = None, null_cond: Cond = None, mu: float | None = None,
                        timestep_scale: float = 1.0) -> CalibrationSet:
    """Run the FP sampler from seeded noise and record the model input at every step; with `guidance` (one
    classifier-free guidance scale per trajectory, [n_samples]) and `null_cond`, each trajectory is sampled with
    guidance at its scale (`denoq.sampling.guidance`), as the deployed sampler runs it. `mu`: a flow schedule's
    resolution shift. `timestep_scale`: the denoiser takes the scheduler's timesteps times it (FluxPipeline's
    t / 1000), and the set records the timesteps the denoiser took.

    Raises DenoqError when the FP model produces NaN/Inf: the calibration would be meaningless.
    """
    xs: list[torch.Tensor] = []
    ts: list[int] = []

    def record(step: int, t: torch.Tensor, x_t: torch.Tensor, eps_t: torch.Tensor) -> None:
        if not (torch.isfinite(x_t).all() and torch.isfinite(eps_t).all()):
            raise DenoqError(f"NaN/Inf in calibration at step {step} (timestep {float(t[0]):g}): the FP model's output "
                             "is not finite; check the model weights and its scheduler config")
        xs.append(x_t.detach().clone())
        ts.append(float(t[0]) * timestep_scale if t.is_floating_point() else int(t[0]))

    if guidance is not None:
        if cond is None or null_cond is None:
            raise DenoqError("guided calibration trajectories need the labels (cond) and the null conditioning")
        eps = classifier_free(eps, null_cond, guidance)
    if timestep_scale != 1.0:
        inner = eps

        def eps(x: torch.Tensor, t: torch.Tensor, c: Cond = None) -> torch.Tensor:
            return inner(x, t * timestep_scale, c)

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sample(eps, schedule, sampler=sampler, steps=steps, shape=(n_samples, *sample_shape), generator=generator,
               cond=cond, callback=record, mu=mu)
    return CalibrationSet(xs, ts, cond, guidance, null_cond)


def record_calls(module: torch.nn.Module, run: Callable[[torch.nn.Module], object],
                 cond_input: str | None) -> CalibrationSet:
    """The model inputs of every call `run(module)` makes to `module` (a user's own sampling loop: Model
    Optimizer's `forward_loop`), as a CalibrationSet grouped by timestep in the order they first appear.

    Each call must carry one integral timestep for its whole batch; calls at the same timestep are concatenated in
    call order, and every timestep must then hold the same rows' conditioning (`cond_input`'s keyword), as a
    sampling loop that runs each batch through every step gives. DenoqError otherwise, or when `run` never calls
    the model."""
    calls: list[tuple[torch.Tensor, int, Cond]] = []

    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = torch.as_tensor(args[1] if len(args) > 1 else kwargs.get("timestep")).detach().cpu().reshape(-1)
        if not torch.all(t == t[0]) or not torch.equal(t.float(), t.float().round()):
            raise DenoqError(f"forward_loop called the model at timesteps {t.tolist()}: calibration needs one "
                             "integral timestep per call (the scheduler's integer timesteps)")
        calls.append((x.detach().float().cpu(), int(t[0]), _call_cond(args, kwargs, cond_input)))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run(module)
    finally:
        handle.remove()
    if not calls:
        raise DenoqError("forward_loop never called the model; run the pipeline or the model inside it")
    order = list(dict.fromkeys(t for _, t, _ in calls))
    xs = [torch.cat([x for x, t, _ in calls if t == step]) for step in order]
    conds = [cat([c for _, t, c in calls if t == step]) for step in order]
    if len({x.shape[0] for x in xs}) > 1 or not all(_same(c, conds[0]) for c in conds):
        raise DenoqError("forward_loop's calls hold different rows or conditioning at different timesteps; run every "
                         "batch through all steps with the same conditioning (one sampling loop per batch)")
    return CalibrationSet(x=xs, t=order, cond=conds[0], conditioning={"source": "forward_loop"})


def _call_cond(args: tuple, kwargs: dict, cond_input: str | None) -> Cond:
    """The conditioning of one denoiser call: the `cond_input` argument (keyword or third positional), with
    diffusers' `added_cond_kwargs` as a `Conditioning`."""
    if cond_input is None:
        return None
    cond = kwargs.get(cond_input, args[2] if len(args) > 2 else None)
    added = kwargs.get("added_cond_kwargs")
    if cond is None:
        return None
    if added:
        return Conditioning({cond_input: cond.detach().cpu(), **{k: v.detach().cpu() for k, v in added.items()}})
    return cond.detach().cpu()


def _same(a: Cond, b: Cond) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, Conditioning) or isinstance(b, Conditioning):
        return (isinstance(a, Conditioning) and isinstance(b, Conditioning) and a.tensors.keys() == b.tensors.keys()
                and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors))
    return torch.equal(a, b)


def run_hooked(model: torch.nn.Module, calib: CalibrationSet, handles: list, batch_size: int = 64) -> None:
    """Call `model` (no grad) on every input of `calib` in batches of `batch_size`, then remove the hook `handles`
    (also on an error): the pass that lets forward hooks collect statistics."""
    try:
        with torch.no_grad():
            for x, t, cond in calib.batches(batch_size):
                call_denoiser(model, x, t, cond)
    finally:
        for h in handles:
            h.remove()
