"""digits-sd (denoq/models/digits-sd, tools/train_latent_digits.py): the shipped latent text-to-image model loads
with diffusers' StableDiffusionPipeline, its tokenizer covers every caption and is rebuilt identically, a two-step
call returns a 16×16 image, and (slow) its prompt accuracy stays near what docs/digits-sd.md reports.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from denoq.models import MODELS_DIR

FOLDER = MODELS_DIR / "digits-sd"
TOOLS = Path(__file__).resolve().parents[1] / "tools"
#: the slow check: DPM-Solver++ 20 steps at guidance 3 (docs/digits-sd.md), 20 samples per digit, seed 0
SLOW_GUIDANCE, SLOW_STEPS, SLOW_N, SLOW_MIN_ACCURACY = 3.0, 20, 20, 0.95  # measured: 99.5%


@pytest.fixture(scope="module")
def helper():
    spec = importlib.util.spec_from_file_location("denoq_tools_latent_digits", TOOLS / "latent_digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipe(helper):
    return helper.load_pipeline(FOLDER)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(FOLDER / "tokenizer"))


def test_folder_is_a_stable_diffusion_1_layout():
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (FOLDER / "tokenizer" / name).is_file()
    weights = sorted(p.relative_to(FOLDER).as_posix() for p in FOLDER.rglob("*.safetensors"))
    assert weights == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                       "vae/diffusion_pytorch_model.safetensors"]
    assert sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file()) < 8 * 2**20


def test_loads_with_stable_diffusion_pipeline(pipe):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.vae_scale_factor == 2 and pipe.vae.config.in_channels == pipe.vae.config.out_channels == 1
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert any("CrossAttn" in b for b in pipe.unet.config.down_block_types)
    assert pipe.text_encoder.config.max_position_embeddings == pipe.tokenizer.model_max_length == 77
    assert isinstance(pipe.scheduler, DDIMScheduler)
    cfg = pipe.scheduler.config
    assert cfg.beta_schedule in ("linear", "scaled_linear") and cfg.prediction_type == "epsilon"
    assert cfg.clip_sample is False
    info = json.loads((FOLDER / "train_info.json").read_text())
    assert pipe.vae.config.scaling_factor == pytest.approx(info["vae"]["scaling_factor"])
    assert pipe.safety_checker is None and pipe.feature_extractor is None


def test_tokenizer_encodes_every_caption_without_unknown_tokens(helper, tokenizer):
    vocab = tokenizer.get_vocab()
    bos, eos = vocab[helper.BOS], vocab[helper.EOS]
    assert tokenizer.unk_token_id == eos  # as CLIP's: an unknown token would show up as <|endoftext|> inside
    for text in [*helper.captions(), helper.eval_prompt(7)]:
        ids = tokenizer(text).input_ids
        assert ids[0] == bos and ids[-1] == eos, text
        inner = ids[1:-1]
        assert eos not in inner and bos not in inner, text
        assert len(inner) == len(text.split()), f"{text!r}: {tokenizer.convert_ids_to_tokens(inner)}"  # whole words
        assert tokenizer.decode(inner) == text
    assert tokenizer("").input_ids == [bos, eos]


def test_tokenizer_is_deterministic(helper, tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    texts = [*helper.captions(), ""]
    first = helper.tokenize(tokenizer, texts)
    assert first.shape == (len(texts), 77)
    assert torch.equal(first, helper.tokenize(CLIPTokenizer.from_pretrained(str(FOLDER / "tokenizer")), texts))
    helper.write_tokenizer(tmp_path)  # rebuilding the vocabulary from the captions gives the shipped files
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (FOLDER / "tokenizer" / name).read_bytes(), name


def test_two_step_call_gives_a_16x16_image(pipe):
    out = pipe("a handwritten digit seven", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    assert out.images.shape == (1, 1, 16, 16)
    assert torch.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1
    image = pipe("the number 3", num_inference_steps=2, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0)).images[0]  # PIL, the pipeline's default output
    assert image.size == (16, 16)


@pytest.mark.slow
def test_prompt_accuracy(helper, pipe):
    helper.use_scheduler(pipe, "dpm")
    try:
        row = helper.evaluate(pipe, SLOW_N, SLOW_GUIDANCE, SLOW_STEPS, seed=0, fd=False)
    finally:
        helper.use_scheduler(pipe, "ddim")
    assert row["samples"] == 10 * SLOW_N
    assert row["prompt_accuracy"] >= SLOW_MIN_ACCURACY, row
