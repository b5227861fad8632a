"""Reconstruction of the learnable quantizers: per-step (Q-Diffusion / BRECQ style) or over a window of n sampler
steps (AccuQuant), with the window's gradients in O(1) memory.

AccuQuant (Lee, Choi, Son, Moon, Jeon, Ham, NeurIPS 2025, arXiv 2510.20348) observes that quantization errors
accumulate over the denoising steps and calibrates by matching the quantized sampler to the FP one over a couple of
consecutive steps, with an implementation whose memory does not grow with the number of steps. Its exact objective
is not public in a form we could read; what follows is ours, built on its idea.

Objectives (`AccuQuantSettings.window`):

- per step (window 0 or 1): on an FP-trajectory input (x_t, t) of the calibration pool,
      L = ‖ε_q(x_t, t) − ε(x_t, t)‖² / ‖ε(x_t, t)‖²                                                       (1)
  the network-output reconstruction of Q-Diffusion / BRECQ at the granularity of the whole model (the same
  granularity as the window objective, so the two differ only in the window).
- window n ≥ 2: from the FP state x_s of the pool, both samplers run n steps with the same noise draws,
      x^q_{k+1} = S_k(x^q_k, ε_q(sg(x^q_k), t_k)),   x^fp_{k+1} = S_k(x^fp_k, ε(x^fp_k, t_k)),             (2)
  and the loss weighs the distances of the states after the steps,
      L = Σ_{j=1..n} w_j ‖x^q_{s+j} − x^fp_{s+j}‖²,   e_k = ‖S_k(x^fp_k, ε_k) − S_k(x^fp_k, 0)‖²             (3)
  `objective="end"` (the issue's AccuQuant window): only the state after the n steps, w_n = 1 / Σ_k e_k;
  `objective="every"` (ours): every state of the window, w_j = 1 / Σ_{i≤n} Σ_{k≤i} e_k, so its first term is the
  per-step loss of the window's first step and the later ones add the accumulated error, which the end state
  alone lets cancel between steps.
  `objective="outputs"` (ours, the default, after the paper's "discrepancies between outputs … within a couple of
  denoising steps"): the quantized model's outputs along its own simulated window against the FP model's along
  the FP one,
      L = Σ_k u_k ‖ε_q(x^q_k, t_k) − ε(x^fp_k, t_k)‖²,   u_k = 1 / Σ_k ‖ε(x^fp_k, t_k)‖²                     (4)
  so its first term is the per-step loss (1) of the window's first step, n = 1 is (1) exactly (no x-space, so
  no x̂_0 clipping in the loss), and every later term sees the accumulated drift x^q_k − x^fp_k in its input.
  S_k is the sampler's step (`denoq.sampling`: DDIM with η or DDPM, x̂_0 clipping included), sg a stop-gradient on
  the model's *input*: the gradient flows through the sampler's own x-path and through each step's ε_q, not
  through ε_q's dependence on its input (`gradient="stop"`; "full" below drops sg). e_k is
  the energy the FP model's prediction puts into step k (`eps_energies`), so for n = 1 and an affine step (3) is
  (1) exactly, and windows of any length and position weigh alike.

O(1) memory (`backprop="recompute"`): S_k is differentiable and cheap. Run the window without gradients keeping
only the latents x^q_k; go back over the steps with λ_{n} = 0 and, at step k, λ_{k+1} += 2 w_{k+1} (x^q_{k+1} −
x^fp_{k+1}); recompute ε_q,k = ε_q(x^q_k) and S_k(x^q_k, ε_q,k) as one graph and back-propagate λ_{k+1} through
it: into the quantizers through ε_q,k, and into λ_k = ∂/∂x^q_k (through S_k's x-path; under "full" also through
ε_q's input); under (4) the graph of step k also holds its output term u_k ‖ε_q,k − ε_k‖², whose gradient
joins λ's. One model graph is alive at a time; the latents are the only thing that grows with n. For the end
objective, "stop" and an affine step (no clipping) the quantizers receive b_k (Π_{j>k} a_j) · 2r / norm through
ε_q,k, the "coefficient · r" of the issue.

Gradient (`gradient`): "stop" (the default) is (2) as written; "full" (ours) drops the stop-gradient, so λ also
flows through each ε_q's input, λ_k = (∂S_k/∂x + ∂S_k/∂ε · ∂ε_q/∂x)ᵀ λ_{k+1}: the exact gradient of (3) or (4),
the adjoint of the whole window. It costs the same one recomputed graph of the model and S_k per step (its input
now requires a gradient), so memory stays O(1). Under "stop" an error of step k reaches the end through the
sampler alone, as if the later steps' models did not react to their drifted inputs; under "full" the gradient
follows the real trajectory, reactions included. Under (4) the loss has no x-space term, so with "stop" λ stays 0:
each output term trains the quantizers at the input the window's earlier quantized steps left, and no term
reaches an earlier step. Measured on `digits` W4A8 (README): with (3) a window of 2 ends nearer FP under "full"
than under "stop" on each of four calibration seeds; with (4) "full" stalls on some seeds (∂ε_q/∂x grows like
1/σ_t at low noise, so late windows send large, noisy gradients into their first step) and "stop" ends nearer FP
than per-step reconstruction on seven of eight seeds (DDIM 50, 1024 samples), hence the default.
`backprop="naive"` builds the whole window as one graph, memory O(n), with either gradient:
`window_loss(..., stop_gradient=...)` is that graph, the reference the recompute gradients are tested against.

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

from denoq.calibrators.calibset import CalibrationSet
from denoq.calibrators.learnable import INITS, LearnableModel
from denoq.errors import DenoqError
from denoq.log import bar
from denoq.plan import QuantPlan
from denoq.sampling import NoiseSchedule, module_eps
from denoq.sampling.ddim import ddim_step
from denoq.sampling.ddpm import ddpm_step

BACKPROPS = ("recompute", "naive")
GRADIENTS = ("full", "stop")
OBJECTIVES = ("end", "every", "outputs")
STARTS = ("fp", "quantized")
REFRESH_ITERS = 100  # start="quantized": the quantized trajectories are re-run every this many iterations
BETA_START, BETA_END = 20.0, 2.0
SCALE_LR_FACTOR = 0.1  # the log-scales move slower than the rounding variables
PROBE_STEPS, PROBE_SAMPLES = 8, 16
EpsFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
StepFn = Callable[[torch.Tensor, torch.Tensor, int, int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AccuQuantSettings:
    """`window` 0/1 = per-step objective (1), n ≥ 2 = AccuQuant's window (3); `iters` optimizer steps of `batch`
    trajectories; Adam with `lr` (rounding variables; log-scales × SCALE_LR_FACTOR); `round_lambda` λ; `init` of
    the rounding (`learnable.INITS`); `backprop` recompute (O(1) memory) or naive (O(n)); `perstep_iters` of the
    `iters` use the per-step objective before the window's (0 = the window throughout); `objective` the window's
    loss, (3) over its end or every state or (4) over its outputs (`OBJECTIVES`); `start` fp | quantized
    (`STARTS`); `gradient` full (through the model inputs) or stop (2) (`GRADIENTS`);
    `warmup` fraction without the regularizer; `eta` of a DDIM pool;
    `seed` of the batches, windows and noise."""

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
                                     ("gradient", self.gradient, GRADIENTS), ("start", self.start, STARTS)):
            if value not in choices:
                raise DenoqError(f"AccuQuant {name} {value!r} is unknown: choose one of {', '.join(choices)}")


def check_window(window: int, steps: int) -> None:
    """A window of n ≥ 2 steps needs n consecutive recorded sampler steps."""
    if window > steps:
        raise DenoqError(f"accuquant.window={window} needs {window} consecutive sampler steps but the calibration "
                         f"records calib.steps={steps}; lower accuquant.window or raise calib.steps")


def sampler_step(schedule: NoiseSchedule, sampler: str, eta: float = 0.0) -> StepFn:
    """S(x, out, t, prev_t, z) = the sampler's step with its noise draw z (unused where the step adds none)."""

    def step(x: torch.Tensor, out: torch.Tensor, t: int, prev_t: int, z: torch.Tensor) -> torch.Tensor:
        st = ddpm_step(schedule, out, t, prev_t, x) if sampler == "ddpm" else ddim_step(schedule, out, t, prev_t,
                                                                                         x, eta)
        return st.mean if st.std is None else st.mean + st.std * z

    return step


@dataclass
class Window:
    """n consecutive steps from the state `x` at `pairs[0][0]`: (t, prev_t) per step, one noise draw per step."""

    x: torch.Tensor
    pairs: list[tuple[int, int]]
    noise: list[torch.Tensor]
    cond: torch.Tensor | None = None

    def t(self, k: int) -> torch.Tensor:
        return torch.full((self.x.shape[0],), self.pairs[k][0], dtype=torch.int64, device=self.x.device)


def run_window(eps: EpsFn, window: Window, step: StepFn) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                  list[torch.Tensor]]:
    """(x at the end, the latents x_k before each step, the outputs ε_k) without gradients."""
    xs, outs = [], []
    x = window.x
    with torch.no_grad():
        for k, (t, prev_t) in enumerate(window.pairs):
            out = eps(x, window.t(k), window.cond)
            xs.append(x)
            outs.append(out)
            x = step(x, out, t, prev_t, window.noise[k])
    return x, xs, outs


def eps_energies(window: Window, xs: list[torch.Tensor], outs: list[torch.Tensor], step: StepFn) -> list[float]:
    """e_k of (3) per step: ‖S_k(x_k, ε_k) − S_k(x_k, 0)‖² over a run's latents and outputs."""
    with torch.no_grad():
        return [float((step(x, out, t, prev_t, z) - step(x, torch.zeros_like(out), t, prev_t, z)).pow(2).sum())
                for x, out, (t, prev_t), z in zip(xs, outs, window.pairs, window.noise, strict=True)]


def state_weights(objective: str, energies: list[float]) -> list[float]:
    """w_j of (3) for the states after each of the window's steps, from the FP run's e_k (none under "outputs")."""
    if objective == "outputs":
        return [0.0] * len(energies)
    if objective == "end":
        return [0.0] * (len(energies) - 1) + [1 / max(sum(energies), 1e-12)]
    cumulative = [sum(energies[:j + 1]) for j in range(len(energies))]
    return [1 / max(sum(cumulative), 1e-12)] * len(energies)


def output_weights(objective: str, outs: list[torch.Tensor]) -> list[float]:
    """u_k of (4) for the model outputs at each of the window's steps, from the FP run's ε_k (none but under
    "outputs")."""
    if objective != "outputs":
        return [0.0] * len(outs)
    return [1 / max(sum(float(o.pow(2).sum()) for o in outs), 1e-12)] * len(outs)


def states_after(end: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The states after each step of a run: `run_window`'s latents without the start, then its end."""
    return [*xs[1:], end]


@dataclass
class WindowTargets:
    """What a window's quantized run is held to: the FP states after each step with their weights w_j (3), and the
    FP model's outputs at each step with their weights u_k (4); a zero weight leaves its term out."""

    states: list[torch.Tensor]
    state_weights: list[float]
    outputs: list[torch.Tensor]
    output_weights: list[float]

    def value(self, states: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
        """The loss (3) + (4) of a quantized run's states after each step and outputs."""
        return float(sum(w * (x - ref).pow(2).sum() for w, x, ref in zip(self.state_weights, states, self.states,
                                                                         strict=True) if w)
                     + sum(u * (o - ref).pow(2).sum() for u, o, ref in zip(self.output_weights, outputs,
                                                                           self.outputs, strict=True) if u))


def window_targets(fp_eps: EpsFn, window: Window, step: StepFn, objective: str) -> WindowTargets:
    """Run the FP sampler over `window` (no gradients) and weigh its states and outputs for `objective`."""
    end, fp_xs, fp_outs = run_window(fp_eps, window, step)
    return WindowTargets(states_after(end, fp_xs), state_weights(objective, eps_energies(window, fp_xs, fp_outs,
                                                                                         step)),
                         fp_outs, output_weights(objective, fp_outs))


def window_loss(q_eps: EpsFn, window: Window, step: StepFn, targets: WindowTargets,
                stop_gradient: bool = True) -> torch.Tensor:
    """(3) + (4) against `targets`, as one autograd graph over the window: with `stop_gradient` the objective (2)
    (model inputs detached), else the naive one (gradients also through each ε_q's input)."""
    x = window.x
    loss = x.new_zeros(())
    for k, (t, prev_t) in enumerate(window.pairs):
        out = q_eps(x.detach() if stop_gradient else x, window.t(k), window.cond)
        if targets.output_weights[k]:
            loss = loss + targets.output_weights[k] * (out - targets.outputs[k]).pow(2).sum()
        x = step(x, out, t, prev_t, window.noise[k])
        if targets.state_weights[k]:
            loss = loss + targets.state_weights[k] * (x - targets.states[k]).pow(2).sum()
    return loss


def window_backward_recompute(q_eps: EpsFn, window: Window, step: StepFn, targets: WindowTargets,
                              through_inputs: bool = False) -> float:
    """Accumulate ∂((3) + (4))/∂θ into the quantizers' .grad in O(1) model graphs; returns the loss. Without
    `through_inputs` the gradient of the objective (2) (model inputs stopped), with it the exact gradient (the
    adjoint of the whole window, what `window_loss(..., stop_gradient=False)` gives in O(n) graphs)."""
    end, xs, outs = run_window(q_eps, window, step)
    after = states_after(end, xs)
    lam = torch.zeros_like(end)
    for k in reversed(range(len(window.pairs))):
        w, u = targets.state_weights[k], targets.output_weights[k]
        if w:  # states the objective does not weigh add nothing
            lam = lam + 2 * w * (after[k] - targets.states[k])
        t, prev_t = window.pairs[k]
        x_k = xs[k].detach().requires_grad_(True)
        out_k = q_eps(x_k if through_inputs else xs[k], window.t(k), window.cond)
        total = (step(x_k, out_k, t, prev_t, window.noise[k]) * lam).sum()
        if u:
            total = total + u * (out_k - targets.outputs[k]).pow(2).sum()
        total.backward()
        lam = x_k.grad
    return targets.value(after, outs)


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
    errs = []
    with torch.no_grad():
        for i in idx:
            x = pool.x[i][:PROBE_SAMPLES]
            t = torch.full((x.shape[0],), pool.t[i], dtype=torch.int64)
            cond = None if pool.cond is None else pool.cond[:x.shape[0]]
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


def window_backward(q_eps: EpsFn, fp_eps: EpsFn, window: Window, step: StepFn, objective: str, backprop: str,
                    gradient: str) -> float:
    """(3) or (4) on `window`: the FP run gives the targets and their weights (`objective`), then the quantizers'
    gradient is accumulated into their .grad by `backprop` (recompute, O(1); naive, one graph) under `gradient`
    (full | stop). Returns the loss."""
    targets = window_targets(fp_eps, window, step, objective)
    if backprop == "recompute":
        return window_backward_recompute(q_eps, window, step, targets, through_inputs=gradient == "full")
    loss = window_loss(q_eps, window, step, targets, stop_gradient=gradient == "stop")
    loss.backward()
    return float(loss.detach())


def objective_backward(q_eps: EpsFn, fp_eps: EpsFn, pool: CalibrationSet, rows: torch.Tensor, n: int,
                       settings: AccuQuantSettings, step: StepFn, prev: dict[int, int], g: torch.Generator,
                       q_states: list[torch.Tensor] | None = None) -> float:
    """One draw of the objective for the pool's trajectories `rows`: a step (n ≤ 1, loss (1)) or a window of n
    steps (loss (3) or (4) with `settings`' objective, gradient and backprop), drawn from `g` (the window's noise
    too); its gradient is accumulated into the quantizers' .grad. Returns the loss. `prev` maps each timestep to the
    next. With `q_states` (the quantized trajectories, `quantized_states`) the step or window starts at their
    state instead of the FP trajectories' (both models run from there)."""
    cond = None if pool.cond is None else pool.cond[rows]
    S = len(pool.t)
    starts = pool.x if q_states is None else q_states
    if n <= 1:
        s = int(torch.randint(S, (1,), generator=g))
        x, t = starts[s][rows], torch.full((len(rows),), pool.t[s], dtype=torch.int64)
        with torch.no_grad():
            ref = fp_eps(x, t, cond)
        loss = (q_eps(x, t, cond) - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-12)
        loss.backward()
        return float(loss.detach())
    s = int(torch.randint(S - n + 1, (1,), generator=g))
    pairs = [(pool.t[s + k], prev[pool.t[s + k]]) for k in range(n)]
    noise = [torch.randn(starts[s][rows].shape, generator=g) for _ in range(n)]
    return window_backward(q_eps, fp_eps, Window(starts[s][rows], pairs, noise, cond), step, settings.objective,
                           settings.backprop, settings.gradient)


def reconstruct(model: nn.Module, plan: QuantPlan, pool: CalibrationSet, schedule: NoiseSchedule, sampler: str,
                num_steps: int, settings: AccuQuantSettings
                ) -> tuple[QuantPlan, dict[str, Any]]:
    """Learn the plan's weight rounding and input scales with the objective of `settings.window` on `pool` (every
    step of `sampler` with `num_steps` steps, FP trajectories in sampling order). Returns the plan with hard
    rounding and the learned scales, and a report (losses, probe errors before / after, seconds, and `stopped`:
    why the optimization stopped early, or None)."""
    n = settings.window
    check_window(n, len(pool.t))
    expected = schedule.timesteps(num_steps, sampler).tolist()
    if list(pool.t) != expected:
        raise DenoqError(f"AccuQuant needs every step of {sampler} {num_steps} in sampling order; the calibration "
                         f"pool has timesteps {pool.t[:4]}…; record the pool with the same sampler and steps")
    prev = dict(zip(expected, schedule.prev_timesteps(num_steps, sampler).tolist(), strict=True))
    start = time.perf_counter()
    fp_eps = module_eps(model)
    q = LearnableModel(model, plan, init=settings.init).train()
    q_eps = module_eps(q)
    rounding, scales = q.rounding_parameters(), q.scale_parameters()
    optimizer = torch.optim.Adam([{"params": rounding, "lr": settings.lr},
                                  {"params": scales, "lr": settings.lr * SCALE_LR_FACTOR}])
    step = sampler_step(schedule, sampler, settings.eta)
    g = torch.Generator().manual_seed(settings.seed)
    N = pool.x[0].shape[0]
    before = probe_error(module_eps(q.hard()), fp_eps, pool)  # the hard start
    q.hard(False)
    losses: list[float] = []
    stopped = None
    last_good = q.state()
    params = [*rounding, *scales]
    zs = pool_noise(fp_eps, pool, step, prev) if settings.start == "quantized" else None
    q_states, drift = None, []
    for it in bar(range(settings.iters), desc=f"accuquant window {n}" if n > 1 else "per-step reconstruction",
                  unit="iter"):
        if zs is not None and it % REFRESH_ITERS == 0:
            q_states = quantized_states(module_eps(q.hard()), pool, step, prev, zs)
            q.hard(False)
            drift.append(round(trajectory_drift(q_states, pool), 6))
        rows = torch.randperm(N, generator=g)[:settings.batch]
        optimizer.zero_grad(set_to_none=True)
        rec = objective_backward(q_eps, fp_eps, pool, rows, n if it >= settings.perstep_iters else 0, settings,
                                 step, prev, g, q_states)
        beta = _anneal(it, settings.iters, settings.warmup)
        reg = 0.0
        if beta is not None and settings.round_lambda > 0:
            reg_t = settings.round_lambda * q.regularizer(beta)
            reg_t.backward()
            reg = float(reg_t.detach())
        if not math.isfinite(rec + reg) or not _finite_grads(params):
            stopped = (f"the loss or its gradient became non-finite at iteration {it + 1} of {settings.iters} "
                       f"(loss {rec + reg!r}); kept the quantizers of iteration {it}: lower accuquant.lr")
            break
        last_good = q.state()
        losses.append(rec + reg)
        optimizer.step()
    if stopped is None and not all(bool(torch.isfinite(p).all()) for p in params):
        stopped = f"the quantizers became non-finite after iteration {settings.iters}; kept the last finite ones"
    if stopped is not None:
        q.load(last_good)  # else the final step's quantizers stand
    q.hard()
    after = probe_error(q_eps, fp_eps, pool)
    every = max(1, len(losses) // 50)
    states = {"end": "", "every": ", every state", "outputs": ", model outputs"}[settings.objective]
    objective = "per-step" if n <= 1 else f"window of {n} steps{states}"
    if n > 1 and settings.perstep_iters:
        objective = f"per-step for {settings.perstep_iters} iterations, then {objective}"
    if zs is not None:
        objective += ", from the quantized trajectories"
        drift.append(round(trajectory_drift(quantized_states(q_eps, pool, step, prev, zs), pool), 6))
    info = {"window": n, "objective": objective, "iters": len(losses),
            "backprop": settings.backprop if n > 1 else "per-step",
            "gradient": settings.gradient if n > 1 else "per-step", "init": settings.init, "start": settings.start,
            **({"trajectory_drift": drift} if drift else {}),
            "loss_curve": [round(v, 6) for v in losses[::every]], "probe_eps_error_before": round(before, 6),
            "probe_eps_error_after": round(after, 6), "stopped": stopped,
            "seconds": round(time.perf_counter() - start, 2)}
    return q.export_plan(), info
