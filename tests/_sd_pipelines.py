"""Random-init Stable Diffusion pipelines in the real classes at reduced widths, saved with `save_pretrained`:
`tiny_sd` (SD 1.x layout: one CLIP text encoder) and `tiny_sdxl` (two encoders, `text_time` added conditions).
Their tokenizers are digits-sd's own (built by tools/latent_digits.py, no hub)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from denoq.models import MODELS_DIR

TOKENIZER = MODELS_DIR / "digits-sd" / "tokenizer"
VOCAB = 568


def _encoder_config(width: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=566, eos_token_id=567, pad_token_id=567, hidden_size=width,
                          intermediate_size=2 * width, num_attention_heads=2, num_hidden_layers=2,
                          vocab_size=VOCAB, max_position_embeddings=77, projection_dim=projection)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=32)


def tiny_sd(folder: Path, scheduler: str = "PNDMScheduler", cross: int = 32, encoder_width: int | None = None,
            seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder: UNet (8×8 latents, cross-attention width `cross`), a text encoder of
    width `encoder_width` (default: `cross`), the named scheduler class with SD 1.5's schedule."""
    import diffusers
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross,
                                attention_head_dim=4, norm_num_groups=8)
    encoder = CLIPTextModel(_encoder_config(encoder_width or cross, cross)).eval()
    sched = getattr(diffusers, scheduler)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=encoder, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def tiny_sdxl(folder: Path, seed: int = 0, second_encoder: bool = True) -> Path:
    """A StableDiffusionXLPipeline folder: two text encoders of width 16 (the second with a 16-wide projection),
    a UNet with `text_time` added conditions (16 + 6 × 8 = 64), Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=64, transformer_layers_per_block=(1, 1))
    tok = CLIPTokenizer.from_pretrained(TOKENIZER)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=CLIPTextModel(_encoder_config(16, 16)).eval(),
                                     text_encoder_2=CLIPTextModelWithProjection(_encoder_config(16, 16)).eval(),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)
    pipe.save_pretrained(folder)
    if not second_encoder:
        import json

        index = json.loads((folder / "model_index.json").read_text())
        index["text_encoder_2"] = index["tokenizer_2"] = [None, None]
        (folder / "model_index.json").write_text(json.dumps(index))
        shutil.rmtree(folder / "text_encoder_2")
    return folder
