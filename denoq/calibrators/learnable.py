"""Learnable quantizers over a QuantPlan: AdaRound weight rounding and LSQ activation step sizes.

- Weights (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020, eq. 22–24):
  each weight w with scale s rounds to ⌊w/s⌋ + h(V), the rectified sigmoid

      h(V) = clip(σ(V)·(ζ − γ) + γ, 0, 1),   ζ = 1.1, γ = −0.1                                            (22)

  relaxes the up/down choice while optimizing; the regularizer

      f_reg(V) = mean over weights of 1 − |2h(V) − 1|^β,   β annealed from 20 to 2                        (24)

  (a mean instead of the paper's sum, so its weight λ does not depend on the layer sizes) drives h to 0 or 1;
  after the optimization the rounding is hard: h = 1 where V ≥ 0 (h(V) ≥ 1/2). Integers are clamped to
  [−qmax, qmax] as every denoq weight is. V starts at the plan's rounding: h = frac(w/s) reproduces w exactly
  (AdaRound's init, `init="fp"`), or h = 0.9 / 0.1 where the plan's integers (e.g. GPTQ's) round up / down
  (`init="plan"`). An integer q that GPTQ's error compensation put outside {⌊w/s⌋, ⌊w/s⌋ + 1} (ours) moves that
  weight's pair of choices to {q − 1, q} above it or {q, q + 1} below it, so the hard rounding starts at the plan
  exactly and may still move one step towards w.
- Activations (Esser et al., "Learned Step Size Quantization", ICLR 2020, eq. 1–3): each layer's input scale
  table (length T, one value per timestep group) is learned through `x̂ = (clamp(round(x/s) + z, qmin, qmax) −
  z)·s` with the rounding passed straight through, whose gradient in s is LSQ's; we learn log s (one parameter
  per distinct scale of the table, so groups stay groups) instead of s with LSQ's gradient scale. Zero points
  stay the observers'; output quantizers (ort-cpu) stay fixed, passing gradients straight through.

`LearnableModel(model, plan)` is the SimulatedModel of the plan with these layers; `hard()` switches to hard
rounding, and `export_plan()` returns the plan with the learned integers and scales, which `simulate` then runs
exactly as this model's hard mode (constant-table layers; selector layers to float rounding, their graph op order
differs from the per-timestep division used while learning). `StagedTwin` learns one block at a time on the
model's own modules instead of a copy, with rounding variables for that block's layers only (block-wise
reconstruction).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from denoq.calibrators.quantizer import straight_through
from denoq.calibrators.simulate import SimulatedLayer, SimulatedModel, TimestepClock, fake_quant_at
from denoq.errors import DenoqError
from denoq.plan import ActQuant, LayerPlan, QuantPlan

ZETA, GAMMA = 1.1, -0.1
INIT_UP, INIT_DOWN = 0.9, 0.1
INITS = ("fp", "plan")


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) of (22)."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with h(V) = h for h in (0, 1)."""
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """`fake_quantize`'s forward (true division, round half to even, saturation) with LSQ's gradients."""
    q = (straight_through(torch.round(x / scale), x / scale) + zero_point).clamp(qmin, qmax)
    return (q - zero_point) * scale


def _weight_qmax(lp: LayerPlan) -> int:
    return 2 ** (lp.weight_bits - 1) - 1


class LearnableLayer(SimulatedLayer):
    """A SimulatedLayer whose weight rounding (AdaRound) and input scales (LSQ) are parameters."""

    def __init__(self, module: nn.Module, plan: LayerPlan, clock: TimestepClock,
                 num_timesteps: int | None = None, init: str = "plan") -> None:
        super().__init__(module, plan, clock, num_timesteps)
        if init not in INITS:
            raise DenoqError(f"unknown AdaRound init {init!r}; choose one of {', '.join(INITS)}")
        device = module.weight.device
        scale = plan.expanded_weight_scale().to(device)
        self.register_buffer("w_scale", scale)
        v = module.weight.detach().float() / scale
        floor = torch.floor(v)
        if init == "fp":
            h0 = v - floor
        else:
            q = plan.weight_int.to(device).float()
            floor = torch.where(q > floor + 1, q - 1, torch.minimum(floor, q))  # the plan's q is one of the pair
            h0 = torch.where(q > floor, torch.full_like(v, INIT_UP), torch.full_like(v, INIT_DOWN))
        self.register_buffer("w_floor", floor)
        self.v = nn.Parameter(inverse_rectified_sigmoid(h0))
        self.qmax = _weight_qmax(plan)
        self.soft = True
        self.fp = False  # block-wise reconstruction: a block after the one learning runs in floating point
        self.log_scale: nn.Parameter | None = None
        if plan.input is not None:
            table = plan.input.scale.to(torch.float32)
            values, index = torch.unique(table, return_inverse=True)
            self.register_buffer("scale_values", values.to(device))
            self.register_buffer("scale_index", index.to(device))
            self.log_scale = nn.Parameter(torch.zeros_like(values, device=device))

    # -- the parameters ------------------------------------------------------------------------------------------
    def rounding(self) -> torch.Tensor:
        """h(V) while soft, the hard 0/1 choice after `hard()`."""
        return rectified_sigmoid(self.v) if self.soft else (self.v >= 0).to(self.v.dtype)

    def regularizer(self, beta: float) -> torch.Tensor:
        """f_reg of (24) over this layer's weights (a mean)."""
        return (1 - (2 * rectified_sigmoid(self.v) - 1).abs().pow(beta)).mean()

    def integer_weight(self) -> torch.Tensor:
        return (self.w_floor + self.rounding()).clamp(-self.qmax, self.qmax)

    def input_scale_table(self) -> torch.Tensor:
        """The learned input scale per timestep, float32 [T]."""
        assert self.log_scale is not None
        return (self.scale_values * torch.exp(self.log_scale))[self.scale_index]

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp:
            return self.source(x)
        t = self.clock.t
        if t is None or t.shape[0] != x.shape[0]:
            raise DenoqError(f"learnable layer {self.plan.name} got a batch of {x.shape[0]} but timesteps "
                             f"{None if t is None else tuple(t.shape)}; call the LearnableModel, not its layers")
        if self.plan.input is not None:
            q = self.plan.input
            qmin, qmax = q.qrange
            s = self.input_scale_table()[t].view(-1, *([1] * (x.dim() - 1)))
            x = lsq_fake_quantize(x, s, q.zero_point, qmin, qmax)
        y = self._layer(x, self.bias, self.integer_weight() * self.w_scale)
        if self.plan.output is not None:
            y = straight_through(fake_quant_at(y, self.plan.output, t), y)
        return y

    def export(self) -> LayerPlan:
        """The LayerPlan of the hard rounding and the learned input scales."""
        with torch.no_grad():
            q = (self.w_floor + (self.v >= 0).float()).clamp(-self.qmax, self.qmax).to(torch.int8).cpu()
            act = self.plan.input
            if act is not None:
                act = ActQuant(bits=act.bits, signed=act.signed, zero_point=act.zero_point,
                               scale=self.input_scale_table().detach().float().cpu())
        return dataclasses.replace(self.plan, weight_int=q, input=act)


class _Learning:
    """The learnable layers by name (`learnable`) and what the optimizer reads from them."""

    learnable: dict[str, LearnableLayer]

    def _layers(self, names: list[str] | None) -> list[LearnableLayer]:
        return [self.learnable[n] for n in sorted(self.learnable if names is None else names)]

    def rounding_parameters(self, names: list[str] | None = None) -> list[nn.Parameter]:
        """The rounding variables V of the layers `names` (default: all)."""
        return [m.v for m in self._layers(names)]

    def scale_parameters(self, names: list[str] | None = None) -> list[nn.Parameter]:
        """The input log-scales of the layers `names` (default: all) that quantize their input."""
        return [m.log_scale for m in self._layers(names) if m.log_scale is not None]

    def regularizer(self, beta: float, names: list[str] | None = None) -> torch.Tensor:
        """f_reg of (24), averaged over the layers `names` (default: all)."""
        return torch.stack([m.regularizer(beta) for m in self._layers(names)]).mean()


class LearnableModel(_Learning, SimulatedModel):
    """The plan's simulated model with LearnableLayers; its parameters are the quantizers' (the FP model's own
    parameters are frozen)."""

    def __init__(self, model: nn.Module, plan: QuantPlan, init: str = "plan") -> None:
        def layer(module: nn.Module, lp: LayerPlan, clock: TimestepClock, T: int) -> LearnableLayer:
            return LearnableLayer(module, lp, clock, T, init=init)

        super().__init__(model, plan, layer=layer)  # type: ignore[arg-type]
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.plan = plan
        self.learnable = {name: m for name, m in self.model.named_modules() if isinstance(m, LearnableLayer)}
        for m in self.learnable.values():
            m.v.requires_grad_(True)
            if m.log_scale is not None:
                m.log_scale.requires_grad_(True)

    def hard(self, on: bool = True) -> LearnableModel:
        """Every layer quantized, with hard rounding (`on`) or the soft relaxation; returns the model."""
        for m in self.learnable.values():
            m.soft, m.fp = not on, False
        return self

    def stage(self, done: list[str], learning: list[str]) -> LearnableModel:
        """Block-wise reconstruction: the layers `done` hard, `learning` soft, every other layer in floating
        point; returns the model."""
        self.hard(False)
        for name, m in self.learnable.items():
            m.soft = name not in done
            m.fp = name not in done and name not in learning
        return self

    def export_plan(self) -> QuantPlan:
        """The plan with the hard rounding and learned input scales (layers the model does not learn unchanged)."""
        layers = dict(self.plan.layers)
        for name, m in self.learnable.items():
            layers[name] = m.export()
        return dataclasses.replace(self.plan, layers=layers)


class StagedTwin(_Learning, SimulatedModel):
    """Block-wise reconstruction's quantized twin on the model's own modules (`SimulatedModel(share=True)`), one
    stage at a time: after `stage(done, learning)` the layers `done` compute from their learned hard rounding (the
    plan they exported), the layers `learning` are LearnableLayers built from the plan, and every other layer is
    the FP model's. Only the learning layers hold rounding variables and their floors and scales (three float32
    tensors the size of the weight each), so the twin adds one block's to the model instead of three copies of the
    whole model's, and an offloaded model stays offloaded. Stages only move forward: `hard()` ends the one in
    progress (its layers export their hard rounding) and quantizes every layer; a finished layer does not become
    soft again (`hard(False)` changes nothing). Use it through `staged_twin`."""

    def __init__(self, model: nn.Module, plan: QuantPlan, init: str = "plan") -> None:
        super().__init__(model, plan, share=True)
        self.init = init
        self.plan = dataclasses.replace(plan, layers=dict(plan.layers))  # each layer's plan once it has learned
        self.learnable = {}
        if init == "fp":  # the hard start is AdaRound's init rounded, one layer's variables at a time
            try:
                for name in sorted(plan.layers):
                    self._learn([name])
                    self._finish()
            except BaseException:
                self.restore()
                raise

    def _simulate(self, names: list[str]) -> None:
        """The layers `names` compute from their plan."""
        T = self.plan.num_train_timesteps
        self.place(names, lambda name, module: SimulatedLayer(module, self.plan.layers[name], self.clock, T))

    def _learn(self, names: list[str]) -> None:
        T = self.plan.num_train_timesteps
        self.place(names, lambda name, module: LearnableLayer(module, self.plan.layers[name], self.clock, T,
                                                              init=self.init))
        self.learnable = {name: self.shared[name] for name in names}  # type: ignore[misc]

    def _finish(self) -> None:
        """The learning layers export their hard rounding into the plan and compute from it."""
        for name, m in self.learnable.items():
            self.plan.layers[name] = m.export()
        self._simulate(sorted(self.learnable))
        self.learnable = {}

    def hard(self, on: bool = True) -> StagedTwin:
        """`on`: the stage in progress ends (`_finish`) and every layer computes from the plan; returns the twin."""
        if on:
            self._finish()
            self._simulate([n for n in sorted(self.plan.layers) if n not in self.shared])
        return self

    def stage(self, done: list[str], learning: list[str]) -> StagedTwin:
        """The layers `done` hard (they have learned, or keep the plan's rounding), `learning` LearnableLayers, every
        other layer in floating point; returns the twin."""
        self._finish()
        self._simulate([n for n in done if n not in self.shared])
        for name in sorted(set(self.shared) - set(done)):
            del self.shared[name]
        self._learn(learning)
        return self

    def export_plan(self) -> QuantPlan:
        """The plan with every layer's hard rounding and learned input scales."""
        return self.hard().plan


@contextlib.contextmanager
def staged_twin(model: nn.Module, plan: QuantPlan, init: str = "plan") -> Iterator[StagedTwin]:
    """A StagedTwin of `model` for the block: the model's parameters are frozen inside it (the gradients go to the
    quantizers alone), and its forwards, processors and `requires_grad` flags come back after."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    twin = None
    try:
        twin = StagedTwin(model, plan, init)
        yield twin
    finally:
        if twin is not None:
            twin.restore()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
