"""CalibrationSet: model inputs (x_t, t, cond) recorded on seeded FP sampling trajectories (docs/architecture.md, Flow).

Quantization ranges are taken where the deployed sampler goes: the FP model is run through the sampler from
seeded noise and the input of every step is recorded. The set is grouped by step, so that every batch drawn from
it holds one timestep (timestep-resolved statistics come for free).

Guided trajectories (a class-conditional model sampled with classifier-free guidance, `record_trajectories(...,
guidance=…)`) are recorded as the deployed sampler runs them: every step calls the model once on the doubled batch
(null label, then the label). `batches` yields those doubled model inputs, so activation statistics, timestep
groups and weight rounding see both halves; `guided_batches` yields the trajectories themselves with their scale,
for PTQD, whose statistics are taken on the guidance-combined output.

Data-parallel calibration (`distributed`): a rank's set holds its shard of the trajectories (`rows`, their global
indices, out of `total`); `batches` still walks the one-process batches and yields this rank's rows of each, and
`layouts` says where those rows sit in them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from denoq.calibrators.distributed import RowLayout, all_gather_objects, shard_rows
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
    scale [N] and `null_cond` the null conditioning (one sample's: the null label, the empty prompt's encoding).
    `rows`: the global indices (ascending) of the N trajectories when they are one rank's shard of `total`
    (data-parallel calibration), None when the set is whole."""

    x: list[torch.Tensor]
    t: list[int] | list[float]  # the sampler's timesteps: training timesteps (DDPM/DDIM), 1000 σ (flow matching)
    cond: Cond = None
    guidance: torch.Tensor | None = None
    null_cond: Cond = None
    conditioning: dict[str, Any] = field(default_factory=dict)  # what conditioned them (the manifest's words)
    rows: torch.Tensor | None = None
    total: int = 0

    @property
    def trajectories(self) -> int:
        """The number of trajectories of the whole set (every rank's)."""
        return self.x[0].shape[0] if self.rows is None else self.total

    def gather_states(self, picks: list[tuple[int, int]]) -> tuple[torch.Tensor, Cond]:
        """The states x and conditioning of the (step index, trajectory) `picks`, in that order, on every rank:
        a shard takes each from the rank that holds it (a collective: every rank must call it)."""
        where = {j: r for r, j in enumerate(self.global_rows.tolist())}
        mine = {(i, j): (self.x[i][where[j]:where[j] + 1], None if self.cond is None else
                         self.cond[where[j]:where[j] + 1]) for i, j in picks if j in where}
        found = {k: v for part in all_gather_objects(mine, "check inputs") for k, v in part.items()}
        x = torch.cat([found[key][0] for key in picks])
        return x, None if self.cond is None else cat([found[key][1] for key in picks])

    def shard(self, rows: torch.Tensor) -> CalibrationSet:
        """This whole set's trajectories `rows` (global indices, ascending: `distributed.shard_rows`) as one rank's
        shard of it."""
        return CalibrationSet([xi[rows] for xi in self.x], self.t, None if self.cond is None else self.cond[rows],
                              None if self.guidance is None else self.guidance[rows], self.null_cond,
                              self.conditioning, rows, self.trajectories)

    def whole(self) -> CalibrationSet:
        """The set with every rank's trajectories, in their global order, on every rank (a collective under a
        shard: every rank must call it); the set itself when it is whole."""
        if self.rows is None:
            return self
        parts = all_gather_objects((self.rows, self.x, self.cond, self.guidance), "calibration trajectories")
        order = torch.argsort(torch.cat([rows for rows, *_ in parts]))
        x = [torch.cat([p[1][i] for p in parts])[order] for i in range(len(self.x))]
        cond = None if self.cond is None else cat([p[2] for p in parts])[order]
        guidance = None if self.guidance is None else torch.cat([p[3] for p in parts])[order]
        return CalibrationSet(x, self.t, cond, guidance, self.null_cond, self.conditioning)

    def whole_rows(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-trajectory tensors of this set's rows ([N, …] each, e.g. states computed from it) with every rank's
        rows, in their global order (a collective under a shard: every rank must call it); `tensors` themselves
        when the set is whole."""
        if self.rows is None:
            return tensors
        parts = all_gather_objects((self.rows, tensors), "per-trajectory states")
        order = torch.argsort(torch.cat([rows for rows, _ in parts]))
        return [torch.cat([p[1][i] for p in parts])[order] for i in range(len(tensors))]

    @property
    def global_rows(self) -> torch.Tensor:
        """The global indices of the trajectories this set holds (0 … N − 1 for a whole set)."""
        return torch.arange(self.x[0].shape[0]) if self.rows is None else self.rows

    def _ranges(self, states: int) -> Iterator[tuple[int, int, int, int]]:
        """(global lo, one-process batch size, local lo, local hi) of each one-process batch of `states`
        trajectories that holds rows of this set."""
        rows = self.global_rows
        total = self.total if self.rows is not None else len(rows)
        for lo in range(0, total, states):
            a, b = (int(torch.searchsorted(rows, v)) for v in (lo, lo + states))
            if b > a:
                yield lo, min(states, total - lo), a, b

    def __len__(self) -> int:
        """The number of model inputs (a guided trajectory state counts twice: both halves of the batch), every
        rank's for a shard."""
        return (self.trajectories if self.x else 0) * len(self.x) * (1 if self.guidance is None else 2)

    def guided_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, Cond, torch.Tensor | None]]:
        """(x, t [B], cond, guidance scales [B] or None) per batch of trajectory states, in step order; each batch
        holds a single timestep (int64, or float32 for a flow-matching sampler's)."""
        for xi, ti in zip(self.x, self.t, strict=True):
            for _, _, lo, hi in self._ranges(batch_size):
                xb = xi[lo:hi]
                cb = None if self.cond is None else self.cond[lo:hi]
                gb = None if self.guidance is None else self.guidance[lo:hi]
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
        return len(self.x) * sum(1 for _ in self._ranges(states)) if self.x else 0

    def layouts(self, batch_size: int) -> Iterator[RowLayout | None]:
        """Beside `batches(batch_size)`: where each batch's rows sit in the one-process batch (`RowLayout`), None
        for a whole set."""
        states = batch_size if self.guidance is None else max(1, batch_size // 2)
        for _ in self.x:
            for lo, total, a, b in self._ranges(states):
                yield (None if self.rows is None
                       else RowLayout.of(self.rows[a:b], lo, total, doubled=self.guidance is not None))

    def batch_rows(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Beside `guided_batches(batch_size)`: the global indices of each batch's trajectories."""
        rows = self.global_rows
        for _ in self.x:
            for _, _, a, b in self._ranges(batch_size):
                yield rows[a:b]

    def progress_batches(self, batch_size: int, desc: str
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Cond]]:
        """`batches(batch_size)` under a progress bar named `desc` (`denoq.log.bar`)."""
        return bar(self.batches(batch_size), total=self.num_batches(batch_size), desc=desc, unit="batch")

    def take(self, steps: list[int], samples: int | None = None) -> CalibrationSet:
        """The recorded steps at indices `steps` (in that order), of the first `samples` trajectories (all: None;
        a shard keeps its rows among the first `samples` of all ranks')."""
        if self.rows is None:
            n = self.x[0].shape[0] if samples is None else samples
        else:
            n = int(torch.searchsorted(self.rows, self.total if samples is None else samples))
        cond = None if self.cond is None else self.cond[:n]
        guidance = None if self.guidance is None else self.guidance[:n]
        rows = None if self.rows is None else self.rows[:n]
        total = self.total if samples is None or self.rows is None else min(samples, self.total)
        return CalibrationSet([self.x[i][:n] for i in steps], [self.t[i] for i in steps], cond, guidance,
                              self.null_cond, self.conditioning, rows, total)

    def guided_eps(self, eps: EpsFn, scales: torch.Tensor | None) -> EpsFn:
        """`eps` as the sampler calls it on these trajectories: guided with `scales` (one per sample of the batch,
        from `guided_batches`) when the trajectories are guided, else `eps` itself."""
        if scales is None:
            return eps
        return classifier_free(eps, self.null_cond, scales)


def record_trajectories(eps: EpsFn, schedule: NoiseSchedule | FlowSchedule, *, sampler: str, steps: int, n_samples: int,
                        sample_shape: tuple[int, ...], seed: int, cond: Cond = None,
                        guidance: torch.Tensor | None = None, null_cond: Cond = None, mu: float | None = None,
                        timestep_scale: float = 1.0, sharded: bool = True) -> CalibrationSet:
    """Run the FP sampler from seeded noise and record the model input at every step; with `guidance` (one
    classifier-free guidance scale per trajectory, [n_samples]) and `null_cond`, each trajectory is sampled with
    guidance at its scale (`denoq.sampling.guidance`), as the deployed sampler runs it. `mu`: a flow schedule's
    resolution shift. `timestep_scale`: the denoiser takes the scheduler's timesteps times it (FluxPipeline's
    t / 1000), and the set records the timesteps the denoiser took. `sharded` (data-parallel calibration,
    `distributed.shard_rows`): every rank draws the noise of all `n_samples` trajectories, runs the model on its
    own rows only and records them (the other rows' states are not computed: their ε is 0).

    Raises DenoqError when the FP model produces NaN/Inf: the calibration would be meaningless.
    """
    xs: list[torch.Tensor] = []
    ts: list[int] = []

    rows = shard_rows(n_samples) if sharded else None
    whole_cond = cond
    if rows is not None:
        cond = None if cond is None else cond[rows]
        guidance = None if guidance is None else guidance[rows]
    if guidance is not None:
        if cond is None or null_cond is None:
            raise DenoqError("guided calibration trajectories need the labels (cond) and the null conditioning")
        eps = classifier_free(eps, null_cond, guidance)
    if timestep_scale != 1.0:
        inner = eps

        def eps(x: torch.Tensor, t: torch.Tensor, c: Cond = None) -> torch.Tensor:
            return inner(x, t * timestep_scale, c)

    if rows is not None:
        eps = _on_rows(eps, rows, cond)

    def record(step: int, t: torch.Tensor, x_t: torch.Tensor, eps_t: torch.Tensor) -> None:
        if rows is not None:
            x_t, eps_t = x_t[rows.to(x_t.device)], eps_t[rows.to(x_t.device)]
        if not (torch.isfinite(x_t).all() and torch.isfinite(eps_t).all()):
            raise DenoqError(f"NaN/Inf in calibration at step {step} (timestep {float(t[0]):g}): the FP model's output "
                             "is not finite; check the model weights and its scheduler config")
        xs.append(x_t.detach().clone())
        ts.append(float(t[0]) * timestep_scale if t.is_floating_point() else int(t[0]))

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sample(eps, schedule, sampler=sampler, steps=steps, shape=(n_samples, *sample_shape), generator=generator,
               cond=whole_cond, callback=record, mu=mu)
    return CalibrationSet(xs, ts, cond, guidance, null_cond, rows=rows, total=n_samples if rows is not None else 0)


def _on_rows(eps: EpsFn, rows: torch.Tensor, cond: Cond) -> EpsFn:
    """`eps` on the whole batch computed on `rows` only (with their conditioning `cond`), 0 on the others."""

    def sharded(x: torch.Tensor, t: torch.Tensor, _cond: Cond = None) -> torch.Tensor:
        out = eps(x[rows.to(x.device)], t[rows.to(t.device)], cond)
        full = out.new_zeros((x.shape[0], *out.shape[1:]))
        full[rows.to(x.device)] = out
        return full

    return sharded


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


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it needs (`run_hooked(stop_after=…)`)."""


def run_hooked(model: torch.nn.Module, calib: CalibrationSet, handles: list, batch_size: int = 64,
               stop_after: torch.nn.Module | None = None, only: range | None = None) -> None:
    """Call `model` (no grad) on every input of `calib` in batches of `batch_size`, then remove the hook `handles`
    (also on an error): the pass that lets forward hooks collect statistics. With `stop_after` (a submodule), each
    call ends when that module returns: the hooks inside it have seen their inputs, the rest is not computed.
    `only`: the positions of the batches to run (all: None)."""
    def stop(_m: torch.nn.Module, _a: tuple, _o: object) -> None:
        raise StopForward

    if stop_after is not None:
        handles = [*handles, stop_after.register_forward_hook(stop)]
    try:
        with torch.no_grad():
            for i, (x, t, cond) in enumerate(calib.batches(batch_size)):
                if only is not None and i not in only:
                    continue
                try:
                    call_denoiser(model, x, t, cond)
                except StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
