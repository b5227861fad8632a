"""The shipped embedded model: it loads like any pipeline folder and its samples are digits."""

from __future__ import annotations

import json

import torch

from denoq.compiler.backends import torch_eps
from denoq.compiler.load import load_model
from denoq.models import EMBEDDED
from denoq.models.classifier import load_classifier
from denoq.sampling import NoiseSchedule, sample


def test_digits_model_ships_small_and_loads():
    folder = EMBEDDED["digits"]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 10e6
    meta = json.loads((folder / "training.json").read_text())
    spec = load_model("digits")
    assert spec.model_class == "UNet2DModel" and spec.sample_shape == (1, 16, 16)
    assert sum(p.numel() for p in spec.module.parameters()) == meta["parameters"]
    assert any(".attentions." in name for name, _ in spec.module.named_modules())


def test_digits_samples_are_confident_digits_of_every_class():
    """The shipped classifier (99.4% test accuracy) reads the FP model's samples as digits with high confidence,
    and all ten classes appear; pure noise or blobs would fail both."""
    spec = load_model("digits")
    x = sample(torch_eps(spec.module), NoiseSchedule.from_config(spec.scheduler_config), sampler="ddim", steps=20,
               shape=(96, 1, 16, 16), generator=torch.Generator().manual_seed(0), progress=False)
    probs = load_classifier()(x.clamp(-1, 1)).softmax(-1)
    assert float(probs.max(-1).values.mean()) > 0.85
    assert len(probs.argmax(-1).unique()) == 10
