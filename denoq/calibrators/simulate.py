"""The PyTorch simulation of the Q/DQ graph: model + QuantPlan → quantized nn.Module (docs/architecture.md, Quantizer
semantics).

Each planned Conv2d / Linear is replaced by a layer that computes, in the graph's own op order,

    x̂ = DQ(Q(x; s_in[t], z_in))            (true division by the scale, round half to even, saturation)
    y  = conv/linear(x̂, q_w · s_w, bias)     (the plan's integers; never re-rounded)
    ŷ = DQ(Q(y; s_out[t], z_out))          (ort-cpu target only, where the plan quantizes the output)

with the scale gathered per sample from the layer's table of length T by the sample's own timestep, so a batch may
mix timesteps. Layer by layer this agrees with ONNX Runtime and `onnx.reference` to float rounding.

A layer whose input table varies with the timestep (timestep groups, ADP-DM arXiv 2305.18723) is computed as the
graph's timestep selector computes it (docs/architecture.md, Timestep selector; `denoq.passes.selector` defines the
tables): with `s0 = min_t s_in[t]`, `r_t = s0 / s_in[t] ≤ 1` (float32, gathered per sample, shaped to broadcast),

    x̂ = DQ(Q(x · r_t; s0, z_in))           (float32 multiply first, then the division by the constant s0)
    u  = conv/linear(x̂, q_w · s_w)          (no bias)
    u  = DQ(Q(u; s_out0, z_out))            (ort-cpu: the output quantizer reads the bias-free, r_t-scaled value)
    y  = u / r_t + bias

with `s_out0 = max_t(s_out[t] · r_t)`. A non-constant output table on a layer without an input selector uses the
constant `max_t s_out[t]`, as the graph does. Constant tables take the first path unchanged.

A layer with IGQ-ViT groups (`LayerPlan.input_groups`) quantizes its token input with each instance's assigned
group quantizers instead of its one scale (`denoq.calibrators.igq.fake_quant_groups`). Planned attention modules
(`plan.attention`) compute their attention as the graph does (`denoq.calibrators.attention.QuantAttnProcessor`)
with the four matmul inputs fake-quantized; the probabilities by token-wise groups where the plan has them
(`fake_quant_rows`). Static groups (`LayerPlan.input_factors`) multiply the input by constant per-channel factors
before its quantizer, as the graph's Mul does (their inverse is folded into the plan's weights).

`simulate(model, plan)` computes on a copy of the model. `simulated_in_place(model, plan)` shares the model's own
modules instead (a calibrator that runs the FP model and its quantized twin side by side, PTQD's, holds one copy):
while the block runs, each planned layer's `forward` and each planned attention's processor compute the quantized
layer when the twin calls them and the FP layer otherwise. The twin's layers dequantize the plan's weights at each
call instead of holding them (a call's share of the work is small: one multiply per weight against a forward pass
over the batch), so the twin's memory is the plan's own, and on a model offloaded by `denoq.calibrators.offload`
only the unit in use holds its FP weights.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from denoq.calibrators.attention import SwitchedAttnProcessor, fake_quant_log2, install
from denoq.calibrators.igq import fake_quant_groups, fake_quant_rows
from denoq.calibrators.offload import by_unit, resident
from denoq.calibrators.quantizer import fake_quant_act
from denoq.errors import DenoqError
from denoq.plan import ActQuant, AttentionPlan, LayerPlan, QuantPlan, selector_tables
from denoq.sampling.cond import timestep_index


class TimestepClock:
    """The per-sample table rows `[B]` (int64 `timestep_index`) of the forward pass in flight, shared by all
    simulated layers."""

    def __init__(self) -> None:
        self.t: torch.Tensor | None = None


def fake_quant_at(x: torch.Tensor, q: ActQuant, t: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """`x` fake-quantized by `q` with each sample's scale `q.scale[t]` (a block quantizer: blocks along the channel
    `axis`)."""
    scale = q.scale.to(x.device)[t]
    return fake_quant_act(x, q, scale if q.block_size else scale.view(-1, *([1] * (x.dim() - 1))), axis)


class SimulatedLayer(nn.Module):
    """A Conv2d or Linear computed from the plan's integer weights with fake-quantized activations; its bias is the
    source module's (read at each call: an offloaded module gets a new one at each load). `weight` holds the
    dequantized weight, or is None where the layer dequantizes at each call."""

    def __init__(self, module: nn.Module, plan: LayerPlan, clock: TimestepClock,
                 num_timesteps: int | None = None) -> None:
        super().__init__()
        self.source = module
        self.plan = plan
        self.clock = clock
        self.register_buffer("weight", plan.dequantized_weight().to(module.weight.device))
        # timestep selector (module docstring): only for a non-constant table, so constant plans keep today's path
        self.ratio: torch.Tensor | None = None
        self.s0: float | None = None
        self.s_out0: float | None = None
        if num_timesteps is not None:  # every table: length T, finite, positive
            selector_tables(plan.name, plan.input, plan.output, num_timesteps)
        self.selected = any(q is not None and not q.is_constant for q in (plan.input, plan.output))
        if self.selected and (plan.input_groups is not None or plan.input_factors is not None or plan.rank):
            raise DenoqError(f"layer {plan.name}: IGQ groups or SVDQuant and timestep groups on one input are not "
                             "supported; set activations.timestep_groups=1 (or activations.igq_groups=0, "
                             "svdquant.rank=0)")
        self.lowrank = None if plan.lowrank_down is None or plan.lowrank_up is None else (
            plan.lowrank_down.to(module.weight.device), plan.lowrank_up.to(module.weight.device))
        self.axis = 1 if isinstance(module, nn.Conv2d) else -1
        if self.selected:
            T = num_timesteps if num_timesteps is not None else next(
                q.scale.shape[0] for q in (plan.input, plan.output) if q is not None)
            tables = selector_tables(plan.name, plan.input, plan.output, T)
            self.s0, self.s_out0 = tables.input_scale, tables.output_scale
            self.ratio = None if tables.ratio is None else tables.ratio.to(module.weight.device)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.source.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.clock.t
        if t is None or t.shape[0] != x.shape[0]:
            raise DenoqError(f"simulated layer {self.plan.name} got a batch of {x.shape[0]} but timesteps "
                             f"{None if t is None else tuple(t.shape)}; call the SimulatedModel, not its layers")
        if self.selected:
            return self._forward_selected(x, t)
        if self.plan.input_factors is not None:  # static groups, smoothing: the graph's constant Mul before Q
            f = self.plan.input_factors.to(x.device)
            x = x * (f.view(-1, 1, 1) if isinstance(self.source, nn.Conv2d) else f)
        smoothed = x
        if self.plan.input_groups is not None:
            x = fake_quant_groups(x, self.plan.input_groups)
        elif self.plan.input is not None:
            x = fake_quant_at(x, self.plan.input, t, self.axis)
        y = self._layer(x, self.bias)
        if self.plan.output is not None:
            y = fake_quant_at(y, self.plan.output, t, self.axis)
        if self.lowrank is not None:  # SVDQuant: the branch on the float (smoothed) input, added to the output
            down, up = self.lowrank
            h = self._layer(smoothed, None, down)
            y = y + (F.conv2d(h, up[:, :, None, None]) if isinstance(self.source, nn.Conv2d) else F.linear(h, up))
        return y

    def _layer(self, x: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor | None = None
               ) -> torch.Tensor:
        """The Conv2d / Linear with `weight` (default: the plan's dequantized weight)."""
        w = weight if weight is not None else (
            self.weight if self.weight is not None else self.plan.dequantized_weight().to(x.device))
        if isinstance(self.source, nn.Conv2d):
            m = self.source
            return F.conv2d(x, w, bias, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, w, bias)

    def _forward_selected(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The graph's op order: Mul(r_t) → Q/DQ(s0) → layer without bias → [Q/DQ(s_out0)] → Div(r_t) → Add(bias)."""
        r = None if self.ratio is None else self.ratio[t].view(-1, *([1] * (x.dim() - 1)))
        if self.plan.input is not None:
            s0 = torch.tensor(self.s0, dtype=torch.float32, device=x.device)
            x = fake_quant_act(x if r is None else x * r, self.plan.input, s0)
        y = self._layer(x, self.bias if r is None else None)
        if self.plan.output is not None:
            s_out0 = torch.tensor(self.s_out0, dtype=torch.float32, device=x.device)
            y = fake_quant_act(y, self.plan.output, s_out0)
        if r is None:
            return y
        y = y / r
        if self.bias is not None:
            y = y + (self.bias.view(-1, 1, 1) if isinstance(self.source, nn.Conv2d) else self.bias)
        return y


class SimulatedModel(nn.Module):
    """The quantized model with the FP model's calling convention, returning `out_sample` itself (an eps
    backend through `denoq.sampling.module_eps`)."""

    def __init__(self, model: nn.Module, plan: QuantPlan, layer: type[SimulatedLayer] = SimulatedLayer,
                 share: bool = False) -> None:
        """`layer` is the class of the simulated layers (a subclass changes how a layer quantizes, e.g. the
        differentiable timestep-group search of `timegroups.py`). `share`: compute on `model`'s own modules
        (`simulated_in_place`, which undoes it) instead of a copy."""
        super().__init__()
        self.model = model if share else copy.deepcopy(model).eval()
        self.in_place = share
        self.clock = TimestepClock()
        self.num_train_timesteps = plan.num_train_timesteps
        self.modules_by_name = dict(self.model.named_modules())
        self.shared: dict[str, SimulatedLayer] = {}         # shared: each switched module's simulated layer
        self._patched: dict[str, nn.Module] = {}           # shared: modules whose forward is switched
        self._processors: list[tuple[nn.Module, Any]] = []  # shared: attention modules and their own processors
        missing = sorted(set(plan.layers) - set(self.modules_by_name)) + sorted(
            set(plan.attention) - set(self.modules_by_name))
        if missing:
            raise DenoqError(f"the plan's module {missing[0]} is not a module of this model; the plan belongs to "
                             "another model (recompile)")
        try:
            self.place(sorted(plan.layers), lambda name, module: layer(
                module, plan.layers[name], self.clock, plan.num_train_timesteps))
            self._install_attention(plan)
        except BaseException:
            self.restore()
            raise

    def place(self, names: list[str], make: Callable[[str, nn.Module], SimulatedLayer]) -> None:
        """Put `make(name, module)` in place of each layer of `names`, each built while its unit is loaded (an
        offloaded model): in the copy, or as the switched layer of the shared model (which then dequantizes at
        each call); a shared layer placed again is replaced."""
        for group in by_unit(self.model, names):
            with resident(self.model, group):
                for name in group:
                    module = self.modules_by_name[name]
                    sim = make(name, module)
                    if not self.in_place:
                        parent_name, _, child = name.rpartition(".")
                        setattr(self.modules_by_name[parent_name] if parent_name else self.model, child, sim)
                        continue
                    sim.weight = None
                    if name not in self._patched:
                        module.forward = self._switch(name, module.forward)
                        self._patched[name] = module
                    self.shared[name] = sim

    def _install_attention(self, plan: QuantPlan) -> None:
        """The plan's attention processors: in the copy, or switched in the shared model."""
        attention = {name: self.modules_by_name[name] for name in sorted(plan.attention)}
        if not self.in_place:
            install(attention, lambda name: self._attention_quant(plan.attention[name]))
            return
        for name, m in attention.items():
            self._processors.append((m, m.processor))
            m.set_processor(SwitchedAttnProcessor(name, self._attention_quant(plan.attention[name]), m.processor,
                                                  lambda: self.clock.t is not None))

    def _switch(self, name: str, fp: Any) -> Any:
        """A shared module's forward: its simulated layer's while the twin runs and it has one, its own `fp`
        otherwise."""
        def forward(x: torch.Tensor) -> torch.Tensor:
            sim = self.shared.get(name)
            return sim(x) if sim is not None and self.clock.t is not None else fp(x)

        return forward

    def restore(self) -> None:
        """Give a shared model its own forwards and attention processors back."""
        for module in self._patched.values():
            del module.forward
        for module, processor in self._processors:
            module.set_processor(processor)
        self._patched.clear()
        self._processors.clear()
        self.shared.clear()

    def _attention_quant(self, ap: AttentionPlan):
        """The fake-quantization hook of one attention module's matmul inputs (constant scales)."""
        def quant(role: str, x: torch.Tensor) -> torch.Tensor:
            if role == "p" and ap.p_log2:
                return fake_quant_log2(x, ap.quants["p"].bits)
            if role == "p" and ap.p_groups is not None:
                return fake_quant_rows(x, ap.p_groups)
            return fake_quant_at(x, ap.quants[role], self.clock.t)

        return quant

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, *args: Any, **kwargs: Any
                ) -> torch.Tensor:
        """The model called exactly as given (`denoq.sampling.cond.call_denoiser`), every table read at the
        timestep's row `timestep_index` (the nearest training timestep)."""
        t = timestep_index(torch.as_tensor(timestep).reshape(-1), self.num_train_timesteps)
        self.clock.t = t.expand(sample.shape[0]) if t.numel() == 1 else t
        try:
            if args:  # `model(sample, t, cond)`
                return self.model(sample, timestep, *args, **kwargs).sample
            return self.model(sample, timestep=timestep, **kwargs).sample  # a transformer's t is not its 2nd argument
        finally:
            self.clock.t = None


def simulate(model: nn.Module, plan: QuantPlan) -> SimulatedModel:
    """The quantized twin of `model` under `plan` (the FP model is left untouched)."""
    return SimulatedModel(model, plan)


@contextlib.contextmanager
def simulated_in_place(model: nn.Module, plan: QuantPlan) -> Iterator[SimulatedModel]:
    """The quantized twin of `model` under `plan` on `model`'s own modules, for the block (module docstring):
    calls of the twin compute the quantized model, every other call of `model` the FP one, exactly as before."""
    twin = SimulatedModel(model, plan, share=True)
    try:
        yield twin
    finally:
        twin.restore()
