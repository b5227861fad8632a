"""A Linear or Conv2d layer as the matrix product GPTQ/OBQ round (`gptq.py`): weights W `[rows = out, cols]`
(`weight_matrix`) times calibration inputs X `[cols, N]`, one column per input vector (`layer_inputs`: a Conv2d's
input unfolded into its kernel patches with the module's padding, dilation and stride, so that W X is the
convolution and a group of input channels is a contiguous block of columns), and the Hessian H = 2XXᵀ / N of the
layer's output error E(Ŵ) = ½ tr(ΔW H ΔWᵀ) (GPTQ eq. 1), summed over the calibration batches
(`HessianAccumulator`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from denoq.calibrators.distributed import all_reduce, ordered_sum
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
    """H = 2XXᵀ/N over every input batch `add`ed: S = Σ_b X_b X_bᵀ summed batch after batch in float64 (X_b
    `[cols, n]`, the n input vectors of the batch, `layer_inputs`), N = Σ n, H = 2S/N.

    Under several ranks each rank adds its own run of consecutive batches (`deferred`: each batch's product is
    kept) and `combine` sums them after the earlier ranks' running sum (`distributed.ordered_sum`): every rank ends
    with one process's S, bit for bit."""

    def __init__(self, module: nn.Module, deferred: bool = False) -> None:
        check_module(module)
        self.module = module
        self.count = 0
        self._s: torch.Tensor | None = None
        self._parts: list[torch.Tensor] | None = [] if deferred else None

    def add(self, x: torch.Tensor) -> None:
        """Accumulate one batch of the layer's *input* activations (Linear `[..., in]`, Conv2d NCHW)."""
        xt = layer_inputs(self.module, x.detach()).to(torch.float64)
        n = xt.shape[0]
        if n == 0:
            return
        product = xt.T @ xt
        if self._parts is not None:
            self._parts.append(product)
        else:
            self._s = product if self._s is None else self._s.add_(product)
        self.count += n

    def attach(self) -> RemovableHandle:
        """Accumulate every forward input of the module from now on; `.remove()` the handle when done."""
        return self.module.register_forward_pre_hook(lambda _m, args: self.add(args[0]))

    def combine(self, what: str) -> None:
        """Under several ranks (a collective: every rank calls it for the same layers in the same order): S and N
        of every rank's batches, in rank order; the kept products are released."""
        cols = weight_matrix(self.module).shape[1]
        self._s = ordered_sum(self._parts or [], (cols, cols), what)
        self._parts = None
        self.count = int(all_reduce(torch.tensor([self.count], dtype=torch.float64), "sum", what).item())

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2XXᵀ/N, float64 `[cols, cols]` (a new tensor)."""
        if self._s is None:
            raise DenoqError("no calibration inputs reached this layer, so it has no Hessian; check that the "
                             "calibration run executes the layer (or quantize it with weights.method=rtn)")
        return self._s * (2.0 / self.count)
