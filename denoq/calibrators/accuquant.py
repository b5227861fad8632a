"""Reconstruction of the learnable quantizers: per-step (Q-Diffusion / BRECQ style) or over a window of n sampler
steps (AccuQuant), the window's objectives and gradients in `accuquant_window.py`.

AccuQuant (Lee, Choi, Son, Moon, Jeon, Ham, NeurIPS 2025, arXiv 2510.20348) observes that quantization errors
accumulate over the denoising steps and calibrates by matching the quantized sampler to the FP one over a couple of
consecutive steps, with an implementation whose memory does not grow with the number of steps. Its exact objective
is not public in a form we could read; what follows is ours, built on its idea.

Objectives (`AccuQuantSettings.window`):

- per step (window 0 or 1): on an FP-trajectory input (x_t, t) of the calibration pool,
      L = ‖ε_q(x_t, t) − ε(x_t, t)‖² / ‖ε(x_t, t)‖²                                                       (1)
  the network-output reconstruction of Q-Diffusion / BRECQ at the granularity of the whole model (the same
  granularity as the window objective, so the two differ only in the window).
- window n ≥ 2 (`accuquant_window.py`): from the pool's state x_s both samplers run n steps with the same noise
  draws (2), and the loss weighs the distances of their states after the steps (3) (`objective` end | every) or
  of their model outputs along the way (4) (`objective="outputs"`, the default); its gradient is taken in O(1)
  memory (`backprop="recompute"`) or through one graph ("naive"), stopped at the model inputs (`gradient="stop"`)
  or not ("full").

Start (`start`): "fp" starts every step or window at the pool's FP-trajectory state x_s; "quantized" (ours) at
x̂_s, the state of the quantized sampler's own trajectory from the same initial noise and noise draws
(`quantized_states`, re-run with the hard rounding every REFRESH_ITERS iterations), where the deployed model
really is; both models then run from x̂_s, so (1), (3) and (4) are taken on the inputs the quantized model meets.

Fine-tune (`perstep_iters` = k > 0, ours): the first k iterations use the per-step objective (1), the rest the
window (3): the window then corrects what single steps cannot see, starting from quantizers that already match
each step.

Loss = reconstruction + λ · f_reg (AdaRound's regularizer, `learnable.py`), λ off for the first `warmup` fraction
of the iterations, β annealed linearly from 20 to 2 after it. A non-finite loss or gradient stops the optimization
and keeps the last parameters whose loss was finite (reported, never silent).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from denoq.calibrators.accuquant_window import StepFn, Window, run_window, sampler_step, window_backward
from denoq.calibrators.blockrecon import BlockInputs, block_loss, cache_block, sample_inputs
from denoq.calibrators.calibset import CalibrationSet
from denoq.calibrators.choices import BACKPROPS, GRADIENTS, GRANULARITIES, OBJECTIVES, STARTS
from denoq.calibrators.distributed import all_reduce_grads, rank, sum_floats, world_size
from denoq.calibrators.learnable import INITS, LearnableModel, StagedTwin, staged_twin
from denoq.calibrators.weights import blocks_in_order
from denoq.errors import DenoqError
from denoq.log import bar
from denoq.plan import QuantPlan
from denoq.sampling import EpsFn, NoiseSchedule, module_eps

REFRESH_ITERS = 100  # start="quantized": the quantized trajectories are re-run every this many iterations
BETA_START, BETA_END = 20.0, 2.0
SCALE_LR_FACTOR = 0.1  # the log-scales move slower than the rounding variables
PROBE_STEPS, PROBE_SAMPLES = 8, 16


@dataclass(frozen=True)
class AccuQuantSettings:
    """`window` 0/1 = per-step objective (1), n ≥ 2 = AccuQuant's window (3); `iters` optimizer steps of `batch`
    trajectories; Adam with `lr` (rounding variables; log-scales × SCALE_LR_FACTOR); `round_lambda` λ; `init` of
    the rounding (`learnable.INITS`); `backprop` recompute (O(1) memory) or naive (O(n)); `perstep_iters` of the
    `iters` use the per-step objective before the window's (0 = the window throughout); `objective` the window's
    loss, (3) over its end or every state or (4) over its outputs (`OBJECTIVES`); `start` fp | quantized
    (`STARTS`); `gradient` full (through the model inputs) or stop (2) (`GRADIENTS`);
    `warmup` fraction without the regularizer; `eta` of a DDIM pool; `granularity` network (every layer learns at
    once) or block (one top-level block at a time, `iters` each, on `block_inputs` cached calibration inputs
    under window 0); `seed` of the batches, windows and noise."""

    window: int
    iters: int = 1000
    batch: int = 16
    lr: float = 0.1
    round_lambda: float = 0.01
    init: str = "plan"
    backprop: str = "recompute"
    gradient: str = "stop"
    perstep_iters: int = 0
    objective: str = "outputs"
    start: str = "fp"
    warmup: float = 0.2
    eta: float = 0.0
    granularity: str = "network"
    block_inputs: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window < 0 or self.iters < 1 or self.batch < 1 or not self.lr > 0 or self.round_lambda < 0:
            raise DenoqError(f"AccuQuant settings out of range: {self}; window ≥ 0, iters ≥ 1, batch ≥ 1, lr > 0, "
                             "round_lambda ≥ 0")
        if self.perstep_iters < 0 or (self.window >= 2 and self.perstep_iters >= self.iters):
            raise DenoqError(f"accuquant.perstep_iters={self.perstep_iters} leaves no iteration of the "
                             f"{self.window}-step window out of accuquant.iters={self.iters}; choose "
                             "0 ≤ perstep_iters < iters")
        for name, value, choices in (("init", self.init, INITS), ("backprop", self.backprop, BACKPROPS),
                                     ("objective", self.objective, OBJECTIVES),
                                     ("gradient", self.gradient, GRADIENTS), ("start", self.start, STARTS),
                                     ("granularity", self.granularity, GRANULARITIES)):
            if value not in choices:
                raise DenoqError(f"AccuQuant {name} {value!r} is unknown: choose one of {', '.join(choices)}")
        if self.granularity == "block" and self.start == "quantized":
            raise DenoqError("accuquant.start=quantized runs the whole quantized model's trajectories and is not "
                             "implemented with accuquant.granularity=block; use start=fp or granularity=network")
        if self.block_inputs < 1:
            raise DenoqError(f"accuquant.block_inputs={self.block_inputs} must be ≥ 1")


def check_window(window: int, steps: int) -> None:
    """A window of n ≥ 2 steps needs n consecutive recorded sampler steps."""
    if window > steps:
        raise DenoqError(f"accuquant.window={window} needs {window} consecutive sampler steps but the calibration "
                         f"records calib.steps={steps}; lower accuquant.window or raise calib.steps")


def _anneal(it: int, iters: int, warmup: float) -> float | None:
    """β of the regularizer at iteration `it`, None during the warm-up (no regularizer)."""
    start = int(warmup * iters)
    if it < start:
        return None
    frac = (it - start) / max(iters - start - 1, 1)
    return BETA_START + (BETA_END - BETA_START) * frac


def _finite_grads(params: list[torch.Tensor]) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def probe_error(q_eps: EpsFn, fp_eps: EpsFn, pool: CalibrationSet) -> float:
    """Mean relative ε error ‖ε_q − ε‖ / ‖ε‖ over PROBE_STEPS evenly spaced steps × PROBE_SAMPLES trajectories."""
    idx = sorted({round(i * (len(pool.t) - 1) / max(PROBE_STEPS - 1, 1)) for i in range(PROBE_STEPS)})
    probe = pool.take(idx, min(PROBE_SAMPLES, pool.trajectories)).whole()
    errs = []
    with torch.no_grad():
        for x, step in zip(probe.x, probe.t, strict=True):
            t = torch.full((x.shape[0],), step, dtype=torch.int64)
            cond = probe.cond
            ref = fp_eps(x, t, cond)
            errs.append(float((q_eps(x, t, cond) - ref).norm() / ref.norm().clamp_min(1e-12)))
    return sum(errs) / len(errs)


def pool_noise(fp_eps: EpsFn, pool: CalibrationSet, step: StepFn, prev: dict[int, int]) -> list[torch.Tensor]:
    """The noise draw z_k that took each FP trajectory of the pool from x_k to x_{k+1} (one per recorded step but
    the last), recovered from the step's affine form: z_k = (x_{k+1} − S_k(x_k, ε, 0)) / (S_k(x_k, ε, 1) −
    S_k(x_k, ε, 0)); zero where the step adds no noise (DDIM η = 0)."""
    zs = []
    with torch.no_grad():
        for k in range(len(pool.t) - 1):
            x, t = pool.x[k], pool.t[k]
            out = fp_eps(x, torch.full((x.shape[0],), t, dtype=torch.int64), pool.cond)
            mean = step(x, out, t, prev[t], torch.zeros_like(x))
            std = step(x, out, t, prev[t], torch.ones_like(x)) - mean
            zs.append(torch.where(std.abs() > 0, (pool.x[k + 1] - mean) / std.where(std.abs() > 0, 1.0), 0.0))
    return zs


def quantized_states(q_eps: EpsFn, pool: CalibrationSet, step: StepFn, prev: dict[int, int],
                     zs: list[torch.Tensor]) -> list[torch.Tensor]:
    """x̂_k: the quantized sampler's own trajectories from the pool's initial noise with its noise draws `zs`
    (`pool_noise`): where the deployed model really is at each step, accumulated error included."""
    pairs = [(t, prev[t]) for t in pool.t[:-1]]
    end, xs, _ = run_window(q_eps, Window(pool.x[0], pairs, zs, pool.cond), step)
    return [*xs, end]  # the latents before each step (x̂_0 = the pool's noise), then the last


def trajectory_drift(q_states: list[torch.Tensor], pool: CalibrationSet) -> float:
    """‖x̂ − x‖ / ‖x‖ at the pool's last recorded step: how far the quantized trajectories have drifted."""
    return float((q_states[-1] - pool.x[-1]).norm() / pool.x[-1].norm().clamp_min(1e-12))


def objective_backward(q_eps: EpsFn, fp_eps: EpsFn, pool: CalibrationSet, rows: torch.Tensor, n: int,
                       settings: AccuQuantSettings, step: StepFn, prev: dict[int, int], g: torch.Generator,
                       q_states: list[torch.Tensor] | None = None, part: torch.Tensor | None = None) -> float:
    """One draw of the objective for the pool's trajectories `rows`: a step (n ≤ 1, loss (1)) or a window of n
    steps (loss (3) or (4) with `settings`' objective, gradient and backprop), drawn from `g` (the window's noise
    too); its gradient is accumulated into the quantizers' .grad. Returns the loss. `prev` maps each timestep to the
    next. With `q_states` (the quantized trajectories, `quantized_states`) the step or window starts at their
    state instead of the FP trajectories' (both models run from there). With `part` (positions in `rows`: one
    rank's share of the batch) only those trajectories run, against the whole batch's energies (summed over the
    ranks), so the ranks' losses and gradients add up to the batch's."""
    own = rows if part is None else rows[part]
    cond = None if pool.cond is None else pool.cond[own]
    S = len(pool.t)
    starts = pool.x if q_states is None else q_states
    if n <= 1:
        s = int(torch.randint(S, (1,), generator=g))
        x, t = starts[s][own], torch.full((len(own),), pool.t[s], dtype=torch.int64)
        with torch.no_grad():
            ref = fp_eps(x, t, cond)
        energy = sum_floats([float(ref.pow(2).sum())], "the per-step loss's energy")[0]
        loss = (q_eps(x, t, cond) - ref).pow(2).sum() / max(energy, 1e-12)
        loss.backward()
        return float(loss.detach())
    s = int(torch.randint(S - n + 1, (1,), generator=g))
    pairs = [(pool.t[s + k], prev[pool.t[s + k]]) for k in range(n)]
    noise = [torch.randn((len(rows), *starts[s].shape[1:]), generator=g) for _ in range(n)]  # the whole batch's
    noise = noise if part is None else [z[part] for z in noise]
    return window_backward(q_eps, fp_eps, Window(starts[s][own], pairs, noise, cond), step, settings.objective,
                           settings.backprop, settings.gradient)


def _optimize(q: LearnableModel | StagedTwin, names: list[str] | None, settings: AccuQuantSettings,
              draw: Callable[[int], float], desc: str) -> tuple[list[float], str | None]:
    """Adam over the rounding variables and log-scales of the layers `names` (None: all): at each iteration
    `draw(it)` accumulates the reconstruction loss's gradient and returns its value (under torchrun, of this rank's
    share of the batch; both are summed over the ranks), λ·f_reg of those layers is added after the warm-up.
    Returns the losses and why the optimization stopped early (None: it ran to the end); on a non-finite loss or
    gradient the last finite parameters are restored."""
    rounding, scales = q.rounding_parameters(names), q.scale_parameters(names)
    params = [*rounding, *scales]
    optimizer = torch.optim.Adam([{"params": rounding, "lr": settings.lr},
                                  {"params": scales, "lr": settings.lr * SCALE_LR_FACTOR}])
    losses: list[float] = []
    stopped = None
    last_good = [p.detach().clone() for p in params]
    for it in bar(range(settings.iters), desc=desc, unit="iter", leave=names is None):
        optimizer.zero_grad(set_to_none=True)
        rec = draw(it)  # under torchrun this rank's share: the gradients and losses are summed over the ranks
        all_reduce_grads(params, "the reconstruction gradients")
        rec = sum_floats([rec], "the reconstruction loss")[0]
        beta = _anneal(it, settings.iters, settings.warmup)
        reg = 0.0
        if beta is not None and settings.round_lambda > 0:
            reg_t = settings.round_lambda * q.regularizer(beta, names)
            reg_t.backward()
            reg = float(reg_t.detach())
        if not math.isfinite(rec + reg) or not _finite_grads(params):
            stopped = (f"the loss or its gradient became non-finite at iteration {it + 1} of {settings.iters} "
                       f"(loss {rec + reg!r}); kept the quantizers of iteration {it}: lower accuquant.lr")
            break
        last_good = [p.detach().clone() for p in params]
        losses.append(rec + reg)
        optimizer.step()
    if stopped is None and not all(bool(torch.isfinite(p).all()) for p in params):
        stopped = f"the quantizers became non-finite after iteration {settings.iters}; kept the last finite ones"
    if stopped is not None:
        with torch.no_grad():
            for p, good in zip(params, last_good, strict=True):
                p.copy_(good)
    return losses, stopped


def _objective_name(settings: AccuQuantSettings) -> str:
    n = settings.window
    if settings.granularity == "block" and n == 0:
        return "each block's output (BRECQ)"
    states = {"end": "", "every": ", every state", "outputs": ", model outputs"}[settings.objective]
    objective = "per-step" if n <= 1 else f"window of {n} steps{states}"
    if n > 1 and settings.perstep_iters:
        objective = f"per-step for {settings.perstep_iters} iterations, then {objective}"
    return objective + (", from the quantized trajectories" if settings.start == "quantized" else "")


def reconstruct(model: nn.Module, plan: QuantPlan, pool: CalibrationSet, schedule: NoiseSchedule, sampler: str,
                num_steps: int, settings: AccuQuantSettings
                ) -> tuple[QuantPlan, dict[str, Any]]:
    """Learn the plan's weight rounding and input scales with the objective of `settings.window` on `pool` (every
    step of `sampler` with `num_steps` steps, FP trajectories in sampling order), all layers at once or one block
    at a time (`settings.granularity`). Returns the plan with hard rounding and the learned scales, and a report
    (losses, probe errors before / after, per block in forward order its losses and seconds, seconds, and
    `stopped`: why an optimization stopped early, or None)."""
    n = settings.window
    check_window(n, len(pool.t))
    expected = schedule.timesteps(num_steps, sampler).tolist()
    if list(pool.t) != expected:
        raise DenoqError(f"AccuQuant needs every step of {sampler} {num_steps} in sampling order; the calibration "
                         f"pool has timesteps {pool.t[:4]}…; record the pool with the same sampler and steps")
    prev = dict(zip(expected, schedule.prev_timesteps(num_steps, sampler).tolist(), strict=True))
    start = time.perf_counter()
    if settings.granularity == "block" and n == 0:  # one block's quantizers at a time, on the model's own modules
        with staged_twin(model, plan, settings.init) as twin:
            return _reconstruct(twin, model, plan, pool, schedule, sampler, prev, settings, start)
    return _reconstruct(LearnableModel(model, plan, init=settings.init).train(), model, plan, pool, schedule, sampler,
                        prev, settings, start)


def _reconstruct(q: LearnableModel | StagedTwin, model: nn.Module, plan: QuantPlan, pool: CalibrationSet,
                 schedule: NoiseSchedule, sampler: str, prev: dict[int, int], settings: AccuQuantSettings,
                 start: float) -> tuple[QuantPlan, dict[str, Any]]:
    """`reconstruct` on the quantized model `q` (`prev`: each of the pool's timesteps to the next; `start`: when it
    began, for the report's seconds)."""
    n = settings.window
    fp_eps = module_eps(model)
    q_eps = module_eps(q)
    step = sampler_step(schedule, sampler, settings.eta)
    g = torch.Generator().manual_seed(settings.seed)
    # the sampler's steps / windows draw from every trajectory on every rank (a shard's pool is gathered) and each
    # rank runs its share of the batch; the cached block inputs are gathered where they are drawn (`cache_block`)
    whole = pool.whole() if settings.granularity == "network" or n > 0 else pool
    before = probe_error(module_eps(q.hard()), fp_eps, pool)  # the hard start
    q.hard(False)
    zs = pool_noise(fp_eps, pool, step, prev) if settings.start == "quantized" else None  # this rank's trajectories
    q_states: list[torch.Tensor] | None = None
    drift: list[float] = []

    def drifted(eps: EpsFn, zs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The quantized trajectories (each rank runs its own, every rank gets them all), their drift recorded."""
        states = pool.whole_rows(quantized_states(eps, pool, step, prev, zs))
        drift.append(round(trajectory_drift(states, whole), 6))
        return states

    def sampler_draw(it: int) -> float:
        nonlocal q_states
        if zs is not None and it % REFRESH_ITERS == 0:
            q_states = drifted(module_eps(q.hard()), zs)
            q.hard(False)
        rows = torch.randperm(whole.trajectories, generator=g)[:settings.batch]
        part = None if world_size() == 1 else torch.arange(rank(), len(rows), world_size())
        return objective_backward(q_eps, fp_eps, whole, rows, n if it >= settings.perstep_iters else 0, settings,
                                  step, prev, g, q_states, part)

    desc = f"accuquant window {n}" if n > 1 else "per-step reconstruction"
    losses: list[float] = []
    stopped: list[str] = []
    blocks: list[dict[str, Any]] = []  # a list: the forward order survives the manifest's sorted keys
    if settings.granularity == "network":
        losses, why = _optimize(q, None, settings, sampler_draw, desc)
        stopped += [why] if why else []
    else:
        layers = {name: model.get_submodule(name) for name in plan.layers}
        inputs = sample_inputs(pool, settings.block_inputs, settings.seed)
        done: list[str] = []
        order = blocks_in_order(model, layers, pool)
        for b, (block, names) in enumerate(bar(order.items(), desc="block-wise reconstruction", unit="block")):
            t0 = time.perf_counter()
            q.stage(done, names)
            if n == 0:
                data = cache_block(q_eps, q.model.get_submodule(block), fp_eps, model.get_submodule(block), pool,
                                   inputs, plan.num_train_timesteps)

                def block_draw(it: int, data: BlockInputs = data, block: str = block) -> float:
                    index = torch.randperm(len(data), generator=g)[:settings.batch]
                    loss = block_loss(q.model.get_submodule(block), data, index, q.clock,
                                      index[rank()::world_size()])
                    loss.backward()
                    return float(loss.detach())

            part, why = _optimize(q, names, settings, sampler_draw if n else block_draw,
                                  f"{block} ({b + 1}/{len(order)})")
            losses += part
            stopped += [f"{block}: {why}"] if why else []
            blocks.append({"block": block, "layers": len(names), "iters": len(part),
                           "seconds": round(time.perf_counter() - t0, 2),
                           **({"loss_first": round(part[0], 6), "loss_last": round(part[-1], 6)} if part else {})})
            done += names
    q.hard()
    after = probe_error(q_eps, fp_eps, pool)
    every = max(1, len(losses) // 50)
    if zs is not None:
        drifted(q_eps, zs)
    info = {"window": n, "objective": _objective_name(settings), "granularity": settings.granularity,
            "iters": len(losses), "backprop": settings.backprop if n > 1 else "per-step",
            "gradient": settings.gradient if n > 1 else "per-step", "init": settings.init, "start": settings.start,
            **({"trajectory_drift": drift} if drift else {}), **({"blocks": blocks} if blocks else {}),
            "loss_curve": [round(v, 6) for v in losses[::every]], "probe_eps_error_before": round(before, 6),
            "probe_eps_error_after": round(after, 6), "stopped": "; ".join(stopped) or None,
            "seconds": round(time.perf_counter() - start, 2)}
    return q.export_plan(), info
