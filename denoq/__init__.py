"""denoq: post-training quantization compiler for diffusion models.

`denoq.quantize(model, recipe, out=DIR, **keys)` compiles a model into an artifact folder; `denoq.load(DIR,
backend)` returns its quantized denoiser as a drop-in `torch.nn.Module` for diffusers pipelines, and
`denoq.open(DIR)` an existing artifact with `.sample`, `.evaluate`, `.build`, `.load`. They load lazily, so `import
denoq` (and the command line's start-up) stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load", "open", "quantize"]
_API = {"quantize": "quantize", "load": "load", "open": "open_artifact"}


def __getattr__(name: str) -> Any:
    if name in _API:
        from denoq.compiler import api

        return getattr(api, _API[name])
    raise AttributeError(f"module 'denoq' has no attribute {name!r}")
