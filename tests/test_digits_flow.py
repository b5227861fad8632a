"""digits-flow (denoq/models/digits-flow, tools/train_flow_digits.py): the shipped flow-matching text-to-image
model is laid out like Stable Diffusion 3 and loads with diffusers' StableDiffusion3Pipeline and with denoq (its
own captions as calibration prompts), a two-step call returns a 16×16 image, and (slow) its prompt accuracy stays
near what docs/flow-matching.md reports.
"""

from __future__ import annotations

import json

import pytest
import torch

from denoq.models import MODELS_DIR

FOLDER = MODELS_DIR / "digits-flow"
#: the slow check: flow-matching Euler 20 steps at guidance 3 (docs/flow-matching.md), 10 samples per digit
SLOW_GUIDANCE, SLOW_STEPS, SLOW_N, SLOW_MIN_ACCURACY = 3.0, 20, 10, 0.95  # measured: 100% (n = 20)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(FOLDER), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_is_a_stable_diffusion_3_layout_without_t5():
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"] == index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
    assert sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file()) < 8 * 2**20


def test_denoq_loads_it_as_an_sd3_text_model_with_its_own_prompts():
    from denoq.compiler.load import load_model
    from denoq.models.captions import captions

    spec = load_model("digits-flow")
    assert spec.model_class == "SD3Transformer2DModel" and spec.text.pipeline_class == "StableDiffusion3Pipeline"
    assert spec.text.tokens == 77 + 256 and spec.text.default_prompts == tuple(captions())
    assert spec.sample_shape == (4, 8, 8) and not spec.learned_variance


def test_a_two_step_call_returns_a_16x16_digit(pipe):
    out = pipe("a handwritten digit seven", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    assert out.shape == (1, 1, 16, 16) and torch.isfinite(out).all()


@pytest.mark.slow
def test_prompt_accuracy_stays_near_the_documented_value(pipe):
    from denoq.metrics import class_accuracy
    from denoq.models.captions import eval_prompt

    out = pipe([eval_prompt(k) for k in range(10)], num_images_per_prompt=SLOW_N, guidance_scale=SLOW_GUIDANCE,
               num_inference_steps=SLOW_STEPS, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert class_accuracy(out.float() * 2 - 1, torch.arange(10).repeat_interleave(SLOW_N)) >= SLOW_MIN_ACCURACY
