"""The embedded models, shipped as diffusers pipeline folders beside this file."""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
EMBEDDED = {name: MODELS_DIR / name for name in ("digits", "digits-cond", "digits-dit", "digits-sd", "digits-flow")}
DEFAULT_MODEL = "digits"
