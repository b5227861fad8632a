"""QuantPlan: every number the export passes need from calibration, and nothing else (docs/architecture.md, Contracts).

A plan is written as two files of an artifact: the tensors in `plan.safetensors` and the small description
(bits, layouts, zero points) in the `plan` section of `manifest.json`. Calibrators write plans, passes read them;
the plan is the only thing that flows between the two.

Per layer (keyed by its PyTorch module name):
- weights: the already-rounded values in PyTorch layout (`[out, in, kh, kw]` for conv, `[out, in]` for
  linear) on the grid of `weight_format` (`denoq.formats`: integers in an int8 tensor; FP8 E4M3 or FP4 E2M1
  values in a float8_e4m3fn tensor, which holds every E2M1 value exactly) with their symmetric scales, per output
  channel (`[out]`) or blocked along the input dimension (`[out, in // block_size]`). NVFP4 (`fp4`, blocks of
  16) adds one float32 `weight_global_scale` g: its block scales are FP8 E4M3 numbers and a weight is
  `q · (s_b · g)`. Passes never re-round.
- input activation quantizer and, for the `ort-cpu` target, an output quantizer: format, bits, signedness, a
  constant zero point and a per-timestep scale table of length T = `num_train_timesteps`; or a dynamic block
  quantizer (`block_size` > 0: a scale per block of channels computed at run time from the block's amax;
  NVFP4's table then holds the per-tensor scale g of its FP8 block scales).
- SVDQuant's low-rank branch (`lowrank_down` `[r, in, kh, kw]` / `[r, in]`, `lowrank_up` `[out, r]`, float32
  values exact in float16): `y = layer(x̂; Ŵ) + up · down(x)`, read by the layer's (smoothed) float input.

Per attention module (with `attention.quantize`, keyed by the diffusers `Attention` module's name): the quantizers
of the two attention matmuls' inputs, `q` and `k` (the scaled query and transposed key of Q·Kᵀ) and `p` and `v`
(the softmax probabilities and the values of P·V), each an activation quantizer as above.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from denoq.errors import DenoqError
from denoq.formats import FORMATS, grid_max

TARGETS = ("trt", "ort-cpu")
LAYER_OPS = ("conv", "linear")
ATTENTION_ROLES = ("q", "k", "p", "v")  # inputs of Q·Kᵀ (scaled query, scaled transposed key) and of P·V


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a `bits`-bit quantizer: [-2^(b-1), 2^(b-1)-1] signed, [0, 2^b-1] unsigned."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass
class ActQuant:
    """A per-tensor activation quantizer: `q = saturate(round(x / scale[t]) + zero_point)` on the grid of `format`.

    `signed` selects int8 (range [-128, 127]; the `trt` target uses zero point 0) or uint8 ([0, 255]); `fp8` is
    E4M3 (signed, zero point 0). `scale` is a float32 table of length T indexed by the scheduler's training
    timestep.

    `block_size` B > 0 makes it a dynamic block quantizer (SVDQuant's W4A4, NVFP4): every B consecutive channels
    of one instance (a token's features, a pixel's channels) get the scale `amax / qmax` of their own values at
    run time (`int`: its table is not read and holds 1), or NVFP4's two-level scale `fp8(amax / (6 · g)) · g`
    with the global scale g = `scale[t]` (`fp4`).
    """

    bits: int
    signed: bool
    zero_point: int
    scale: torch.Tensor
    format: str = "int"
    block_size: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DenoqError(f"unknown activation format {self.format!r}; expected one of {', '.join(FORMATS)}")

    @property
    def qrange(self) -> tuple[float, float]:
        if self.format == "int":
            return qrange(self.bits, self.signed)
        return -grid_max(self.format, self.bits), grid_max(self.format, self.bits)

    @property
    def is_constant(self) -> bool:
        """True when one scale serves every timestep (no timestep groups)."""
        return bool(torch.all(self.scale == self.scale[0]))

    def meta(self) -> dict[str, Any]:
        return {"bits": self.bits, "signed": self.signed, "zero_point": self.zero_point,
                **({} if self.format == "int" else {"format": self.format}),
                **({"block_size": self.block_size} if self.block_size else {})}

    @classmethod
    def load(cls, meta: dict[str, Any], scale: torch.Tensor) -> ActQuant:
        return cls(bits=int(meta["bits"]), signed=bool(meta["signed"]), zero_point=int(meta["zero_point"]),
                   scale=scale, format=meta.get("format", "int"), block_size=int(meta.get("block_size", 0)))


@dataclass
class GroupQuant:
    """G activation quantizers of IGQ-ViT's instance-aware groups (`denoq.calibrators.igq`): group g quantizes
    the range [lo[g], hi[g]] with (scale[g], zero_point[g]); instances are assigned to it by its `width[g]`;
    all float32 [G]."""

    bits: int
    signed: bool
    lo: torch.Tensor
    hi: torch.Tensor
    width: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    FIELDS = ("lo", "hi", "width", "scale", "zero_point")

    @property
    def groups(self) -> int:
        return int(self.scale.shape[0])

    @property
    def qrange(self) -> tuple[int, int]:
        return qrange(self.bits, self.signed)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{f}": getattr(self, f).to(torch.float32).contiguous() for f in self.FIELDS}

    def meta(self) -> dict[str, Any]:
        return {"bits": self.bits, "signed": self.signed, "groups": self.groups}

    @classmethod
    def load(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str) -> GroupQuant:
        return cls(bits=int(meta["bits"]), signed=bool(meta["signed"]),
                   **{f: tensors[f"{prefix}.{f}"] for f in cls.FIELDS})


def check_scale_table(layer: str, role: str, q: ActQuant, num_timesteps: int) -> torch.Tensor:
    """The scale table of `q` as float32 [T]; DenoqError unless it has length T and is finite and positive."""
    s = q.scale.detach().to("cpu", torch.float32)
    if tuple(s.shape) != (num_timesteps,):
        raise DenoqError(f"layer {layer}: the {role} scale table has shape {tuple(s.shape)}, expected "
                         f"({num_timesteps},) = the scheduler's num_train_timesteps; recalibrate with this scheduler")
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        t = int(torch.nonzero(bad)[0])
        raise DenoqError(f"layer {layer}: {role} scale at timestep {t} is {float(s[t])!r}, scales must be finite "
                         "and positive; the plan is corrupt, recalibrate")
    return s


@dataclass(frozen=True)
class SelectorTables:
    """A layer's constant graph scales under the timestep selector (docs/architecture.md, Timestep selector; the graph
    side is `denoq.passes.selector`, the simulation `denoq.calibrators.simulate`; both use these numbers).

    `ratio`: r_t = s0 / s_in[t] (float32 [T]), None when the input scale is constant (no selector);
    `input_scale`: s0 = min_t s_in[t], so every r_t ≤ 1; `output_scale`: s_out0 = max_t(s_out[t]·r_t), the
    constant scale of the bias-free, r_t-scaled output (max_t s_out[t] without a selector).
    """

    ratio: torch.Tensor | None
    input_scale: float | None
    output_scale: float | None


def selector_tables(layer: str, inp: ActQuant | None, out: ActQuant | None, num_timesteps: int) -> SelectorTables:
    """s0, r and s_out0 of one layer (see SelectorTables), in float32 arithmetic; validates both tables."""
    s_in = None if inp is None else check_scale_table(layer, "input", inp, num_timesteps)
    s_out = None if out is None else check_scale_table(layer, "output", out, num_timesteps)
    ratio, s0 = None, None
    if s_in is not None:
        s0 = s_in.min()
        if not bool(torch.all(s_in == s0)):
            ratio = s0 / s_in
    s_out0 = None
    if s_out is not None:
        s_out0 = float(s_out.max() if ratio is None else (s_out * ratio).max())
    return SelectorTables(ratio=ratio, input_scale=None if s0 is None else float(s0), output_scale=s_out0)


@dataclass
class LayerPlan:
    """Quantization of one Conv2d / Linear layer (see module docstring for layouts)."""

    name: str
    op: str
    weight_bits: int
    weight_int: torch.Tensor
    weight_scale: torch.Tensor
    block_size: int = 0
    input: ActQuant | None = None
    output: ActQuant | None = None
    input_groups: GroupQuant | None = None  # IGQ-ViT: replaces `input`'s one scale by instance-aware groups
    input_factors: torch.Tensor | None = None  # static groups, SVDQuant's smoothing: x · factors [C_in] before
    #                                             `input` (their inverse folded into W)
    weight_format: str = "int"
    weight_global_scale: float | None = None  # NVFP4: g of the FP8 block scales
    lowrank_down: torch.Tensor | None = None  # SVDQuant: L2 [r, in, (kh, kw)]
    lowrank_up: torch.Tensor | None = None  # SVDQuant: L1 [out, r]

    def __post_init__(self) -> None:
        if self.op not in LAYER_OPS:
            raise DenoqError(f"layer {self.name}: unknown op {self.op!r}; expected one of {LAYER_OPS}")
        if self.weight_format not in FORMATS:
            raise DenoqError(f"layer {self.name}: unknown weight format {self.weight_format!r}; expected one of "
                             f"{', '.join(FORMATS)}")
        container = torch.int8 if self.weight_format == "int" else torch.float8_e4m3fn
        if self.weight_int.dtype != container:
            raise DenoqError(f"layer {self.name}: {self.weight_format} weights must be held as {container}, got "
                             f"{self.weight_int.dtype}")
        if (self.weight_global_scale is not None) != (self.weight_format == "fp4"):
            raise DenoqError(f"layer {self.name}: a weight global scale belongs to fp4 (NVFP4) weights only")
        if (self.lowrank_down is None) != (self.lowrank_up is None):
            raise DenoqError(f"layer {self.name}: the low-rank branch needs both lowrank_down and lowrank_up")
        expected = self.weight_int.shape[:1] if self.block_size == 0 else (
            self.weight_int.shape[0], self.weight_int.shape[1] // self.block_size)
        if tuple(self.weight_scale.shape) != tuple(expected):
            raise DenoqError(f"layer {self.name}: weight scale shape {tuple(self.weight_scale.shape)} does not "
                             f"match weights {tuple(self.weight_int.shape)} with block size {self.block_size}")

    @property
    def rank(self) -> int:
        """The rank of SVDQuant's low-rank branch (0: none)."""
        return 0 if self.lowrank_up is None else int(self.lowrank_up.shape[1])

    def effective_weight_scale(self) -> torch.Tensor:
        """The scales DequantizeLinear multiplies by, float32 in plan layout: `weight_scale`, or for NVFP4
        `s_b · g` (the DequantizeLinear of the FP8 block scales by g)."""
        s = self.weight_scale.to(torch.float32)
        if self.weight_global_scale is None:
            return s
        return s * torch.tensor(self.weight_global_scale, dtype=torch.float32)

    def expanded_weight_scale(self) -> torch.Tensor:
        """The weight scale of every weight element, float32, broadcastable to `weight_int` (per output channel,
        or repeated over each block of `block_size` input channels)."""
        s = self.effective_weight_scale()
        dims = self.weight_int.dim()
        if self.block_size == 0:
            return s.view(-1, *([1] * (dims - 1)))
        s = s.repeat_interleave(self.block_size, dim=1)
        return s.view(*s.shape, *([1] * (dims - 2)))

    def dequantized_weight(self) -> torch.Tensor:
        """Float weights exactly as DequantizeLinear computes them: `q · s` in float32."""
        return self.weight_int.to(torch.float32) * self.expanded_weight_scale()


@dataclass
class AttentionPlan:
    """Quantization of one attention module's two matmuls: `quants[role]` for role in ATTENTION_ROLES."""

    name: str
    quants: dict[str, ActQuant]
    p_groups: GroupQuant | None = None  # IGQ-ViT's token-wise groups of the probabilities (replaces quants["p"])
    p_log2: bool = False  # probabilities on the log2 grid 2^−q, q ∈ [0, 2^bits − 1] (replaces quants["p"])

    def __post_init__(self) -> None:
        if sorted(self.quants) != sorted(ATTENTION_ROLES):
            raise DenoqError(f"attention {self.name}: quantizers for {sorted(self.quants)}, expected "
                             f"{list(ATTENTION_ROLES)}; the plan is corrupt, recalibrate")


@dataclass
class QuantPlan:
    """All layers' quantization for one model and target profile."""

    num_train_timesteps: int
    target: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    attention: dict[str, AttentionPlan] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise DenoqError(f"unknown target {self.target!r}; use one of {', '.join(TARGETS)}")

    def add(self, layer: LayerPlan) -> None:
        for q in (layer.input, layer.output):
            if q is not None and q.scale.shape != (self.num_train_timesteps,):
                raise DenoqError(f"layer {layer.name}: activation scale table has shape {tuple(q.scale.shape)}, "
                                 f"expected ({self.num_train_timesteps},) = the scheduler's num_train_timesteps")
        self.layers[layer.name] = layer

    def add_attention(self, attn: AttentionPlan) -> None:
        for role, q in attn.quants.items():
            check_scale_table(attn.name, role, q, self.num_train_timesteps)
        self.attention[attn.name] = attn

    # -- files ---------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name in sorted(self.layers):
            lp = self.layers[name]
            out[f"{name}.weight_int"] = lp.weight_int.contiguous()
            out[f"{name}.weight_scale"] = lp.weight_scale.to(torch.float32).contiguous()
            for role, q in (("input", lp.input), ("output", lp.output)):
                if q is not None:
                    out[f"{name}.{role}_scale"] = q.scale.to(torch.float32).contiguous()
            if lp.input_groups is not None:
                out.update(lp.input_groups.tensors(f"{name}.igq"))
            if lp.input_factors is not None:
                out[f"{name}.input_factors"] = lp.input_factors.to(torch.float32).contiguous()
            if lp.lowrank_up is not None and lp.lowrank_down is not None:
                out[f"{name}.lowrank_up"] = lp.lowrank_up.to(torch.float32).contiguous()
                out[f"{name}.lowrank_down"] = lp.lowrank_down.to(torch.float32).contiguous()
        for name in sorted(self.attention):
            ap = self.attention[name]
            for role, q in sorted(ap.quants.items()):
                out[f"{name}.attn_{role}_scale"] = q.scale.to(torch.float32).contiguous()
            if ap.p_groups is not None:
                out.update(ap.p_groups.tensors(f"{name}.attn_p_igq"))
        return out

    def meta(self) -> dict[str, Any]:
        layers = {}
        for name in sorted(self.layers):
            lp = self.layers[name]
            layers[name] = {
                "op": lp.op,
                "weight_bits": lp.weight_bits,
                "block_size": lp.block_size,
                "input": lp.input.meta() if lp.input else None,
                "output": lp.output.meta() if lp.output else None,
                **({} if lp.input_groups is None else {"input_groups": lp.input_groups.meta()}),
                **({} if lp.input_factors is None else {"input_factors": True}),
                **({} if lp.weight_format == "int" else {"weight_format": lp.weight_format}),
                **({} if lp.weight_global_scale is None else {"weight_global_scale": lp.weight_global_scale}),
                **({"lowrank": lp.rank} if lp.rank else {}),
            }
        attention = {name: {role: q.meta() for role, q in sorted(self.attention[name].quants.items())}
                     | ({} if self.attention[name].p_groups is None else
                        {"p_groups": self.attention[name].p_groups.meta()})
                     | ({"p_log2": True} if self.attention[name].p_log2 else {})
                     for name in sorted(self.attention)}
        return {"num_train_timesteps": self.num_train_timesteps, "target": self.target, "layers": layers,
                "attention": attention}

    def save(self, path: Path) -> dict[str, Any]:
        """Write the tensors to `path` (safetensors) and return the manifest's `plan` section."""
        save_file(self.tensors(), str(path), metadata={"format": "denoq-plan"})
        return self.meta()

    @classmethod
    def load(cls, path: Path, meta: dict[str, Any]) -> QuantPlan:
        """Read a plan from its safetensors file and manifest section."""
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise DenoqError(f"cannot read quantization plan {path}: {exc}; recompile the artifact") from exc
        plan = cls(num_train_timesteps=int(meta["num_train_timesteps"]), target=meta["target"])
        for name, lm in sorted(meta["layers"].items()):
            try:
                acts = {role: None if lm[role] is None else ActQuant.load(lm[role], tensors[f"{name}.{role}_scale"])
                        for role in ("input", "output")}
                lowrank = ((tensors[f"{name}.lowrank_down"], tensors[f"{name}.lowrank_up"]) if lm.get("lowrank")
                           else (None, None))
                groups = None if "input_groups" not in lm else GroupQuant.load(lm["input_groups"], tensors,
                                                                                 f"{name}.igq")
                plan.add(LayerPlan(name=name, op=lm["op"], weight_bits=lm["weight_bits"],
                                   weight_int=tensors[f"{name}.weight_int"],
                                   weight_scale=tensors[f"{name}.weight_scale"], block_size=lm["block_size"],
                                   input=acts["input"], output=acts["output"], input_groups=groups,
                                   input_factors=tensors[f"{name}.input_factors"] if lm.get("input_factors")
                                   else None, weight_format=lm.get("weight_format", "int"),
                                   weight_global_scale=lm.get("weight_global_scale"),
                                   lowrank_down=lowrank[0], lowrank_up=lowrank[1]))
            except KeyError as exc:
                raise DenoqError(f"quantization plan {path} lacks tensor {exc} of layer {name}; "
                                 "recompile the artifact") from exc
        for name, roles in sorted(meta.get("attention", {}).items()):
            try:
                p_groups = None if "p_groups" not in roles else GroupQuant.load(roles["p_groups"], tensors,
                                                                                 f"{name}.attn_p_igq")
                plan.add_attention(AttentionPlan(name, {
                    role: ActQuant.load(qm, tensors[f"{name}.attn_{role}_scale"])
                    for role, qm in roles.items() if role in ATTENTION_ROLES}, p_groups, bool(roles.get("p_log2"))))
            except KeyError as exc:
                raise DenoqError(f"quantization plan {path} lacks tensor {exc} of attention {name}; "
                                 "recompile the artifact") from exc
        return plan

