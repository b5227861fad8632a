"""IGQ-ViT: instance-aware group quantization of transformer activations (Moon, Kim, Cheon, Ham, "Instance-Aware
Group Quantization for Vision Transformers", CVPR 2024, arXiv 2404.00928). No public code; this is our reading.

Post-LayerNorm / post-GELU activations of a transformer differ by orders of magnitude from channel to channel, and
*which* channels are large changes from one input instance to the next, so one scale per tensor fails at low bits
and a fixed channel → group split does too. IGQ-ViT (§3.2) keeps G quantizers per activation and, for every input
instance, sends each channel to the quantizer whose range is nearest to that channel's range on that instance:

    for instance b and channel c, with m_bc = min_n X_b[n, c] and M_bc = max_n X_b[n, c] over the tokens n and
    w the width a quantizer must cover (max(|m|, |M|) symmetric, M − m asymmetric),
        g(b, c) = argmin_g max(w_bc / w_g, w_g / w_bc)                                      (assignment)
        X̂_b[:, c] = DQ(Q(X_b[:, c]; s_g, z_g)),   (s_g, z_g) = qparams(l_g, u_g)

"Nearest" is measured on a log scale (our choice; the paper compares ranges): a quantizer's error scales with its
range, and on a linear scale a channel of range 12 is "nearer" a group of range 0.6 than one of 36, which then
stretches the small group over it during calibration.

The G ranges (l_g, u_g) are calibrated by alternating the assignment above with a range update over the
calibration instances (§3.2's alternating procedure; ours is Lloyd's k-means on log widths: w_g is the geometric
mean of its members' widths, started evenly spaced on a log scale between the calibration widths' 1st percentile
and their maximum). Each group's range [l_g, u_g] is then the min / max of its members' (m, M), so a group covers
its calibration members (a member wider than w_g sets the range; one narrower is quantized a little coarsely).
Ranges that are the mean of the members' (k-means in the (min, max) plane) clip most members of a group: on a
2-block DiT the output error was 10× the per-tensor quantizer's. With symmetric activations (TensorRT's int8) a
range is [−r_g, r_g]. Softmax attention is grouped across tokens the same way (§3.2): each query row of P is
sent to the group whose upper bound u_g is nearest to the row's maximum, its scale u_g / q_max (P ≥ 0, zero
point 0).

§3.3 allocates the number of groups per layer under a bit-operation budget: `allocate_groups` picks each layer's
G among the candidates to lower the summed layer output error most per added BOP until the budget is spent (a
greedy solution of the multiple-choice knapsack; the paper measures the discrepancy of the model's predictions,
we measure each layer's output error on the calibration inputs). BOPs of a layer with G groups: its MACs × weight
bits × activation bits + (G − 1) rescaled partial sums per output element in float (`denoq.bops.group_bops`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from denoq.bops import group_bops
from denoq.calibrators.calibset import CalibrationSet
from denoq.calibrators.distributed import RowLayout, all_reduce, sum_tables
from denoq.calibrators.gptq import GptqSettings, layer_plan, rtn
from denoq.calibrators.observers import qparams
from denoq.calibrators.offload import by_unit, resident
from denoq.calibrators.quantizer import fake_quantize
from denoq.errors import DenoqError
from denoq.log import bar
from denoq.plan import GroupQuant, LayerPlan, QuantPlan

KMEANS_ITERS = 20
MIN_WIDTH = 1e-6


def channel_ranges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per instance and channel, the min and max over the tokens of `x` [B, L, C]: two [B, C] tensors."""
    return x.amin(dim=1), x.amax(dim=1)


def channel_widths(m: torch.Tensor, big_m: torch.Tensor, signed: bool) -> torch.Tensor:
    """The range a quantizer must cover: max(|m|, |M|) for symmetric quantizers, M − m otherwise."""
    return torch.maximum(m.abs(), big_m.abs()) if signed else big_m - m


def nearest(width: torch.Tensor, group_widths: torch.Tensor) -> torch.Tensor:
    """Index of the group width nearest to `width` on a log scale, max(w / w_g, w_g / w) (first on ties), over a
    new last axis. Divisions are correctly rounded in every executor, so the graph picks the same groups."""
    w = width.unsqueeze(-1)
    return torch.maximum(w / group_widths, group_widths / w).argmin(dim=-1)


def assign(m: torch.Tensor, big_m: torch.Tensor, gq: GroupQuant) -> torch.Tensor:
    """The group of every (instance, channel) [B, C] (int64): the group whose range width is nearest to the
    channel's (module docstring), first on ties."""
    return nearest(channel_widths(m, big_m, gq.signed), gq.width.to(m.dtype))


def fake_quant_groups(x: torch.Tensor, gq: GroupQuant) -> torch.Tensor:
    """`x` [B, L, C] fake-quantized channel by channel with each instance's assigned group quantizer (the graph's
    op order: Q = clamp(round(x / s) + z), DQ = (q − z) · s with s, z gathered per (instance, channel))."""
    g = assign(*channel_ranges(x), gq)  # [B, C]
    scale, zp = gq.scale.to(x.device)[g].unsqueeze(1), gq.zero_point.to(x.device)[g].unsqueeze(1)
    qmin, qmax = gq.qrange
    return fake_quantize(x, scale, zp, qmin, qmax)


def fake_quant_rows(p: torch.Tensor, gq: GroupQuant) -> torch.Tensor:
    """Softmax probabilities `p` [B, H, L, L] fake-quantized row by row (token-wise groups): each query row with
    the group whose upper bound is nearest to the row's maximum."""
    g = nearest(p.amax(dim=-1), gq.width.to(p.dtype)).unsqueeze(-1)  # [B, H, L, 1]
    qmin, qmax = gq.qrange
    return fake_quantize(p, gq.scale.to(p.device)[g], gq.zero_point.to(p.device)[g], qmin, qmax)


def fit_groups(m: torch.Tensor, big_m: torch.Tensor, groups: int, bits: int, signed: bool,
               name: str = "") -> GroupQuant:
    """The G group ranges of one activation from its calibration instances' channel ranges `m`, `big_m` [N, C]
    (module docstring: k-means on log widths, covering ranges); DenoqError when C < G."""
    channels = m.shape[-1]
    if channels < groups:
        raise DenoqError(f"layer {name}: {channels} channel(s) cannot form {groups} groups; lower "
                         f"activations.igq_groups to at most {channels}")
    m, big_m = m.reshape(-1).double(), big_m.reshape(-1).double()
    widths = channel_widths(m, big_m, signed).clamp_min(MIN_WIDTH)  # no zero width (its ratios would be 0 / 0)
    logs = widths.log()
    center = torch.linspace(float(torch.quantile(logs, 0.01)), float(logs.max()), groups, dtype=torch.float64)
    a = nearest(widths, center.exp())
    for _ in range(KMEANS_ITERS):  # Lloyd's k-means on log widths (a max update would only ever grow)
        for g in range(groups):
            if (a == g).any():  # an empty group keeps its center
                center[g] = logs[a == g].mean()
        new_a = nearest(widths, center.exp())
        if torch.equal(new_a, a):
            break
        a = new_a
    width = center.exp()
    lo, hi = -width.clone(), width.clone()  # an empty group quantizes [−w_g, w_g]
    for g in range(groups):
        members = a == g
        if members.any():  # the group's quantizer covers its members' ranges
            top = widths[members].max()
            lo[g], hi[g] = (-top, top) if signed else (m[members].min(), big_m[members].max())
    order = torch.argsort(width)  # groups sorted by width: a stable, readable layout
    return _group_quant(lo[order], hi[order], width[order], bits, signed)


def row_groups(row_max: torch.Tensor, groups: int, bits: int, signed: bool) -> GroupQuant:
    """Token-wise groups of softmax rows from the calibration rows' maxima: `fit_groups` with m = 0 (P ≥ 0; signed
    (TensorRT) groups are symmetric, of which P uses the non-negative half)."""
    return fit_groups(torch.zeros_like(row_max).reshape(1, -1), row_max.reshape(1, -1), groups, bits, signed)


def _group_quant(lo: torch.Tensor, hi: torch.Tensor, width: torch.Tensor, bits: int, signed: bool) -> GroupQuant:
    params = [qparams(float(a), float(b), bits, signed) for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]
    return GroupQuant(bits=bits, signed=signed, lo=lo.float(), hi=hi.float(), width=width.float(),
                      scale=torch.tensor([s for s, _ in params], dtype=torch.float32),
                      zero_point=torch.tensor([z for _, z in params], dtype=torch.float32))


@dataclass
class InstanceRanges:
    """The per-instance channel ranges of one layer's input over the calibration set ([N, C] each)."""

    m: torch.Tensor
    big_m: torch.Tensor


def collect_ranges(forward: Callable, layers: dict[str, nn.Module], calib: CalibrationSet, *,
                   batch_size: int = 64) -> dict[str, InstanceRanges]:
    """Per-instance channel ranges of the token inputs ([B, L, C]) of `layers` over the calibration set, in the
    one-process order of the instances. On a rank's shard each batch's ranges are placed at their rows of the
    one-process batch (`RowLayout.place`) and summed over the ranks: every rank holds every instance's, exactly."""
    found: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}
    layout: list[RowLayout | None] = [None]

    def hook(name: str):
        def pre(mod: nn.Module, args: tuple) -> None:
            if args[0].dim() == 3:
                ranges = channel_ranges(args[0].detach().float())
                found[name].append(ranges if layout[0] is None else tuple(layout[0].place(r) for r in ranges))
        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            for (x, t, cond), layout[0] in zip(calib.progress_batches(batch_size, "IGQ channel ranges"),
                                               calib.layouts(batch_size), strict=True):
                forward(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    return {name: InstanceRanges(*(all_reduce(torch.cat([r[i] for r in v]), "sum", f"IGQ ranges of {name}")
                                   for i in (0, 1)))
            for name, v in sorted(found.items()) if v}


def candidate_groups(groups: int) -> list[int]:
    """The group counts the allocation chooses from: 1, 2, 4, … up to `groups` (and `groups` itself)."""
    out, g = [], 1
    while g < groups:
        out.append(g)
        g *= 2
    return [*out, groups]


def output_errors(forward: Callable, layers: dict[str, nn.Module], fitted: dict[str, dict[int, GroupQuant]],
                  calib: CalibrationSet, *, batches: int = 4, batch_size: int = 64) -> dict[str, dict[int, float]]:
    """Per layer and group count, the mean squared error its grouped input quantization puts on the layer's output
    (‖(X̂ − X) Wᵀ‖², on about `batches` calibration batches spread over the steps)."""
    errors = {name: dict.fromkeys(per, 0.0) for name, per in fitted.items()}
    whole = [1.0]  # the one-process batch's rows per row held here (a rank's shard holds part of each batch)

    def hook(name: str):
        def pre(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            for g, gq in fitted[name].items():
                err = torch.nn.functional.linear(fake_quant_groups(x, gq) - x, mod.weight.float()).pow(2)
                errors[name][g] += float(err.sum()) / (err.numel() * whole[0])
        return pre

    handles = [layers[name].register_forward_pre_hook(hook(name)) for name in fitted]
    stride = max(1, calib.num_batches(batch_size) // batches)  # spread over the steps
    try:
        with torch.no_grad():
            for i, ((x, t, cond), layout) in enumerate(zip(calib.batches(batch_size), calib.layouts(batch_size),
                                                           strict=True)):
                if i % stride == 0:
                    whole[0] = 1.0 if layout is None else layout.total / len(layout.local)
                    forward(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    return sum_tables(errors, "IGQ errors")  # every rank's share of the means (equal to float rounding)


def allocate_groups(errors: dict[str, dict[int, float]], bops: dict[str, dict[int, int]], budget: int
                    ) -> dict[str, int]:
    """Per layer, a group count among its candidates (the keys of `errors[layer]`): start from the fewest groups
    everywhere and repeatedly take the upgrade with the largest error decrease per added BOP that still fits the
    `budget` (§3.3; greedy multiple-choice knapsack). DenoqError when the budget is below the all-fewest cost."""
    choice = {name: min(c) for name, c in errors.items()}
    spent = sum(bops[name][g] for name, g in choice.items())
    if spent > budget:
        raise DenoqError(f"IGQ BOP budget {budget:.4g} is below the cost of the fewest groups everywhere "
                         f"({spent:.4g}); raise activations.igq_budget to at least 1.0")
    while True:
        best = None
        for name, g in sorted(choice.items()):
            for cand in sorted(errors[name]):
                extra = bops[name][cand] - bops[name][g]
                gain = errors[name][g] - errors[name][cand]
                if cand <= g or gain <= 0 or spent + extra > budget:
                    continue
                ratio = gain / max(extra, 1)
                if best is None or ratio > best[0]:
                    best = (ratio, name, cand, extra)
        if best is None:
            return choice
        _, name, cand, extra = best
        choice[name] = cand
        spent += extra


@dataclass(frozen=True)
class IgqSettings:
    """`groups` (G, the most any layer gets), `budget` (BOPs as a multiple of one group everywhere; 0 = every
    layer gets G), the activation bits and signedness of the target, and `mode`: `dynamic` (per-instance groups)
    or `static` (calibration-time channel groups folded into the weights, `static_factors`)."""

    groups: int
    budget: float
    bits: int
    signed: bool
    mode: str = "dynamic"


def group_layers(plan: QuantPlan, model: nn.Module, forward: Callable, layers: dict[str, nn.Module],
                 calib: CalibrationSet, macs: dict[str, int], settings: IgqSettings
                 ) -> tuple[QuantPlan, dict[str, Any]]:
    """`plan` with IGQ-ViT groups on the token inputs of its linear layers (those calibrated on [B, L, C] inputs
    with a quantized input), their counts allocated under the budget; and what was chosen, for the manifest.
    `forward` runs `model` (whose modules `layers` are, by name: possibly offloaded, `offload.py`)."""
    ranges = collect_ranges(forward, layers, calib)
    token_layers = {n: r for n, r in ranges.items() if n in plan.layers and plan.layers[n].input is not None}
    if settings.mode == "static":
        return static_groups(plan, model, layers, token_layers, settings)
    counts = candidate_groups(settings.groups) if settings.budget > 0 else [settings.groups]
    fitted = {name: {g: fit_groups(r.m, r.big_m, g, settings.bits, settings.signed, name) for g in counts}
              for name, r in bar(sorted(token_layers.items()), desc="IGQ groups", unit="layer")}
    info: dict[str, Any] = {"groups": settings.groups, "budget": settings.budget}
    if settings.budget > 0:
        errors = output_errors(forward, layers, fitted, calib)
        cost = {}
        for name in fitted:
            lp = plan.layers[name]
            outputs = macs[name] // max(int(lp.weight_int[0].numel()), 1)
            cost[name] = {g: group_bops(macs[name], outputs, lp.weight_bits, settings.bits, g) for g in counts}
        base = sum(c[1] for c in cost.values())
        choice = allocate_groups(errors, cost, int(settings.budget * base))
        info.update({"bops_one_group": base, "bops_chosen": sum(cost[n][g] for n, g in choice.items())})
    else:
        choice = dict.fromkeys(fitted, settings.groups)
    info["layers"] = dict(sorted(choice.items()))
    out = QuantPlan(plan.num_train_timesteps, plan.target, attention=plan.attention)
    for name, lp in plan.layers.items():
        out.add(dataclasses.replace(lp, input_groups=fitted[name][choice[name]]) if name in choice else lp)
    return out, info


def static_factors(r: InstanceRanges, groups: int, bits: int, name: str) -> tuple[torch.Tensor, GroupQuant]:
    """Static groups of one layer (the TensorRT variant, in the spirit of SmoothQuant): channels grouped once, at
    calibration, by their range over every calibration instance (`fit_groups` on the per-channel min / max), and
    each channel's group scale s_g(c) turned into a factor f_c = s_max / s_g(c) ≥ 1 that multiplies the input
    before one per-tensor quantizer of scale s_max: channel c is then quantized with step s_g(c), exactly its
    group's. The layer's weight columns are divided by f_c (W x = (W / f)(f x)). Returns f [C] and the groups."""
    m, big_m = r.m.amin(dim=0, keepdim=True), r.big_m.amax(dim=0, keepdim=True)
    gq = fit_groups(m, big_m, groups, bits, True, name)
    g = assign(m, big_m, gq)[0]
    scale = gq.scale.double()
    return (scale.max() / scale[g]).float(), gq


def static_groups(plan: QuantPlan, model: nn.Module, layers: dict[str, nn.Module],
                  token_layers: dict[str, InstanceRanges], settings: IgqSettings) -> tuple[QuantPlan, dict[str, Any]]:
    """`plan` with static groups on the token layers (`static_factors`): their weights re-rounded (round to
    nearest, the layer's layout) after the columns are divided by the factors, their input quantizer the constant
    per-tensor scale s_max (symmetric: the `trt` target's int8)."""
    if not settings.signed:
        raise DenoqError("activations.igq_mode=static folds group scales into one symmetric per-tensor quantizer; "
                         "it is for target=trt (use activations.igq_mode=dynamic with target=ort-cpu)")
    if settings.budget > 0:
        raise DenoqError("activations.igq_budget allocates dynamic groups by their run-time cost; static groups "
                         "cost nothing at run time: leave activations.igq_budget=0 with activations.igq_mode=static")
    static: dict[str, LayerPlan] = {}
    for group in by_unit(model, sorted(token_layers)):  # an offloaded model holds each unit's weights in turn
        with resident(model, group):
            for name in group:
                lp = plan.layers[name]
                factors, gq = static_factors(token_layers[name], settings.groups, settings.bits, name)
                w = layers[name].weight.detach().float() / factors
                rounding = GptqSettings(bits=lp.weight_bits, group_size=lp.block_size)
                requantized = layer_plan(name, layers[name], rtn(w, rounding), rounding)
                table = torch.full_like(lp.input.scale, float(gq.scale.max()))
                static[name] = dataclasses.replace(requantized, input=dataclasses.replace(lp.input, scale=table),
                                                   output=lp.output, input_factors=factors)
    out = QuantPlan(plan.num_train_timesteps, plan.target, attention=plan.attention)
    for name, lp in plan.layers.items():
        out.add(static.get(name, lp))
    info = {"groups": settings.groups, "mode": "static", "layers": dict.fromkeys(sorted(token_layers),
                                                                               settings.groups)}
    return out, info
