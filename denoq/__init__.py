"""denoq: post-training quantization compiler for diffusion models.

`denoq.quantize(model, recipe, out=DIR, **keys)` compiles a model into an artifact folder; `denoq.load(DIR,
backend)` returns its quantized denoiser as a drop-in `torch.nn.Module` for diffusers pipelines. Both load lazily,
so `import denoq` (and the command line's start-up) stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Artifact", "__version__", "load", "quantize"]


def __getattr__(name: str) -> Any:
    if name in ("quantize", "load"):
        from denoq.compiler import api

        return getattr(api, name)
    if name == "Artifact":
        from denoq.compiler.artifact import Artifact

        return Artifact
    raise AttributeError(f"module 'denoq' has no attribute {name!r}")
