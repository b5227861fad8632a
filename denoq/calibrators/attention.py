"""Quantized attention matmuls (`attention.quantize`): Q·Kᵀ and P·V with quantized inputs, in the graph's op order.

diffusers' attention calls `F.scaled_dot_product_attention`, which the ONNX exporter decomposes as

    S = (Q · √s) · (Kᵀ · √s),   P = softmax(S),   O = P · V        (s = 1/√d, d the head dimension)

(`denoq.export` records the two MatMuls and the Softmax of every attention module). With attention quantization
the Q/DQ graph quantizes the four matmul inputs, `q` = Q·√s, `k` = Kᵀ·√s, `p` = P and `v` = V, each per tensor
with a constant scale (TensorRT's fused INT8 attention takes constant scales; its fused kernels stop at sequence
length 512, where keeping attention in FP16, the default, is the choice). `p` lies in [0, 1]: it is quantized with
its own unsigned range (uint8 on the `ort-cpu` target; the non-negative half of int8 on `trt`, whose activations
are symmetric int8), or, with `attention.softmax_grid=log2`, on the log2 grid 2^−q (`fake_quant_log2`; float ops
in the graph, ONNX Runtime only: TensorRT has no such quantizer).

`QuantAttnProcessor` computes attention exactly in that order, with a hook `quant(role, x)` on each matmul input:
the identity plus a recorder during calibration, fake quantization in the simulation. It supports the
self- and cross-attention of diffusers' UNets and DiTs (group norm, 4-D inputs, residual connection, output
rescale); spatial norm, q/k norms and attention masks are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from denoq.calibrators.calibset import CalibrationSet
from denoq.calibrators.distributed import RowLayout
from denoq.calibrators.igq import row_groups
from denoq.calibrators.observers import ObserverSettings, observe_qparams, qparams
from denoq.calibrators.stats import TensorStats, reduce_stats
from denoq.errors import DenoqError
from denoq.layers import attention_modules
from denoq.plan import ATTENTION_ROLES, ActQuant, AttentionPlan

Quant = Callable[[str, torch.Tensor], torch.Tensor]
LN2 = torch.tensor(math.log(2.0), dtype=torch.float32)  # the graph's float32 constant


def explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, quant: Quant) -> torch.Tensor:
    """Scaled dot-product attention `[B, H, L, d]` in the exported graph's op order, `quant` on the matmul inputs."""
    root = math.sqrt(1.0 / math.sqrt(query.shape[-1]))
    scores = quant("q", query * root) @ quant("k", key.transpose(-2, -1) * root)
    return quant("p", scores.softmax(dim=-1)) @ quant("v", value)


class QuantAttnProcessor:
    """A diffusers attention processor computing `explicit_attention` with the hook `quant` (module docstring)."""

    def __init__(self, name: str, quant: Quant) -> None:
        self.name = name
        self.quant = quant

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: object) -> torch.Tensor:
        if attention_mask is not None:
            raise DenoqError(f"attention {self.name}: attention masks are not supported with attention.quantize; "
                             "set attention.quantize=false")
        residual = hidden_states
        four_d = hidden_states.dim() == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        batch, head_dim = hidden_states.shape[0], key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        out = explicit_attention(heads(query), heads(key), heads(value), self.quant)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SwitchedAttnProcessor(QuantAttnProcessor):
    """The QuantAttnProcessor while `quantized()` holds, the module's own processor `fp` otherwise (a model shared
    by its FP and quantized twins, `denoq.calibrators.simulate.simulated_in_place`)."""

    def __init__(self, name: str, quant: Quant, fp: Callable, quantized: Callable[[], bool]) -> None:
        super().__init__(name, quant)
        self.fp = fp
        self.quantized = quantized

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: object) -> torch.Tensor:
        if self.quantized():
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        given = {} if temb is None else {"temb": temb}  # as diffusers' Attention.forward calls a processor
        return self.fp(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                       attention_mask=attention_mask, **given, **kwargs)


def fake_quant_log2(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Probabilities on the log2 grid: p̂ = 2^−q with q = clip(round(−ln p / ln 2), 0, 2^bits − 1), in the graph's op
    order (Log, Div, Neg, Round, Clip, Neg, Pow). Small probabilities keep their relative precision (a uniform
    8-bit grid on [0, 1] rounds every p < 1/510 to 0); p = 0 maps to 2^−(2^bits − 1) (0 in float32 at 8 bits)."""
    q = torch.clamp(torch.round(-(torch.log(p) / LN2)), 0, 2**bits - 1)
    return torch.pow(2.0, -q)


def check_supported(name: str, attn: nn.Module) -> None:
    """Refuse attention modules `QuantAttnProcessor` does not compute (spatial norm, q/k norms)."""
    for part in ("spatial_norm", "norm_q", "norm_k"):
        if getattr(attn, part, None) is not None:
            raise DenoqError(f"attention {name} has a {part}; attention.quantize supports attention without it, set "
                             "attention.quantize=false")


def install(modules: dict[str, nn.Module], make_quant: Callable[[str], Quant]) -> None:
    """Give every attention module of `modules` a QuantAttnProcessor with the hook `make_quant(name)`."""
    for name, attn in modules.items():
        check_supported(name, attn)
        attn.set_processor(QuantAttnProcessor(name, make_quant(name)))


def collect_attention_stats(model: nn.Module, forward: Callable, calib: CalibrationSet, *, batch_size: int = 64,
                            seed: int = 0) -> dict[str, dict[str, TensorStats]]:
    """Statistics of the four matmul inputs of every attention module of `model` over the calibration set (the FP
    model computes with the explicit attention while it is observed, and gets its processors back after)."""
    modules = attention_modules(model)
    saved = {name: m.processor for name, m in modules.items()}
    stats = {name: {role: TensorStats() for role in (*ATTENTION_ROLES, "p_rows")} for name in modules}
    generator = torch.Generator().manual_seed(seed)
    current_t = [0]
    layout: list[RowLayout | None] = [None]

    def recorder(name: str) -> Quant:
        def record(role: str, x: torch.Tensor) -> torch.Tensor:
            stats[name][role].observe(x, current_t[0], generator, f"{name} ({role})", layout[0])
            if role == "p":  # each query row's largest probability: what token-wise groups are assigned by
                stats[name]["p_rows"].observe(x.amax(dim=-1), current_t[0], generator, f"{name} (p rows)",
                                              layout[0])
            return x

        return record

    install(modules, recorder)
    try:
        with torch.no_grad():
            for (x, t, cond), layout[0] in zip(calib.progress_batches(batch_size, "attention statistics"),
                                               calib.layouts(batch_size), strict=True):
                current_t[0] = t[0].item()  # the sampler's timestep: int, or float (flow)
                forward(x, t, cond)
    finally:
        for name, m in modules.items():
            m.set_processor(saved[name])
    reduce_stats([st for roles in stats.values() for st in roles.values()])
    return stats


def attention_plans(stats: dict[str, dict[str, TensorStats]], observer: ObserverSettings,
                    num_train_timesteps: int, row_groups_count: int = 0, log2: bool = False) -> list[AttentionPlan]:
    """Constant per-tensor quantizers of every attention module's matmul inputs from their statistics (q, k, v:
    the recipe's observer). `p` (the probabilities) on [0, max observed P], never clipped: an observer that
    minimizes the mean error clips the rare large probabilities, which are the ones attention is made of. Its zero
    point is 0: uint8 when the target's activations are unsigned, else the non-negative half of int8 (TensorRT).
    `row_groups_count` > 0 adds IGQ-ViT's token-wise groups of `p`, fitted on the rows' maxima; `log2` puts `p`
    on the log2 grid instead (`fake_quant_log2`; the two exclude each other)."""
    if log2 and row_groups_count > 0:
        raise DenoqError("attention.softmax_grid=log2 and activations.igq_groups both replace the softmax's "
                         "quantizer; choose one (attention.softmax_grid=uniform keeps the token-wise groups)")
    plans = []
    for name in sorted(stats):
        quants = {}
        for role in ATTENTION_ROLES:
            values, amin, amax = stats[name][role].pooled()
            if role == "p":  # [0, max P]: never negative, and the few large probabilities carry the attention
                scale, zp = qparams(0.0, amax, observer.bits, observer.signed, observer.format)
            else:
                scale, zp = observe_qparams(values, amin, amax, observer)
            quants[role] = ActQuant(bits=observer.bits, signed=observer.signed, zero_point=zp,
                                    scale=torch.full((num_train_timesteps,), scale, dtype=torch.float32),
                                    format=observer.format)
        groups = None
        if row_groups_count > 0:
            groups = row_groups(stats[name]["p_rows"].pooled()[0], row_groups_count, observer.bits, observer.signed)
        plans.append(AttentionPlan(name, quants, groups, log2))
    return plans
