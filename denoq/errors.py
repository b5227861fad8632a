"""The one exception type users see: a one-line message naming the problem and the fix; the install that fixes a
missing package on this machine."""

from __future__ import annotations

import shutil


class DenoqError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits with status 2.

    The message is one line: what is wrong, then what to do about it.
    """


#: Packages of denoq's core install: missing means a broken or partial install, not a missing extra.
CORE_PACKAGES = ("polygraphy",)


def has_nvidia_gpu() -> bool:
    """Whether this machine shows an NVIDIA GPU: a CUDA device in torch, or the driver's nvidia-smi."""
    import torch

    return torch.cuda.is_available() or shutil.which("nvidia-smi") is not None


def install_hint(module: str) -> str:
    """The install that provides `module` (a core package, or one of the `denoq[gpu]` extra) on *this* machine."""
    top = module.split(".")[0]
    if top in CORE_PACKAGES:
        return f"pip install {top} (it is part of denoq's core install: pip install -c constraints.txt -e .)"
    if has_nvidia_gpu():
        return "pip install 'denoq[gpu]' (tensorrt, onnxruntime-gpu; onnxruntime-gpu replaces onnxruntime)"
    return ("this machine shows no NVIDIA GPU (no CUDA device, no nvidia-smi): run it on a machine with one, after "
            "pip install 'denoq[gpu]' there")
