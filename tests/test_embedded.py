"""The shipped embedded models: they load like any pipeline folder and their samples are digits."""

from __future__ import annotations

import json

import pytest
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
               shape=(96, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    probs = load_classifier()(x.clamp(-1, 1)).softmax(-1)
    assert float(probs.max(-1).values.mean()) > 0.85
    assert len(probs.argmax(-1).unique()) == 10


@pytest.mark.parametrize("name,measured", [("digits-cond", "99%; 94% without guidance"),
                                           ("digits-dit", "93%; 74% without guidance")])
def test_class_conditional_models_ship_small_and_follow_their_labels(name, measured):
    """The class-conditional models (UNet with class embeddings, DiT): small, load with 10 classes (+ the null
    label), and with classifier-free guidance 2 the shipped classifier reads their samples as the requested digits
    (measured on 100 samples, DDIM 20: see `measured`)."""
    from denoq.metrics import class_accuracy
    from denoq.sampling.guidance import classifier_free

    folder = EMBEDDED[name]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 10e6
    spec = load_model(name)
    meta = json.loads((folder / "training.json").read_text())
    assert (spec.cond_input, spec.num_classes) == ("class_labels", 10)
    assert meta["cond"] or meta.get("dit")
    assert sum(p.numel() for p in spec.module.parameters()) == meta["parameters"]
    labels = torch.arange(50) % 10
    eps = classifier_free(torch_eps(spec.module), torch.tensor(10), 2.0)
    x = sample(eps, NoiseSchedule.from_config(spec.scheduler_config), sampler="ddim", steps=20, shape=(50, 1, 16, 16),
               generator=torch.Generator().manual_seed(0), cond=labels)
    assert class_accuracy(x, labels) >= 0.85
