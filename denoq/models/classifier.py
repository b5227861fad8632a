"""The shipped digits classifier: the feature space of FD-digits and the judge of class accuracy.

A small CNN for [B, 1, 16, 16] images in [-1, 1] (the range of `digits_data.load_digits_16` and of the
embedded models' samples). Two conv blocks, a 64-d penultimate layer (the FD features), a linear head.
Trained by `tools/train_classifier.py`; weights and config live in `digits_classifier/` beside this file.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

from denoq.errors import DenoqError
from denoq.models import MODELS_DIR

CLASSIFIER_DIR = MODELS_DIR / "digits_classifier"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class DigitsClassifier(nn.Module):
    """conv-conv-pool ×2 → flatten → Linear(feature_dim) + SiLU (features) → Linear(num_classes) (logits).

    Input: [B, 1, 16, 16] float in [-1, 1]. SiLU rather than ReLU so that no feature unit is dead (with ReLU a
    quarter of the 64 penultimate units never fired and the feature covariance was singular). No batch norm and no
    dropout, so eval and train mode compute the same function and each image's features do not depend on its batch.
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), feature_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.channels = (c1, c2)
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),  # 16 → 8
            nn.Conv2d(c1, c2, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.SiLU(),
            nn.MaxPool2d(2),  # 8 → 4
            nn.Flatten(),
            nn.Linear(c2 * 4 * 4, feature_dim), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, num_classes)

    def config(self) -> dict:
        """The constructor arguments, as stored under "architecture" in config.json."""
        return {"channels": list(self.channels), "feature_dim": self.feature_dim, "num_classes": self.num_classes}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, 16, 16] in [-1, 1] → [B, feature_dim] penultimate activations (after the SiLU)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, 16, 16] in [-1, 1] → [B, num_classes] logits."""
        return self.head(self.features(x))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _fail(path: Path, what: str) -> DenoqError:
    return DenoqError(
        f"digits classifier file {path} {what}; re-run `python tools/train_classifier.py` or reinstall denoq"
    )


def load_classifier(directory: Path | str | None = None) -> DigitsClassifier:
    """The shipped classifier (or the one saved in `directory`), in eval mode with gradients off.

    Cached per directory: every caller shares one module, so do not modify it. A missing or corrupt
    `config.json` / `model.safetensors` raises `DenoqError` naming the file and the fix.
    """
    return _load_cached(Path(directory).resolve() if directory is not None else CLASSIFIER_DIR)


@functools.lru_cache(maxsize=4)
def _load_cached(directory: Path) -> DigitsClassifier:
    from safetensors.torch import load_file

    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise _fail(path, "is missing")
    try:
        arch = json.loads(config_path.read_text())["architecture"]
        model = DigitsClassifier(tuple(arch["channels"]), int(arch["feature_dim"]), int(arch["num_classes"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _fail(config_path, f"is unreadable ({_first_line(e)})") from e
    try:
        state = load_file(weights_path)
        model.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise _fail(weights_path, f"is corrupt or does not match config.json ({_first_line(e)})") from e
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise _fail(weights_path, "holds non-finite weights")
    return model.eval().requires_grad_(False)
