"""A Linear or Conv2d layer as the matrix product GPTQ/OBQ round (`gptq.py`): weights W `[rows = out, cols]`
(`weight_matrix`) times calibration inputs X `[cols, N]`, one column per input vector (`layer_inputs`: a Conv2d's
input unfolded into its kernel patches with the module's padding, dilation and stride, so that W X is the
convolution and a group of input channels is a contiguous block of columns), and the Hessian H = 2XXᵀ / N of the
layer's output error E(Ŵ) = ½ tr(ΔW H ΔWᵀ) (GPTQ eq. 1), accumulated over the calibration batches
(`HessianAccumulator`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from denoq.errors import DenoqError


def check_module(module: nn.Module) -> None:
    """DenoqError unless `module` is a Linear or an ungrouped Conv2d, the layers GPTQ/OBQ round."""
    if type(module) not in (nn.Linear, nn.Conv2d):
        raise DenoqError(f"GPTQ/OBQ rounds Linear and Conv2d weights, not {type(module).__name__}; "
                         "quantize this layer with weights.method=rtn or keep it in FP (layers.keep_fp)")
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise DenoqError(f"GPTQ/OBQ does not support grouped convolutions (groups={module.groups}); use "
                         "weights.method=rtn for this model or keep the layer in FP (layers.keep_fp)")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """W as `[out, cols]`: Linear `[out, in]`; Conv2d `[out, in·kh·kw]`, in-channel major then kh, kw, which is the
    row order of `F.unfold`'s patches, so that `weight_matrix(conv) @ layer_inputs(conv, x).T` is the conv."""
    check_module(module)
    return module.weight.detach().flatten(1)


def from_matrix(module: nn.Module, w2d: torch.Tensor) -> torch.Tensor:
    """The inverse of `weight_matrix`: `w2d` (any dtype, e.g. the int8 integers) in the module's weight layout."""
    check_module(module)
    if w2d.numel() != module.weight.numel() or w2d.shape[0] != module.weight.shape[0]:
        raise DenoqError(f"a weight matrix of shape {tuple(w2d.shape)} does not fit a layer with weights "
                         f"{tuple(module.weight.shape)}; pass the matrix computed for this layer")
    return w2d.reshape(module.weight.shape)


def _conv_pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of `conv`, as F.pad takes it; 'same' puts the odd pixel right/bottom."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        th, tw = (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input vectors as rows of a `[N, cols]` matrix (Xᵀ): Linear `[..., in]` → `[N, in]`;
    Conv2d NCHW → its unfolded patches (padding, dilation, stride of the module) `[B·L, in·kh·kw]`."""
    check_module(module)
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if x.dim() != 4:
        raise DenoqError(f"Conv2d input must be NCHW, got shape {tuple(x.shape)}; record the layer's batched input")
    pads = _conv_pads(module)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)  # [B, cols, L]
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


class HessianAccumulator:
    """H = 2XXᵀ/N over every input batch `add`ed, as a running mean in float64:

        H ← H · N/(N + n) + (2/(N + n)) · X_b X_bᵀ,   N ← N + n

    where X_b `[cols, n]` are the n input vectors of the batch (`layer_inputs`)."""

    def __init__(self, module: nn.Module) -> None:
        check_module(module)
        self.module = module
        self.count = 0
        self._h: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Accumulate one batch of the layer's *input* activations (Linear `[..., in]`, Conv2d NCHW)."""
        xt = layer_inputs(self.module, x.detach()).to(torch.float64)
        n = xt.shape[0]
        if n == 0:
            return
        if self._h is None:
            self._h = torch.zeros(xt.shape[1], xt.shape[1], dtype=torch.float64, device=xt.device)
        total = self.count + n
        self._h.mul_(self.count / total).addmm_(xt.T, xt, alpha=2.0 / total)
        self.count = total

    def attach(self) -> RemovableHandle:
        """Accumulate every forward input of the module from now on; `.remove()` the handle when done."""
        return self.module.register_forward_pre_hook(lambda _m, args: self.add(args[0]))

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2XXᵀ/N, float64 `[cols, cols]` (a copy)."""
        if self._h is None:
            raise DenoqError("no calibration inputs reached this layer, so it has no Hessian; check that the "
                             "calibration run executes the layer (or quantize it with weights.method=rtn)")
        return self._h.clone()
