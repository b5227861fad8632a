"""What `denoq eval` measures inside the model with hooks: each quantized layer's output SQNR against FP, each
layer's input range along a trajectory, and the timestep-group picture drawn from them."""

from __future__ import annotations

from typing import Any

import torch

from denoq.calibrators.simulate import SimulatedLayer, simulate
from denoq.compiler.artifact import Artifact
from denoq.compiler.backends import artifact_plan, torch_eps
from denoq.compiler.load import ModelSpec
from denoq.compiler.pictures import GroupPanel, timestep_groups_png
from denoq.layers import quantizable_layers
from denoq.plan import ActQuant

RANGE_PROBE = 64  # samples of the FP trajectory whose activation ranges timestep_groups.png plots
GROUP_PLOT_LAYERS = 4  # layers in timestep_groups.png


def layer_sqnr(spec: ModelSpec, art: Artifact, x: torch.Tensor, t: torch.Tensor,
               cond: torch.Tensor | None) -> dict[str, float]:
    """Output SQNR (dB) of every quantized layer, simulation vs FP, on the same model inputs (errors accumulate
    through the network as they do in deployment)."""
    fp_out: dict[str, torch.Tensor] = {}
    q_out: dict[str, torch.Tensor] = {}
    sim = simulate(spec.module, artifact_plan(art))
    handles = [m.register_forward_hook(lambda mod, a, o, n=name: fp_out.__setitem__(n, o.detach()))
               for name, m in quantizable_layers(spec.module).items()]
    handles += [m.register_forward_hook(lambda mod, a, o: q_out.__setitem__(mod.plan.name, o))
                for m in sim.modules() if isinstance(m, SimulatedLayer)]
    try:
        torch_eps(spec.module)(x, t, cond)
        torch_eps(sim)(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name in (n for n in fp_out if n in q_out):  # network order; layers kept in FP have no error
        err = (q_out[name] - fp_out[name]).pow(2).sum()
        out[name] = float(10 * torch.log10(fp_out[name].pow(2).sum() / err.clamp_min(1e-30)))
    return out


def activation_ranges(spec: ModelSpec, layer_names: list[str], traj: list[torch.Tensor], ts: list[int],
                      cond: torch.Tensor | None, limit: int = RANGE_PROBE) -> dict[str, list[float]]:
    """max|x| of each named layer's input per step of a recorded trajectory (`traj[i]` at timestep `ts[i]`), from
    the FP torch model with forward pre-hooks on its first `limit` samples; lists aligned with `ts`."""
    layers = quantizable_layers(spec.module)
    ranges: dict[str, list[float]] = {name: [] for name in layer_names}
    handles = [layers[name].register_forward_pre_hook(
        lambda mod, args, n=name: ranges[n].append(float(args[0].detach().abs().max())))
        for name in layer_names]
    eps = torch_eps(spec.module)
    try:
        for x_t, t in zip(traj, ts, strict=True):
            x = x_t[:limit]
            eps(x, torch.full((x.shape[0],), t, dtype=torch.int64), None if cond is None else cond[:x.shape[0]])
    finally:
        for h in handles:
            h.remove()
    return ranges


def clip_level(q: ActQuant) -> torch.Tensor:
    """The largest representable input of an activation quantizer per timestep: (qmax − zero point)·scale[t]
    (= 127·scale[t] for signed int8)."""
    return (q.qrange[1] - q.zero_point) * q.scale.to(torch.float32)


def timestep_groups_picture(spec: ModelSpec, art: Artifact, traj: list[torch.Tensor], ts: list[int],
                            cond: torch.Tensor | None, title: str) -> tuple[bytes | None, dict[str, Any]]:
    """`timestep_groups.png` and its summary for the report; no picture when no layer has more than one group.

    Plots the (up to) GROUP_PLOT_LAYERS grouped layers whose input range varies most over the trajectory (ratio of
    largest to smallest per-timestep max|x|; ties by name), each with its quantizer's clipping level and the group
    boundaries of the manifest's `calibration.timestep_groups`.
    """
    groups: dict[str, list[list[int]]] = art.manifest.get("calibration", {}).get("timestep_groups") or {}
    plan = artifact_plan(art) if groups else None
    grouped = sorted(name for name, segs in groups.items() if len(segs) > 1 and plan is not None
                     and name in plan.layers and plan.layers[name].input is not None)
    summary: dict[str, Any] = {"layers_with_groups": len(grouped),
                               "max_groups": max((len(groups[n]) for n in grouped), default=1), "plotted": []}
    if not grouped:
        return None, summary
    ranges = activation_ranges(spec, grouped, traj, ts, cond)

    def spread(name: str) -> float:
        r = ranges[name]
        return max(r) / max(min(r), 1e-12)

    picked = sorted(grouped, key=lambda n: (-spread(n), n))[:GROUP_PLOT_LAYERS]
    summary["plotted"] = picked
    panels = []
    for name in picked:
        segs = groups[name]
        lo, hi = min(min(ts), segs[0][0]), max(max(ts), segs[-1][1])
        grid = list(range(lo, hi + 1))
        level = clip_level(plan.layers[name].input)
        # the table switches after ⌊(a + b) / 2⌋ between groups ending at a and starting at b (segment_of_timestep)
        bounds = [(segs[g][1] + segs[g + 1][0]) // 2 + 0.5 for g in range(len(segs) - 1)]
        panels.append(GroupPanel(name=name, observed=ranges[name], clip_t=grid, clip=level[lo:hi + 1].tolist(),
                                 boundaries=bounds))
    return timestep_groups_png(ts, panels, title), summary
