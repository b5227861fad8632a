"""Test helpers for the Q/DQ passes and the ORT engine: tiny FP ONNX models, plans, and the three executors.

`export_fp` stands in for denoq.export (written separately): dynamo export at opset 21, every Conv/Gemm/MatMul
weight renamed to `<module>.weight`, and the `denoq.layer_map` metadata the passes read.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import functools
import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx.reference import ReferenceEvaluator

from denoq.calibrators.quantizer import fake_quantize, symmetric_weight_quant
from denoq.engines.ort import disabled_optimizers, session_options
from denoq.layermap import LAYER_MAP_KEY
from denoq.plan import ActQuant, LayerPlan, QuantPlan

T = 10  # num_train_timesteps of the test plans


# -- models --------------------------------------------------------------------------------------------------

class Single(torch.nn.Module):
    """One layer, `sample` in, `out_sample` out."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.layer(sample)


class Attn(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.to_q = torch.nn.Linear(c, c)
        self.to_k = torch.nn.Linear(c, c, bias=False)
        self.to_v = torch.nn.Linear(c, c)


class Tiny(torch.nn.Module):
    """Seven layers covering the cases the passes must handle.

    conv_in → SiLU → conv_mid, whose output feeds both a residual Add and conv_out directly; attention-like
    projections to_q / to_k (no bias) / to_v read one tensor `[B, L, C]` (Linear → MatMul (+ Add)); a Gemm head.
    Outputs: `out_sample` (conv_out's output is a graph output) and `head` (the Gemm's output).
    """

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(2, c, 3, padding=1)
        self.conv_mid = torch.nn.Conv2d(c, c, 3, padding=1)
        self.attn = Attn(c)
        self.head = torch.nn.Linear(c, 3)
        self.conv_out = torch.nn.Conv2d(c, 2, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv_in(sample)
        m = self.conv_mid(torch.nn.functional.silu(h))
        h = h + m
        b, c, hh, ww = h.shape
        seq = h.flatten(2).transpose(1, 2)
        a = self.attn.to_q(seq) * self.attn.to_k(seq) + self.attn.to_v(seq)
        h = h + a.transpose(1, 2).reshape(b, c, hh, ww)
        return self.conv_out(m), self.head(h.mean((2, 3)))


class ConvStack(torch.nn.Module):
    """Three convolutions with a SiLU between the first two: the fusion report's test graph."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, c, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(c, 3, 1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(torch.nn.functional.silu(self.conv1(sample))))


def dyadic_biases(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Set every Conv2d / Linear bias to multiples of 2^-4 in [-1, 1] (exact in every executor); returns module."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randint(-16, 17, m.bias.shape, generator=gen).float() * 2.0**-4)
    return module


SINGLE_SHAPES = {"conv": (2, 4, 6, 6), "gemm": (4, 16), "matmul": (2, 5, 16)}


@functools.lru_cache
def single(kind: str) -> tuple[torch.nn.Module, onnx.ModelProto]:
    """A one-layer model (`layer`) exported once per test session: Conv2d(4→6, 3×3), Linear(16→8) on [B, C]
    (Gemm, transB=1) or on [B, L, C] (MatMul with an [in, out] weight + Add). Do not mutate the results."""
    torch.manual_seed(1)
    layer = torch.nn.Conv2d(4, 6, 3, padding=1) if kind == "conv" else torch.nn.Linear(16, 8)
    module = dyadic_biases(Single(layer)).eval()
    fp = export_fp(module, (torch.zeros(SINGLE_SHAPES[kind]),), ["sample"])
    return module, fp


@functools.lru_cache
def tiny() -> tuple[torch.nn.Module, onnx.ModelProto]:
    """Tiny exported once per test session, inputs `sample` [2, 2, 4, 4] and `timestep` [2]."""
    torch.manual_seed(2)
    module = dyadic_biases(Tiny()).eval()
    fp = export_fp(module, (torch.zeros(2, 2, 4, 4), torch.zeros(2, dtype=torch.int64)), ["sample", "timestep"],
                   ["out_sample", "head"])
    return module, fp


@functools.lru_cache
def conv_stack() -> tuple[torch.nn.Module, onnx.ModelProto]:
    torch.manual_seed(3)
    module = ConvStack().eval()
    fp = export_fp(module, (torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.int64)), ["sample", "timestep"])
    return module, fp


def export_fp(module: torch.nn.Module, args: tuple, input_names: list[str],
              output_names: list[str] | None = None) -> onnx.ModelProto:
    """Dynamo export (opset 21) plus the layer map and `<module>.weight` initializer names."""
    module = module.eval()
    with contextlib.redirect_stdout(io.StringIO()):
        proto = torch.onnx.export(module, args, dynamo=True, opset_version=21, input_names=input_names,
                                  output_names=output_names or ["out_sample"], verbose=False).model_proto
    layers = {n for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)}
    inits = {i.name: i for i in proto.graph.initializer}
    lmap = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
        name = scopes[-2]
        if name not in layers:
            continue
        weight = f"{name}.weight"
        old = node.input[1]
        inits[old].name = weight
        node.input[1] = weight
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b)
        lmap[name] = {"node": node.name, "op_type": node.op_type, "weight": weight,
                      "weight_axis": 1 if transposed else 0, "transposed": transposed}
    assert set(lmap) == layers, (set(lmap), layers)
    proto.metadata_props.add(key=LAYER_MAP_KEY, value=json.dumps(lmap))
    return proto


# -- plans ---------------------------------------------------------------------------------------------------

def act_quant(lo: float, hi: float, signed: bool, pow2: bool = False) -> ActQuant:
    """Constant-table activation quantizer over [lo, hi]; `pow2` rounds the scale to a power of two."""
    if signed:
        scale, zp = max(abs(lo), abs(hi)) / 127, 0
    else:
        scale = (hi - lo) / 255
    if pow2:
        scale = 2.0 ** round(np.log2(scale))
    if not signed:
        zp = int(np.clip(round(-lo / scale), 0, 255))
    return ActQuant(bits=8, signed=signed, zero_point=zp, scale=torch.full((T,), scale, dtype=torch.float32))


def layer_ranges(module: torch.nn.Module, *args: torch.Tensor) -> dict[str, tuple[float, float, float, float]]:
    """(input min, input max, output min, output max) of every Conv2d / Linear on an FP forward."""
    stats: dict[str, tuple[float, float, float, float]] = {}
    hooks = []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            def hook(mod, inp, out, name=name):
                stats[name] = (inp[0].min().item(), inp[0].max().item(), out.min().item(), out.max().item())
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        module(*args)
    for h in hooks:
        h.remove()
    return stats


def make_plan(module: torch.nn.Module, args: tuple, target: str, *, shrink: float = 0.7, perturb: bool = True,
              seed: int = 0) -> QuantPlan:
    """RTN weights (a few integers moved by ±1, as GPTQ would) and min/max activation scales shrunk by `shrink`
    so that some values saturate; outputs quantized for `ort-cpu` only."""
    gen = torch.Generator().manual_seed(seed)
    plan = QuantPlan(num_train_timesteps=T, target=target)
    signed = target == "trt"
    for name, (ilo, ihi, olo, ohi) in layer_ranges(module, *args).items():
        m = module.get_submodule(name)
        q, s = symmetric_weight_quant(m.weight, 8)
        if perturb:
            flip = torch.rand(q.shape, generator=gen) < 0.2
            step = torch.where(q > 0, -1, 1).to(torch.int8)
            q = torch.where(flip, q + step, q)
        plan.add(LayerPlan(name=name, op="conv" if isinstance(m, torch.nn.Conv2d) else "linear", weight_bits=8,
                           weight_int=q, weight_scale=s,
                           input=act_quant(ilo * shrink, ihi * shrink, signed),
                           output=None if signed else act_quant(olo * shrink, ohi * shrink, signed)))
    return plan


def dyadic_plan(module: torch.nn.Module, target: str, *, coarse: bool = False, seed: int = 0,
                act_scale: float = 2.0**-3, out_scale: float = 2.0**-2) -> QuantPlan:
    """A plan whose every number is a power of two or a small integer: with `dyadic_biases` and inputs on a
    2^-4 grid, every executor computes every value exactly (all partial sums are representable in float32).

    Weight scales alternate 2^-6 / 2^-7 across output channels (a wrong axis shows). `coarse` draws the weights
    from 64·{-1, 0, 1}, which puts many pre-quantization outputs exactly on rounding ties. Activation zero points
    are 0 (`trt`) or 128 (`ort-cpu`); outputs are quantized for `ort-cpu` only.
    """
    gen = torch.Generator().manual_seed(seed)
    plan = QuantPlan(num_train_timesteps=T, target=target)
    signed = target == "trt"
    zp = 0 if signed else 128

    def aq(scale: float) -> ActQuant:
        return ActQuant(bits=8, signed=signed, zero_point=zp, scale=torch.full((T,), scale, dtype=torch.float32))

    for name, m in sorted(module.named_modules()):
        if not isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            continue
        shape = m.weight.shape
        q = 64 * torch.randint(-1, 2, shape, generator=gen) if coarse else torch.randint(-127, 128, shape,
                                                                                          generator=gen)
        s = torch.tensor([2.0**-6 if c % 2 == 0 else 2.0**-7 for c in range(shape[0])], dtype=torch.float32)
        plan.add(LayerPlan(name=name, op="conv" if isinstance(m, torch.nn.Conv2d) else "linear", weight_bits=8,
                           weight_int=q.to(torch.int8), weight_scale=s, input=aq(act_scale),
                           output=None if signed else aq(out_scale)))
    return plan


def without_outputs(plan: QuantPlan) -> QuantPlan:
    """The same plan with no output quantizers: the reference's pre-quantization values."""
    out = QuantPlan(num_train_timesteps=plan.num_train_timesteps, target=plan.target)
    for lp in plan.layers.values():
        out.add(dataclasses.replace(lp, output=None))
    return out


# -- executors -----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def simulated(module: torch.nn.Module, plan: QuantPlan):
    """A copy of `module` computing what the Q/DQ graph computes: plan weights (`dequantized_weight`), input
    fake-quantized before and output fake-quantized after every planned layer (quantizer.fake_quantize)."""
    sim = copy.deepcopy(module).eval()
    for name, lp in plan.layers.items():
        m = sim.get_submodule(name)
        with torch.no_grad():
            m.weight.copy_(lp.dequantized_weight())

        def fq(x: torch.Tensor, q: ActQuant) -> torch.Tensor:
            lo, hi = q.qrange
            return fake_quantize(x, q.scale[0], q.zero_point, lo, hi)

        if lp.input is not None:
            m.register_forward_pre_hook(lambda mod, inp, q=lp.input: (fq(inp[0], q), *inp[1:]))
        if lp.output is not None:
            m.register_forward_hook(lambda mod, inp, out, q=lp.output: fq(out, q))
    yield sim


def run_torch(module: torch.nn.Module, plan: QuantPlan, *args: torch.Tensor) -> list[np.ndarray]:
    with simulated(module, plan) as sim, torch.no_grad():
        out = sim(*args)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], level: str = "all",
            config: dict[str, str] | None = None) -> list[np.ndarray]:
    """ONNX Runtime CPU, one thread; `all` optimizations (QDQ → integer kernels) or `disable`; the engine's
    workarounds (`disabled_optimizers`) and extra session `config` entries."""
    so = session_options(threads=1, level=level)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled_optimizers(model))
    return sess.run(None, feeds)


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ReferenceEvaluator(model).run(None, feeds)


# -- timestep selectors ----------------------------------------------------------------------------------------

class SingleT(torch.nn.Module):
    """One layer with the graph's `timestep` input (unused by the FP model, read by timestep selectors)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.layer(sample)


@functools.lru_cache
def single_t(kind: str) -> tuple[torch.nn.Module, onnx.ModelProto]:
    """`single(kind)` with a `timestep` [B] int64 input. Do not mutate the results."""
    torch.manual_seed(1)
    layer = torch.nn.Conv2d(4, 6, 3, padding=1) if kind == "conv" else torch.nn.Linear(16, 8)
    module = dyadic_biases(SingleT(layer)).eval()
    shape = SINGLE_SHAPES[kind]
    fp = export_fp(module, (torch.zeros(shape), torch.zeros(shape[0], dtype=torch.int64)), ["sample", "timestep"])
    return module, fp


def grouped(plan: QuantPlan, num_timesteps: int, in_factors: list[float],
            out_factors: list[float] | None = None) -> QuantPlan:
    """`plan` with T = `num_timesteps` and piecewise-constant tables over len(in_factors) equal timestep groups:
    group g scales the (constant) input scale by `in_factors[g]` and the output scale by `out_factors[g]`."""
    def table(s: float, factors: list[float]) -> torch.Tensor:
        g = torch.arange(num_timesteps) * len(factors) // num_timesteps
        return (s * torch.tensor(factors, dtype=torch.float32)[g]).to(torch.float32)

    out = QuantPlan(num_train_timesteps=num_timesteps, target=plan.target)
    for lp in plan.layers.values():
        inp = None if lp.input is None else dataclasses.replace(
            lp.input, scale=table(float(lp.input.scale[0]), in_factors))
        o = None if lp.output is None else dataclasses.replace(
            lp.output, scale=table(float(lp.output.scale[0]), out_factors or [1.0] * len(in_factors)))
        out.add(dataclasses.replace(lp, input=inp, output=o))
    return out
