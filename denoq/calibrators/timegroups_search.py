"""ADP-DM's differentiable timestep-group search (`activations.group_search=differentiable`), the option beside the
exact partition of `timegroups.py`.

ADP-DM (Wang et al., CVPR 2024, arXiv 2305.18723, §3.2) learns, for every layer l and calibrated timestep t_k,
importance weights over the layer's G group quantizers Q_{l,1..G}, π_{l,k} = softmax(α_{l,k}); the layer's input
at t_k becomes

    x̂ = Σ_g π_{l,k,g} · Q_{l,g}(x)                                                                          (1)

and α is optimized on the model's output error, entropy-regularized so that every π_{l,k} ends one-hot:

    L(α) = E‖ε̂_α(x_t, t) − ε(x_t, t)‖² / E‖ε̂_DP(x_t, t) − ε(x_t, t)‖² + β · mean_{l,k} H(π_{l,k})           (2)

with the denominator measured per calibrated step at the start on a fixed probe batch (so every step weighs the
same); the reported `output_error_ratio` is the same ratio at the end, averaged over the steps.
Rounding passes gradients straight through (Q(x) → x + sg(Q(x) − x)), so a layer's α also learns from the error it
causes downstream. Under torchrun every rank draws the same steps and trajectories and computes the error of the
ones it holds; the gradients of those shares are summed before the entropy's is added (docs/distributed.md). The G
quantizers start as the exact partition's groups (their scales; α favours each timestep's DP group by SEARCH_INIT);
at the end every timestep takes its arg-max group and the groups, no longer necessarily contiguous, have their
scales re-observed on their own timesteps (`scale_table`). For the ort-cpu profile the search quantizes each layer's
output (bias included) with its constant table, which is what a layer without a selector does; the deployed selector
layer quantizes its bias-free, r_t-scaled output instead (`simulate.py`), so the search sees that layer's output
error only approximately."""

from __future__ import annotations

import dataclasses

import torch

from denoq.calibrators.calibset import CalibrationSet
from denoq.calibrators.distributed import all_reduce_grads, sum_floats
from denoq.calibrators.observers import ObserverSettings
from denoq.calibrators.quantizer import fake_quantize, straight_through
from denoq.calibrators.simulate import SimulatedLayer, SimulatedModel, fake_quant_at
from denoq.calibrators.stats import TensorStats
from denoq.calibrators.timegroups import Segment, scale_table
from denoq.log import bar
from denoq.plan import QuantPlan
from denoq.sampling.cond import call_denoiser

SEARCH_ITERS = 200
SEARCH_BATCH = 16
SEARCH_LR = 0.05
SEARCH_BETA = 0.5
SEARCH_INIT = 2.0


class _SearchLayer(SimulatedLayer):
    """A simulated layer whose input is eq. (1) at the batch's (single) timestep; outputs pass straight through
    their constant-table quantizer. `arm` sets its group scales and logits."""

    def arm(self, scales: torch.Tensor, logits: torch.Tensor, step_of: dict[int, int]) -> None:
        self.group_scales = scales
        self.logits = logits
        self.step_of = step_of

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.clock.t
        assert t is not None and self.plan.input is not None
        qmin, qmax = self.plan.input.qrange
        pi = torch.softmax(self.logits[self.step_of[int(t[0])]], dim=0)
        x = sum(pi[g] * straight_through(fake_quantize(x, s, self.plan.input.zero_point, qmin, qmax), x)
                for g, s in enumerate(self.group_scales))
        y = self._layer(x, self.bias)
        if self.plan.output is not None:
            y = straight_through(fake_quant_at(y, self.plan.output, t), y)
        return y


def search_groups(model: torch.nn.Module, plan: QuantPlan, stats: dict[str, TensorStats],
                  segments: dict[str, list[Segment]], calib: CalibrationSet, settings: ObserverSettings, *,
                  seed: int, iters: int = SEARCH_ITERS
                  ) -> tuple[QuantPlan, dict[str, list[Segment]], dict[str, float]]:
    """Eq. (1)–(2) on `plan` (the exact partition's plan, `segments` its groups per layer; `stats` the layers' input
    statistics). Returns the plan with the searched input tables, each layer's segments (runs of calibrated
    timesteps with one group; runs of a group share its scale) and the search's loss terms."""
    generator = torch.Generator().manual_seed(seed)
    searched = SimulatedModel(model, plan, layer=_SearchLayer).train()
    for p in searched.parameters():
        p.requires_grad_(False)
    layers = {name: m for name, m in searched.model.named_modules() if isinstance(m, _SearchLayer)}
    step_index = {t: k for k, t in enumerate(sorted(calib.t))}
    params = []
    for name, layer in sorted(layers.items()):
        segs, table = segments[name], plan.layers[name].input.scale
        logits = torch.zeros(len(step_index), len(segs))
        for t, k in step_index.items():
            logits[k, next(g for g, (a, b) in enumerate(segs) if a <= t <= b)] = SEARCH_INIT
        logits.requires_grad_(True)
        layer.arm(torch.stack([table[a] for a, _ in segs]), logits, step_index)
        params.append(logits)
    optimizer = torch.optim.Adam(params, lr=SEARCH_LR)
    n = calib.trajectories
    local = {int(r): i for i, r in enumerate(calib.global_rows.tolist())}

    def error(step: int, rows: torch.Tensor) -> torch.Tensor:
        """This rank's share of E‖ε̂ − ε‖² over the trajectories `rows` (global indices; all of them in one
        process): its rows' squared errors over the whole batch's element count, so the ranks' shares add up."""
        mine = torch.tensor([local[r] for r in rows.tolist() if r in local], dtype=torch.int64)
        if len(mine) == 0:
            return torch.zeros(())
        x, t = calib.x[step][mine], torch.full((len(mine),), calib.t[step], dtype=torch.int64)
        cond = None if calib.cond is None else calib.cond[mine]
        with torch.no_grad():
            target = call_denoiser(model, x, t, cond)
        err = (searched(x, t, cond) - target).pow(2)
        return err.sum() / (err[0].numel() * len(rows))

    def reduced(value: torch.Tensor) -> float:
        return sum_floats([float(value)], "the group search's output error")[0]

    probe = torch.arange(min(n, SEARCH_BATCH))  # E‖ε̂ − ε‖² per calibrated step at the start (the DP groups)
    with torch.no_grad():
        reference = [max(reduced(error(step, probe)), 1e-30) for step in range(len(calib.t))]
    entropy = torch.zeros(())
    for _ in bar(range(iters), desc="timestep-group search", unit="iter"):
        step = int(torch.randint(len(calib.t), (1,), generator=generator))
        rows = torch.randperm(n, generator=generator)[:SEARCH_BATCH]
        optimizer.zero_grad()
        part = error(step, rows) / reference[step]
        if part.requires_grad:
            part.backward()
        all_reduce_grads(params, "the group search's gradients")  # the ranks' shares summed: the batch's gradient
        pis = [torch.softmax(p, dim=1) for p in params]
        entropy = torch.stack([-(pi * pi.clamp_min(1e-12).log()).sum(dim=1).mean() for pi in pis]).mean()
        (SEARCH_BETA * entropy).backward()
        optimizer.step()
    with torch.no_grad():
        final = [reduced(error(step, probe)) / reference[step] for step in range(len(calib.t))]
    terms = {"output_error_ratio": sum(final) / len(final), "entropy": entropy.item()}
    new_plan = QuantPlan(num_train_timesteps=plan.num_train_timesteps, target=plan.target)
    new_segments = {}
    for name, lp in sorted(plan.layers.items()):
        chosen = layers[name].logits.detach().argmax(dim=1).tolist()
        groups = [chosen[step_index[t]] for t in sorted(step_index)]
        runs, labels = _runs(sorted(step_index), groups)
        act = scale_table(stats[name], runs, settings, plan.num_train_timesteps, labels)
        new_plan.add(dataclasses.replace(lp, input=act))
        new_segments[name] = runs
    return new_plan, new_segments, terms


def _runs(ts: list[int], groups: list[int]) -> tuple[list[Segment], list[int]]:
    """Maximal runs of consecutive calibrated timesteps with one group: ([(first, last), …], [group, …])."""
    runs, labels = [], []
    for t, g in zip(ts, groups, strict=True):
        if labels and labels[-1] == g:
            runs[-1] = (runs[-1][0], t)
        else:
            runs.append((t, t))
            labels.append(g)
    return runs, labels
