"""denoq: post-training quantization compiler for diffusion models (see ../shared/DESIGN.md)."""

__version__ = "0.1.0"
