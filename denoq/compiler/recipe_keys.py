"""The recipe's keys as one typed tree: a frozen dataclass per section (`weights.*`, `activations.*`, …) whose
fields carry each key's default, type, allowed values and one-line doc.

`RecipeConfig` is the tree the compiler reads (`config.weights.bits`); `RECIPE_KEYS` is the same keys flattened to
the dotted names users write (`--set weights.bits=4`), in the order `denoq recipes` lists them. Both are built from
the dataclasses below, so a key is declared exactly once. This module imports nothing heavy: `denoq recipes` and
`--help` read it at start-up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from denoq.calibrators.choices import BACKPROPS, GRADIENTS, GRANULARITIES, OBJECTIVES, STARTS, WEIGHT_BITS


@dataclass(frozen=True)
class KeySpec:
    """One recipe key: its dotted name, default, type, the values allowed, and a one-line doc.

    Allowed values are `choices` (an explicit tuple) or the range `lo`..`hi` (either end optional; `lo_open`
    makes the lower end exclusive). `planned(value)` is true for values denoq does not implement yet (refused with
    "not available in this version"); values neither allowed nor planned are refused as not allowed.
    """

    name: str
    default: Any
    type: type
    doc: str
    choices: tuple[Any, ...] | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    planned: Callable[[Any], bool] | None = field(default=None, compare=False)

    def allowed_text(self) -> str:
        """The allowed values in words, as `denoq recipes` and the error messages show them."""
        if self.choices is not None:
            return ", ".join(format_value(c) for c in self.choices)
        kind = "integers" if self.type is int else "numbers"
        if self.lo is not None and self.hi is not None:
            if self.type is int and not self.lo_open:
                return f"{format_value(self.lo)}..{format_value(self.hi)}"
            return f"{kind} in {'(' if self.lo_open else '['}{format_value(self.lo)}, {format_value(self.hi)}]"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '≥'} {format_value(self.lo)}"
        if self.hi is not None:
            return f"{kind} ≤ {format_value(self.hi)}"
        return f"any {'integer' if self.type is int else self.type.__name__}"

    def is_allowed(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if self.type is float and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and value > self.hi)


def format_value(value: Any) -> str:
    """A value as it is written after `--set KEY=`: `true`, `8`, `99.99`, `mse`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def key(default: Any, doc: str, *, choices: tuple[Any, ...] | None = None, lo: float | None = None,
        hi: float | None = None, lo_open: bool = False, planned: Callable[[Any], bool] | None = None) -> Any:
    """A dataclass field that is a recipe key: its default, and the rest of its `KeySpec` as field metadata."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open,
                                            "planned": planned})


def _two_bits(value: Any) -> bool:
    return value == 2


@dataclass(frozen=True)
class TrtKeys:
    """`trt.*`: the TensorRT graph (target trt)."""

    fp16: bool = key(True,
            "target trt: also write model.trt.onnx, the Q/DQ graph in float16 with float32 normalizations, "
            "softmax, timestep embedding and trt.fp32_layers (what denoq build compiles); false = build the "
            "float32 graph")
    fp32_layers: str = key("@out",
            "target trt with trt.fp16: comma-separated module-name patterns (fnmatch; @in / @out = the model's "
            "input / output layer: conv_in / conv_out of a UNet, pos_embed.proj / proj_out_2 of a DiT) computed "
            "in float32 with everything after them up to the next quantized layer (the output head)")


@dataclass(frozen=True)
class WeightKeys:
    """`weights.*`: how weights are quantized and rounded (RTN, GPTQ/OBQ, learned)."""

    bits: int = key(8,
            "weight bits (symmetric; 7 and 6 in the int8 container, 7 = reduce_range: no u8×s8 saturation on "
            "CPUs without VNNI; 4 as ONNX int4 on MatMul / Gemm; 3 is for experiments); 8 with format fp8, 4 with "
            "nvfp4", choices=WEIGHT_BITS, planned=_two_bits)
    format: str = key("int",
            "weight number format: int = integers; fp8 = FP8 E4M3 per output channel (Hopper / Ada); nvfp4 = "
            "FP4 E2M1 in blocks of 16 input channels with FP8 block scales and a per-layer scale (Blackwell; "
            "weights.group_size=16)", choices=("int", "fp8", "nvfp4"))
    method: str = key("rtn",
            "weight rounding: rtn = round to nearest; gptq = GPTQ (lazy blocks); obq = Optimal Brain Quantizer "
            "(greedy, slow on wide layers); adaround = learned rounding and activation scales (accuquant.*)",
            choices=("rtn", "gptq", "obq", "adaround"))
    group_size: int = key(0,
            "weight block size along the input channels (a scale per block); 0 = one scale per output channel", lo=0)
    damp: float = key(0.01,
            "gptq/obq: dampening added to the Hessian diagonal, × its mean", lo=0, hi=1, lo_open=True)
    conv_blocks: bool = key(False,
            "weights.group_size blocks for Conv weights too (ONNX Runtime only: TensorRT's INT8 convolutions "
            "take per-output-channel weight scales, so the trt-rules check rejects blocked conv weights)")
    act_order: bool = key(False,
            "gptq: quantize columns in descending Hessian diagonal (static groups)")
    sequential: bool = key(True,
            "gptq/obq: round block by block, later blocks' Hessians taken with the earlier blocks already "
            "rounded; false = all Hessians from the FP model (parallel)")
    hessian_samples: int = key(16,
            "gptq/obq: trajectories (at every calibration step) whose inputs form the Hessians", lo=1, hi=4096)


@dataclass(frozen=True)
class ActivationKeys:
    """`activations.*`: activation quantizers, their observers, timestep groups (ADP-DM), IGQ-ViT groups."""

    bits: int = key(8,
            "activation bits (per tensor); 16 = activations stay in floating point (weight-only, e.g. w4a16); 4 "
            "and 6 are for quality studies on ORT (TensorRT takes 8-bit integer activations); 8 with format fp8, "
            "4 with nvfp4", choices=(4, 6, 8, 16))
    format: str = key("int",
            "activation number format: int; fp8 = FP8 E4M3 per tensor (TensorRT's FP8); nvfp4 = FP4 E2M1 in "
            "dynamic blocks of 16 channels (activations.block_size=16) with FP8 block scales computed at run "
            "time and a calibrated per-tensor scale (TensorRT's FP4 GEMMs)", choices=("int", "fp8", "nvfp4"))
    block_size: int = key(0,
            "dynamic block quantization: every block of this many channels of one token / pixel gets its scale "
            "from its own amax at run time (SVDQuant's W4A4 uses 64 for int4, NVFP4 16); 0 = one calibrated scale "
            "per tensor", lo=0, hi=256)
    observer: str = key("mse",
            "how activation ranges are chosen from the calibration set",
            choices=("minmax", "percentile", "mse", "large_magnitude"))
    percentile: float = key(99.99,
            "percentile of |x| used by the percentile observer", lo=50, hi=100, lo_open=True)
    lm_rho: float = key(1.0,
            "ρ of the large-magnitude interval: the saturated fraction is ρ/(2^b−1)", lo=0, lo_open=True)
    timestep_groups: int = key(1,
            "timestep groups with their own input scales (ADP-DM); 1 = off", lo=1, hi=64)
    group_search: str = key("dp",
            "how timestep groups are found: dp = exact contiguous partition of each layer's error; "
            "differentiable = ADP-DM's importance-weight search on the model's output error",
            choices=("dp", "differentiable"))
    calib_timesteps: str = key("uniform",
            "which recorded steps calibrate (with calib.timesteps < calib.steps): uniform = evenly spaced; "
            "normal = PTQ4DM's normal draw; srm = ADP-DM's structural risk (risk + MMD to all steps)",
            choices=("uniform", "normal", "srm"))
    srm_lambda: float = key(10.0,
            "weight of the MMD term against the empirical quantization risk in srm timestep selection", lo=0)
    igq_groups: int = key(0,
            "IGQ-ViT instance-aware groups per token activation (inputs of Linear layers on tokens; with "
            "attention.quantize also token-wise groups of the softmax): each instance's channels go to the "
            "nearest of G calibrated quantizers; 0 = off (one scale per tensor)", lo=0, hi=64)
    igq_mode: str = key("dynamic",
            "IGQ-ViT groups: dynamic = assigned per instance at run time (ONNX ops ORT runs; TensorRT would run "
            "those layers with float activations); static = channels grouped at calibration, group scales "
            "folded into per-channel factors on the input (one Mul) and the weights around one per-tensor Q/DQ "
            "(TensorRT; target=trt)", choices=("dynamic", "static"))
    igq_budget: float = key(0.0,
            "IGQ-ViT group allocation: BOP budget as a multiple of the BOPs with one group everywhere (≥ 1); "
            "each layer gets 1, 2, 4, … up to activations.igq_groups groups, most error removed per BOP first; "
            "0 = every layer gets activations.igq_groups", lo=0)


@dataclass(frozen=True)
class AttentionKeys:
    """`attention.*`: quantized attention matmuls."""

    quantize: bool = key(False,
            "quantize the inputs of the attention matmuls (Q·Kᵀ and softmax·V; the probabilities on their own "
            "non-negative range) with activations.bits and .format, per tensor (with activations.block_size: "
            "8 bits, FP8 for nvfp4, as TensorRT's fused FP8 attention takes them); false = attention stays in "
            "float (FP16 on TensorRT, whose fused INT8 attention stops at sequence length 512)")
    softmax_grid: str = key("uniform",
            "with attention.quantize: the softmax probabilities' grid; uniform = Q/DQ on [0, max P]; log2 = "
            "2^−q, q < 2^bits (keeps small probabilities; float ops, ONNX Runtime only)", choices=("uniform", "log2"))


@dataclass(frozen=True)
class SvdQuantKeys:
    """`svdquant.*`: SVDQuant's smoothing and 16-bit low-rank branch (Li et al., ICLR 2025)."""

    rank: int = key(0,
            "rank r of the float16 low-rank branch L1·L2 that takes each quantized layer's largest singular "
            "directions (the residual is quantized); 0 = no branch", lo=0, hi=1024)
    alpha: float = key(0.0,
            "smoothing strength α: λ_j = max|X_j|^α / max|W_j|^(1−α) migrates activation outliers into the "
            "weights (x·λ⁻¹ before the quantizer, W·λ folded); 0 = no smoothing", lo=0, hi=1)


@dataclass(frozen=True)
class PtqdKeys:
    """`ptqd.*`: PTQD's correction head and variance schedule calibration."""

    enabled: bool = key(False,
            "PTQD correction head: ε = (ε_q − bias[t]) / (1 + k[t]), statistics per step of the calibration "
            "sampler (sampling must then use calib.sampler with calib.steps)")
    correlation: bool = key(True,
            "PTQD: fit and remove the noise's part correlated with ε (k); false = bias correction only (k = 0)")
    vsc: bool = key(False,
            "PTQD variance schedule calibration: the sampler lowers the noise it adds by the residual variance "
            "(needs ptqd.enabled; a no-op for DDIM with η = 0)")


@dataclass(frozen=True)
class PrecisionKeys:
    """`precision.*`: step-aware mixed precision."""

    mixed: str = key("",
            "step-aware mixed precision (PTQD): comma-separated presets compiled beside this recipe (e.g. "
            "w8a8); each denoising step of calib.sampler/calib.steps runs the cheapest whose SNR reaches the "
            "diffusion's; empty = off")


@dataclass(frozen=True)
class AccuQuantKeys:
    """`accuquant.*`: learned rounding and step sizes (weights.method=adaround), AccuQuant's window."""

    window: int = key(0,
            "with weights.method=adaround: 0 = the learned unit's own output (granularity=block: each block's, "
            "BRECQ), 1 = the model's output at one step, n ≥ 2 = the AccuQuant window of n sampler steps",
            lo=0, hi=64)
    granularity: str = key("network",
            "adaround: network = every layer learns at once; block = one top-level block at a time in forward "
            "order (earlier blocks hard-rounded, later ones in floating point), accuquant.iters each",
            choices=GRANULARITIES)
    block_inputs: int = key(1024,
            "adaround with granularity=block and window 0: calibration inputs whose block arguments are cached",
            lo=1, hi=1_000_000)
    iters: int = key(1000,
            "adaround: optimizer iterations (per block with granularity=block)", lo=1, hi=100_000)
    batch: int = key(16,
            "adaround: trajectories per iteration", lo=1, hi=4096)
    lr: float = key(0.1,
            "adaround: Adam learning rate of the rounding (log-scales: ×0.1)", lo=0, lo_open=True)
    round_lambda: float = key(0.01,
            "adaround: weight λ of AdaRound's rounding regularizer", lo=0)
    init: str = key("rtn",
            "adaround: start at RTN's or GPTQ's rounding (weights.group_size etc. apply), or fp = AdaRound's "
            "own init (soft rounding = the FP weights)", choices=("rtn", "gptq", "fp"))
    backprop: str = key("recompute",
            "adaround with a window: recompute = O(1) memory in the window length; naive = backprop through it",
            choices=BACKPROPS)
    gradient: str = key("stop",
            "adaround with a window: stop = gradients stop at each model input (through the sampler's x-path "
            "only; under outputs each step's term trains that step alone, on the window's drifted input); full "
            "= the exact gradient of the window's loss, also through the quantized model's inputs",
            choices=GRADIENTS)
    objective: str = key("outputs",
            "adaround with a window: end = the distance to the FP state after the window's n steps; every = the "
            "distances after each of its steps (the first is the per-step loss); outputs = the quantized "
            "model's ε error at each step along its own simulated window (n = 1: the per-step loss)",
            choices=OBJECTIVES)
    start: str = key("fp",
            "adaround: where the quantized model's steps start: fp = the FP trajectories' states (the targets' "
            "own start); quantized = the quantized model's own trajectories from the same noise (their "
            "accumulated error included), re-run every 100 iterations", choices=STARTS)
    perstep_iters: int = key(0,
            "adaround with a window: the first iterations use the per-step objective, the window fine-tunes "
            "after them (0 = the window throughout)", lo=0, hi=100_000)


@dataclass(frozen=True)
class LayerKeys:
    """`layers.*`: which layers stay in floating point."""

    keep_fp: str = key("@in,@out",
            "comma-separated module-name patterns (fnmatch; @in / @out = the model's input / output layer) left "
            "in floating point; empty = quantize every layer")
    conv_format: str = key("same",
            "convolutions' precision: same = the recipe's weights and activations; fp8 = FP8 E4M3 weights and "
            "activations (per tensor) whatever the recipe says (TensorRT's FP4 path runs GEMMs only)",
            choices=("same", "fp8"))


@dataclass(frozen=True)
class CalibKeys:
    """`calib.*`: the calibration trajectories and which of their steps calibrate."""

    samples: int = key(64,
            "number of FP sampling trajectories recorded", lo=1, hi=4096)
    steps: int = key(25,
            "sampler steps per trajectory", lo=1, hi=1000)
    sampler: str = key("auto",
            "sampler that records the calibration trajectories: ddpm or ddim for DDPM-family models, flow-euler for "
            "flow-matching ones (FlowMatchEulerDiscreteScheduler); auto = the model's own (flow-euler for "
            "flow matching, else ddim)", choices=("auto", "ddpm", "ddim", "flow-euler"))
    guidance: str = key("",
            "conditional models: classifier-free guidance scales of the calibration trajectories, "
            "comma-separated (e.g. 1,2,4; trajectories cycle through them, labels over the classes or the "
            "prompts, the null label or the empty prompt in the doubled batch; PTQD's statistics are then taken "
            "on the guided output and its head sits after the combination); empty = unguided trajectories (class "
            "models: over the classes and the null label)")
    prompts: str = key("",
            "text-to-image models: file of calibration prompts, one a line, encoded by the pipeline's own text "
            "encoder(s); empty = the model's own prompts (embedded models) or denoq's built-in list")
    embeddings: str = key("",
            "text-to-image models without text encoders: safetensors file with what encode_prompt returns "
            "(prompt_embeds, negative_prompt_embeds; SDXL: pooled_prompt_embeds, negative_pooled_prompt_embeds, "
            "optional time_ids)")
    conditioning: str = key("model",
            "where text conditioning comes from: model = prompts through the text encoders (or calib.embeddings); "
            "random = N(0, 1) embeddings, an explicit opt-in flagged as unrepresentative",
            choices=("model", "random"))
    timesteps: int = key(0,
            "calibration timesteps: 0 = all recorded steps, else that many of them, drawn by "
            "activations.calib_timesteps", lo=0)
    size: int = key(0,
            "latent height = width of the calibration samples: 0 = the model's own (its config's sample_size; "
            "Flux: 128, FluxPipeline's 1024 px); set it to the resolution the model is deployed at", lo=0, hi=1024)
    offload: str = key("none",
            "disk = during calibration load each unit's weights (a UNet's resnets and transformer blocks, a "
            "transformer's blocks) only while the model runs through it, from the model's safetensors checkpoint "
            "or a temporary copy (TMPDIR): the calibration's peak memory holds one unit instead of the whole model "
            "(rtn / gptq / obq weights, observers, timestep groups, attention, IGQ-ViT, PTQD, block-output "
            "reconstruction); none = the model stays in memory",
            choices=("none", "disk"))


@dataclass(frozen=True)
class RecipeConfig:
    """A whole recipe, typed: the target profile, one dataclass per section, and the seed."""

    target: str = key("trt", "target profile: trt = symmetric int8, inputs only; ort-cpu = uint8 activations with "
                      "quantized outputs for ORT CPU integer kernels", choices=("trt", "ort-cpu"))
    trt: TrtKeys = field(default_factory=TrtKeys)
    weights: WeightKeys = field(default_factory=WeightKeys)
    activations: ActivationKeys = field(default_factory=ActivationKeys)
    attention: AttentionKeys = field(default_factory=AttentionKeys)
    svdquant: SvdQuantKeys = field(default_factory=SvdQuantKeys)
    ptqd: PtqdKeys = field(default_factory=PtqdKeys)
    precision: PrecisionKeys = field(default_factory=PrecisionKeys)
    accuquant: AccuQuantKeys = field(default_factory=AccuQuantKeys)
    layers: LayerKeys = field(default_factory=LayerKeys)
    calib: CalibKeys = field(default_factory=CalibKeys)
    seed: int = key(0, "random seed of calibration (noise, subsets)", lo=0, hi=2**32 - 1)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> RecipeConfig:
        """The tree of a flat `{dotted key: value}` mapping holding every key (as `Recipe.values` does)."""
        top: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if "doc" in f.metadata:
                top[f.name] = values[f.name]
            else:
                section = f.default_factory()  # type: ignore[misc]
                top[f.name] = type(section)(**{g.name: values[f"{f.name}.{g.name}"]
                                               for g in dataclasses.fields(section)})
        return cls(**top)


def _spec(name: str, f: dataclasses.Field, kind: Any) -> KeySpec:
    m = f.metadata
    return KeySpec(name, f.default, {"bool": bool, "int": int, "float": float, "str": str}[kind], m["doc"],
                   m["choices"], m["lo"], m["hi"], m["lo_open"], m["planned"])


def _flat_keys() -> dict[str, KeySpec]:
    specs: dict[str, KeySpec] = {}
    for f in dataclasses.fields(RecipeConfig):
        if "doc" in f.metadata:
            specs[f.name] = _spec(f.name, f, f.type)
            continue
        for g in dataclasses.fields(f.default_factory()):  # type: ignore[misc]
            specs[f"{f.name}.{g.name}"] = _spec(f"{f.name}.{g.name}", g, g.type)
    return specs


#: Every recipe key by its dotted name, in the order `denoq recipes` lists them.
RECIPE_KEYS: dict[str, KeySpec] = _flat_keys()
