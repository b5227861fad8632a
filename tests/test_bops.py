"""Bit operations of one model call (denoq.bops): MACs by hooks, weighted by the plan's bit widths."""

from __future__ import annotations

import torch
from torch import nn

from denoq.bops import FLOAT_BITS, layer_bits, layer_macs, plan_bops
from denoq.plan import ActQuant, LayerPlan, QuantPlan


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # out 8×6×6, 3·3·3 MACs each
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)  # out 8×3×3, 1·3·3 MACs each
        self.fc = nn.Linear(72, 10)  # 10 outputs, 72 MACs each
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.conv(x))
        return self.fc(y.flatten(1)) + self.fc(y.flatten(1))  # fc called twice


def _layer(name: str, op: str, shape: tuple[int, ...], wbits: int, abits: int | None) -> LayerPlan:
    act = None if abits is None else ActQuant(bits=abits, signed=True, zero_point=0, scale=torch.ones(10))
    return LayerPlan(name=name, op=op, weight_bits=wbits, weight_int=torch.zeros(shape, dtype=torch.int8),
                     weight_scale=torch.ones(shape[0]), input=act)


def test_macs_are_counted_per_call_by_layer_type():
    net = Net()
    macs = layer_macs(net, lambda: net(torch.zeros(1, 3, 6, 6)))
    assert macs == {"conv": 8 * 36 * 27, "dw": 8 * 9 * 9, "fc": 2 * 10 * 72, "unused": 0}
    assert not net.conv._forward_hooks  # hooks removed


def test_bops_weight_macs_by_the_plan_bits_and_float_elsewhere():
    macs = {"conv": 100, "dw": 10, "fc": 7}
    plan = QuantPlan(num_train_timesteps=10, target="trt", layers={
        "conv": _layer("conv", "conv", (8, 3, 3, 3), 4, 8), "fc": _layer("fc", "linear", (10, 72), 4, None)})
    assert layer_bits(plan, "conv") == (4, 8) and layer_bits(plan, "fc") == (4, FLOAT_BITS)
    assert layer_bits(plan, "dw") == (FLOAT_BITS, FLOAT_BITS)
    assert plan_bops(macs, plan) == 100 * 32 + 10 * FLOAT_BITS**2 + 7 * 4 * FLOAT_BITS
    assert plan_bops(macs, None) == 117 * FLOAT_BITS**2
