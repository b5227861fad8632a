"""The weight stage: every planned layer's weights rounded by `weights.method` (rtn | obq | gptq).

RTN needs no data. OBQ and GPTQ (`gptq.py`) minimize each layer's output error ‖WX − ŴX‖² on calibration inputs
X, through the layer Hessian H = 2XXᵀ/N. The inputs are the FP calibration trajectories' states (a subset:
every recorded step, the first `hessian_samples` trajectories), in one of two modes:

- parallel: one forward pass of the FP model collects every layer's H at once; each layer is rounded against FP
  inputs (fast, and what most PTQ tools do);
- sequential (the papers' setting): the model's top-level blocks (conv_in, time embedding, each down / mid / up
  block, the output head: the first component of the module name) are processed in the order the forward pass
  reaches them; a block's Hessians are collected with every earlier block already holding its rounded weights, so
  each layer compensates the error of the weights before it.

A layer whose input channels `weights.group_size` does not divide keeps per-output-channel scales, and so does
every convolution unless `conv_blocks` (TensorRT runs INT8 convolutions with per-output-channel weight scales only:
its blocked quantization is INT4 on MatMul / Gemm); both are listed in `per_channel_layers` of the report.
Where OBQ / GPTQ cannot run, the report's `fallbacks` say what was done: a layer no calibration input reached
is rounded to nearest; a Hessian with no Cholesky factor after dampening is dampened 10× and 100× more (the
paper's remedy, λ is a fraction of the mean diagonal), then rounded to nearest.

Activations stay in floating point here (as in GPTQ); their quantizers are calibrated afterwards on the FP model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from denoq.calibrators.calibset import CalibrationSet, run_hooked
from denoq.calibrators.distributed import all_gather_objects, rank, world_size
from denoq.calibrators.gptq import (
    GptqSettings,
    HessianNotPositiveDefinite,
    WeightQuant,
    gptq,
    group_columns,
    layer_output_error,
    layer_plan,
    obq,
    rtn,
)
from denoq.calibrators.layer_matrix import HessianAccumulator, weight_matrix
from denoq.calibrators.offload import by_unit, is_offloaded, resident, substitute
from denoq.log import bar
from denoq.plan import LayerPlan
from denoq.sampling.cond import call_denoiser

DAMP_RETRIES = (10.0, 100.0)  # dampening multipliers tried when the Cholesky factorization fails
REPORT_ROWS = 256  # output rows the report's error-vs-RTN ratio is measured on
HESSIAN_BATCH = 64  # calibration inputs per forward pass of the Hessian passes


@dataclass(frozen=True)
class WeightSettings:
    """`method` and its rounding settings; `sequential` and `hessian_samples` only matter for obq / gptq;
    `conv_blocks`: convolutions use `rounding.group_size` blocks too (else per output channel)."""

    method: str
    rounding: GptqSettings
    sequential: bool = True
    hessian_samples: int = 16
    conv_blocks: bool = True


def top_block(name: str) -> str:
    """The top-level block of a module name: `down_blocks.1` for `down_blocks.1.resnets.0.conv1`."""
    head, _, rest = name.partition(".")
    return f"{head}.{rest.partition('.')[0]}" if rest and rest.partition(".")[0].isdigit() else head


def forward_order(model: nn.Module, layers: dict[str, nn.Module], calib: CalibrationSet) -> list[str]:
    """The planned layers in the order one forward pass first calls them."""
    order: list[str] = []
    _one_call(model, calib, [m.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n) if n not in order
                                                         else None) for name, m in layers.items()])
    return order + sorted(set(layers) - set(order))


def _one_call(model: nn.Module, calib: CalibrationSet, handles: list) -> None:
    """One forward pass of `model` on the first calibration input this rank holds, then remove the hooks."""
    try:
        x, t, cond = next(calib.batches(1))
        with torch.no_grad():
            call_denoiser(model, x, t, cond)
    finally:
        for h in handles:
            h.remove()


def blocks_in_order(model: nn.Module, layers: dict[str, nn.Module], calib: CalibrationSet) -> dict[str, list[str]]:
    """The planned layers grouped by `top_block`, blocks and the layers in each in the order a forward pass first
    reaches them."""
    blocks: dict[str, list[str]] = {}
    for name in forward_order(model, layers, calib):
        blocks.setdefault(top_block(name), []).append(name)
    return blocks


def _ends(model: nn.Module, blocks: dict[str, list[str]], calib: CalibrationSet) -> dict[str, nn.Module | None]:
    """Per block, the module after which a Hessian pass of the block's layers may stop: the block itself when one
    forward pass calls it exactly once and calls its layers only inside that call (DiT's head calls the first
    block's embedder again: that block runs to the end), else None."""
    modules = dict(model.named_modules())
    calls = dict.fromkeys(blocks, 0)
    inside: set[str] = set()
    outside: set[str] = set()

    def enter(b: str) -> None:
        calls[b] += 1
        inside.add(b)

    def layer(b: str) -> None:
        if b not in inside:
            outside.add(b)

    handles = [h for b, names in blocks.items() for h in (
        modules[b].register_forward_pre_hook(lambda _m, _a, b=b: enter(b)),
        modules[b].register_forward_hook(lambda _m, _a, _o, b=b: inside.discard(b)),
        *(modules[n].register_forward_pre_hook(lambda _m, _a, b=b: layer(b)) for n in names))]
    _one_call(model, calib, handles)
    return {b: modules[b] if calls[b] == 1 and b not in outside else None for b in blocks}


def _hessians(model: nn.Module, layers: dict[str, nn.Module], calib: CalibrationSet,
              stop_after: nn.Module | None = None) -> dict[str, torch.Tensor | None]:
    """Every layer's H over `calib` (None for a layer the forward pass never reached); with `stop_after`, each
    forward pass ends when that module (the block holding `layers`) returns. Under R ranks (`calib` whole on
    every rank) rank r runs the r-th of R runs of consecutive batches and the sums are combined in batch order
    (`HessianAccumulator.combine`): the one-process H on every rank, bit for bit."""
    size = world_size()
    acc = {name: HessianAccumulator(m, deferred=size > 1) for name, m in sorted(layers.items())}
    batches = calib.num_batches(HESSIAN_BATCH)
    mine = range(batches * rank() // size, batches * (rank() + 1) // size)
    run_hooked(model, calib, [a.attach() for a in acc.values()], HESSIAN_BATCH, stop_after=stop_after, only=mine)
    if size > 1:
        for name, a in acc.items():
            a.combine(f"the Hessian of {name}")
    return {name: a.hessian if a.count else None for name, a in acc.items()}


def layer_rounding(module: nn.Module, settings: WeightSettings) -> GptqSettings:
    """The layer's own settings: `group_size` blocks where they divide its input channels; a layer they do not
    divide (e.g. 32 channels with group 64), or a convolution without `conv_blocks`, keeps one scale per output
    channel (`round_weights` lists them)."""
    rounding = settings.rounding
    conv = isinstance(module, nn.Conv2d)
    if rounding.group_size and (module.weight.shape[1] % rounding.group_size or (conv and not settings.conv_blocks)):
        return dataclasses.replace(rounding, group_size=0)
    return rounding


def _round(module: nn.Module, h: torch.Tensor | None, settings: WeightSettings) -> WeightQuant:
    w = weight_matrix(module).detach()
    rounding = layer_rounding(module, settings)
    cpg = group_columns(module, rounding.group_size) if rounding.group_size else None
    if settings.method == "rtn" or h is None:
        return rtn(w, rounding, cpg)
    return (gptq if settings.method == "gptq" else obq)(w, h, rounding, cpg)


def _round_or_fall_back(module: nn.Module, h: torch.Tensor | None,
                        settings: WeightSettings) -> tuple[WeightQuant, str | None]:
    """`_round`, and where OBQ / GPTQ cannot run, what is done instead (with the reason, for the report):
    a layer no calibration input reached is rounded to nearest; a Hessian without a Cholesky factor after
    dampening is retried with DAMP_RETRIES × more dampening, then rounded to nearest."""
    if h is None:
        return _round(module, None, settings), "no calibration input reached the layer: round to nearest"
    damp = settings.rounding.damp
    for factor in (1.0, *DAMP_RETRIES):
        retry = dataclasses.replace(settings, rounding=dataclasses.replace(settings.rounding, damp=damp * factor))
        try:
            wq = _round(module, h, retry)
        except HessianNotPositiveDefinite:
            continue
        return wq, None if factor == 1.0 else (f"Hessian not positive definite at weights.damp={damp:g}: "
                                               f"dampened with {damp * factor:g}")
    return (_round(module, None, settings),
            f"Hessian not positive definite even at weights.damp={damp * DAMP_RETRIES[-1]:g}: round to nearest")


def _per_channel(layers: dict[str, nn.Module], settings: WeightSettings) -> list[str]:
    """The layers `layer_rounding` gives per-channel scales although `weights.group_size` asks for blocks."""
    return sorted(n for n, m in layers.items() if settings.rounding.group_size
                  and layer_rounding(m, settings).group_size == 0)


def _solve(name: str, module: nn.Module, h: torch.Tensor | None, settings: WeightSettings
           ) -> tuple[LayerPlan, str | None, float | None]:
    """Layer `name` rounded against `h`: its plan, the fallback taken (or None) and its output error ½tr(ΔW H ΔWᵀ)
    relative to RTN's on the same H (None without H), over up to REPORT_ROWS evenly spaced output rows (the rows
    are independent in E; all of them would cost rows·cols² more than the rounding on wide layers)."""
    wq, fallback = _round_or_fall_back(module, h, settings)
    plan = layer_plan(name, module, wq, layer_rounding(module, settings))
    if h is None:
        return plan, fallback, None
    w = weight_matrix(module)
    rows = torch.linspace(0, w.shape[0] - 1, min(w.shape[0], REPORT_ROWS)).round().long()
    w = w[rows].double()
    base = layer_output_error(w, _round(module, None, settings).dequantized()[rows].double(), h)
    return plan, fallback, layer_output_error(w, wq.dequantized()[rows].double(), h) / max(base, 1e-30)


def _owners(layers: dict[str, nn.Module], ranks: int) -> dict[str, int]:
    """Which rank rounds each layer: the largest first (cost ∝ cols²·(rows + cols), GPTQ's), each to the rank with
    the least work so far; the same on every rank."""
    def cost(m: nn.Module) -> int:
        rows = m.weight.shape[0]
        cols = m.weight.numel() // rows
        return cols * cols * (rows + cols)

    load = [0] * ranks
    owners = {}
    for name in sorted(layers, key=lambda n: (-cost(layers[n]), n)):
        owners[name] = r = load.index(min(load))
        load[r] += cost(layers[name])
    return owners


def round_weights(model: nn.Module, layers: dict[str, nn.Module], calib: CalibrationSet, settings: WeightSettings
                  ) -> tuple[dict[str, LayerPlan], dict[str, Any]]:
    """Weight-only LayerPlans (activation quantizers unset) for `layers` of `model`, and a report: seconds, mode,
    and per layer the output error proxy ½tr(ΔW H ΔWᵀ) relative to RTN's, on the inputs the layer was rounded for
    (FP inputs in parallel mode, the rounded prefix's in sequential mode; obq / gptq only).

    The layers are rounded block by block (`blocks_in_order`); an offloaded model (`offload.BlockOffload`) holds the
    unit of the layers being rounded loaded, one unit at a time. Sequential mode computes the rounded prefix on a
    copy of the model, or, when the model is offloaded, by substituting the rounded weights as the units load (no
    copy). Under several ranks the inputs are gathered, each rank runs its share of the Hessian passes' batches and
    the sums are combined in the one-process order (`_hessians`: the integers stay identical), and the layers of
    each block are rounded by one rank each (`_owners`) and all-gathered before the next block."""
    start = time.perf_counter()
    if settings.method == "rtn":
        plans: dict[str, LayerPlan] = {}
        for group in by_unit(model, sorted(layers)):
            with resident(model, group):
                plans.update({name: layer_plan(name, layers[name], _round(layers[name], None, settings),
                                               layer_rounding(layers[name], settings)) for name in group})
        return plans, {"method": "rtn", "seconds": round(time.perf_counter() - start, 2),
                       "per_channel_layers": _per_channel(layers, settings)}
    data = calib.take(list(range(len(calib.t))), min(settings.hessian_samples, calib.trajectories)).whole()
    blocks = blocks_in_order(model, layers, data)
    with contextlib.ExitStack() as stack:
        if not settings.sequential:
            work, fp_h = model, _hessians(model, layers, data)
        elif is_offloaded(model):
            work, fp_h = model, None
            rounded: dict[str, Any] = {}
            stack.enter_context(substitute(model, rounded))
        else:
            work, fp_h = copy.deepcopy(model).eval(), None
        work_layers = dict(work.named_modules())
        ends = _ends(work, blocks, data) if fp_h is None else {}
        plans = {}
        error_vs_rtn: dict[str, float] = {}
        fallbacks: dict[str, str] = {}
        done = bar(total=len(layers), desc=f"{settings.method} weights", unit="layer")
        for names in blocks.values():
            hs = fp_h if fp_h is not None else _hessians(work, {n: work_layers[n] for n in names}, data,
                                                         ends[top_block(names[0])])
            owners = _owners({n: layers[n] for n in names}, world_size())
            mine = {}
            for group in by_unit(model, [n for n in names if owners[n] == rank()]):
                with resident(model, group):
                    mine.update({name: _solve(name, layers[name], hs[name], settings) for name in group})
            solved = {k: v for part in all_gather_objects(mine, "GPTQ / OBQ roundings") for k, v in part.items()}
            for name in names:
                plans[name], fallback, ratio = solved[name]
                if fallback is not None:
                    fallbacks[name] = fallback
                if ratio is not None:
                    error_vs_rtn[name] = ratio
                if work is not model:
                    with torch.no_grad():
                        work_layers[name].weight.copy_(plans[name].dequantized_weight())
                elif settings.sequential:
                    rounded[f"{name}.weight"] = plans[name].dequantized_weight
                done.update()
        done.close()
    ratios = sorted(error_vs_rtn.values()) or [1.0]
    return plans, {"method": settings.method, "sequential": settings.sequential,
                   "hessian_inputs": len(data), "seconds": round(time.perf_counter() - start, 2),
                   "per_channel_layers": _per_channel(layers, settings), "fallbacks": fallbacks,
                   "output_error_vs_rtn_median": ratios[len(ratios) // 2],
                   "output_error_vs_rtn": {k: round(v, 4) for k, v in sorted(error_vs_rtn.items())}}
