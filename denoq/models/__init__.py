"""The embedded models, shipped as diffusers pipeline folders beside this file."""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
EMBEDDED = {"digits": MODELS_DIR / "digits", "digits-cond": MODELS_DIR / "digits-cond"}
DEFAULT_MODEL = "digits"
