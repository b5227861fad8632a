"""AccuQuant's window: the objective over n consecutive sampler steps and its gradients, in O(1) memory in n
(`backprop="recompute"`) or as one graph (`backprop="naive"`). The reconstruction that draws the windows, with the
per-step objective (1) and the other settings, is `accuquant.py`.

AccuQuant (Lee, Choi, Son, Moon, Jeon, Ham, NeurIPS 2025, arXiv 2510.20348) matches the quantized sampler to the FP
one over a couple of consecutive steps; the objectives below are ours, built on that idea.

From the FP state x_s of the pool, both samplers run n steps with the same noise draws,
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
S_k is the sampler's step (`sampler_step`: DDIM with η or DDPM, x̂_0 clipping included), sg a stop-gradient on
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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from denoq.calibrators.distributed import sum_floats
from denoq.sampling import EpsFn, NoiseSchedule
from denoq.sampling.ddim import ddim_step
from denoq.sampling.ddpm import ddpm_step

StepFn = Callable[[torch.Tensor, torch.Tensor, int, int, torch.Tensor], torch.Tensor]


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


def output_weights(objective: str, energy: float, steps: int) -> list[float]:
    """u_k of (4) for the model outputs at each of the window's `steps`, from the FP run's Σ_k ‖ε_k‖² `energy`
    (none but under "outputs")."""
    if objective != "outputs":
        return [0.0] * steps
    return [1 / max(energy, 1e-12)] * steps


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
    """Run the FP sampler over `window` (no gradients) and weigh its states and outputs for `objective`. Under
    torchrun `window` is one rank's share of the batch: the energies behind the weights are summed over the
    ranks, so each rank's loss is its part of the whole batch's."""
    end, fp_xs, fp_outs = run_window(fp_eps, window, step)
    *energies, out_energy = sum_floats([*eps_energies(window, fp_xs, fp_outs, step),
                                        sum(float(o.pow(2).sum()) for o in fp_outs)], "the window's energies")
    return WindowTargets(states_after(end, fp_xs), state_weights(objective, energies),
                         fp_outs, output_weights(objective, out_energy, len(fp_outs)))


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
