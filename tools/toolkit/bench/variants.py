"""The graphs the bench compares, as data: one `Variant` per graph of a model, in the order of the tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: How a variant's graph is made (see `Variant`).
Made = Literal["fp", "compile", "same", "peer", "selector", "head"]


@dataclass(frozen=True)
class Variant:
    """One graph of a model: `key` names it in the JSON report, `label` in the tables (`{groups}` stands for
    `--groups`). `made` says how `toolkit.bench.prepare` makes it:

    - `fp`: the `model.fp.onnx` of `base`'s compile;
    - `compile`: a denoq compile of recipe `preset` with `sets` (after the model's overrides, before `--set`);
    - `same`: the graph of `base`, run in another session (see `default_kernels`);
    - `peer`: `onnxruntime.quantization.quantize_static` on the FP graph of `base`'s compile, calibrated on that
      compile's calibration inputs; with `peer_fix`, the timestep embedding and the layers the recipe keeps in
      float are left in float (`nodes_to_exclude`);
    - `selector` (only with `--groups` > 1): the compile of `base` with `activations.timestep_groups=G` added
      after `--set`;
    - `head` (only with `--ptqd-head`): the graph of `base` with PTQD's correction head appended.

    `default_kernels`: the session runs ORT's default integer kernels, without the `session.x64quantprecision`
    that denoq's sessions set on CPUs without VNNI for graphs whose weights exceed 7 bits (denoq.engines.ort).
    """

    key: str
    label: str
    made: Made
    base: str = ""
    preset: str = ""
    sets: tuple[str, ...] = ()
    default_kernels: bool = False
    peer_fix: bool = False

    @property
    def core(self) -> bool:
        """Timed on every model, a column of the latency table and a row of the quality table."""
        return self.made not in ("selector", "head")


#: Every variant, in table order. The peer's graphs run with ORT's default kernels: that is how a user of ORT's
#: quantizer runs them, and onnxruntime 1.32's s8→u8 weight conversion fails on their shared zero-point
#: initializers ("Attempt to replace the existing tensor") on CPUs without VNNI. `ort-cpu-raw` shows what the
#: remedy costs and saves; `ort-cpu-w7`'s 7-bit weights never need it.
VARIANTS: tuple[Variant, ...] = (
    Variant("fp32", "FP32", "fp", base="trt"),
    Variant("trt", "denoq trt", "compile", preset="w8a8"),
    Variant("ort-cpu", "denoq ort-cpu", "compile", preset="w8a8-ort"),
    Variant("ort-cpu-raw", "denoq ort-cpu, ORT's default kernels", "same", base="ort-cpu", default_kernels=True),
    Variant("ort-cpu-w7", "denoq ort-cpu, 7-bit weights", "compile", preset="w8a8-ort", sets=("weights.bits=7",)),
    Variant("peer", "ORT quantize_static", "peer", base="trt", default_kernels=True),
    Variant("peer-t", "ORT quantize_static, t-emb. + keep_fp FP", "peer", base="trt", default_kernels=True,
            peer_fix=True),
    Variant("trt-sel", "denoq trt G={groups}", "selector", base="trt"),
    Variant("ort-cpu-sel", "denoq ort-cpu G={groups}", "selector", base="ort-cpu"),
    Variant("trt-head", "denoq trt + PTQD head", "head", base="trt"),
)
BY_KEY: dict[str, Variant] = {v.key: v for v in VARIANTS}
#: The variants of every model, in table order.
CORE: tuple[str, ...] = tuple(v.key for v in VARIANTS if v.core)
#: Timestep-selector variants (`--groups` > 1), each timed against its `base`.
SELECTORS: tuple[str, ...] = tuple(v.key for v in VARIANTS if v.made == "selector")
#: PTQD head variants (`--ptqd-head`), each timed against its `base`.
HEADS: tuple[str, ...] = tuple(v.key for v in VARIANTS if v.made == "head")
#: The selector's latency goal: G graph ms / G=1 graph ms of the same profile.
SELECTOR_OVERHEAD_GOAL = 1.05
#: The quality rows' key of the FP model run in PyTorch (the reference).
TORCH_FP = "torch-fp"
#: Recipe overrides per model name (applied before `--set`): the random `big` model only needs plausible ranges.
MODEL_SETS: dict[str, list[str]] = {"big": ["calib.samples=8", "calib.steps=5"]}


def of_kind(*made: Made) -> list[Variant]:
    """The variants made so, in table order."""
    return [v for v in VARIANTS if v.made in made]


def variant_label(key: str, groups: int = 1) -> str:
    """A variant's name in the tables, `--groups` filled in (`denoq trt G=4`)."""
    return BY_KEY[key].label.format(groups=groups)


def base_of(key: str) -> str | None:
    """The graph a selector or head variant is timed against (its overhead's denominator); None for the others."""
    v = BY_KEY[key]
    return v.base if v.made in ("selector", "head") else None


def label_quality(key: str) -> str:
    """A quality row's name: `FP (PyTorch)` for TORCH_FP, else the variant's label (`(ORT)` after the FP graph's)."""
    if key == TORCH_FP:
        return "FP (PyTorch)"
    return BY_KEY[key].label + (" (ORT)" if BY_KEY[key].made == "fp" else "")
