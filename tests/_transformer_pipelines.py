"""Random-init PixArt-Σ, SD3 and Flux pipelines in the real classes at reduced widths, saved with
`save_pretrained`: CLIP encoders with digits-sd's own tokenizer, T5 encoders with a Unigram tokenizer built here
from a word list (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from _sd_pipelines import TOKENIZER, _encoder_config

WORDS = ("a photo of the digit number handwritten one two three four five six seven eight nine zero cat dog "
         "red blue big small on in with and").split()
T5_WIDTH, CLIP_WIDTH = 24, 16
SD3_T5 = 40  # SD3's T5 is wider than CLIP-L ‖ CLIP-G, which are zero-padded to it


def t5_tokenizer():
    """A T5 (Unigram) tokenizer over WORDS and single characters: every text tokenizes, none is cut."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0), *((f"▁{w}", -1.0) for w in WORDS),
             *((c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.'-")]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def t5_encoder(width: int = T5_WIDTH):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer()), d_model=width, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()


def _vae(latent: int):
    """A 2× VAE; 16 latent channels with SD3's / Flux's `shift_factor` (their pipelines add it when decoding)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=latent,
                         norm_num_groups=4, sample_size=32, shift_factor=0.0 if latent == 16 else None)


def tiny_pixart(folder: Path, seed: int = 0) -> Path:
    """A PixArtSigmaPipeline folder: PixArt-Σ's layout (learned σ, out_channels = 2 × 4, no micro-conditions),
    8 × 8 latents, a T5 encoder of width 24, a DPM-Solver scheduler with PixArt's linear betas."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, cross_attention_dim=16, caption_channels=T5_WIDTH,
                                           sample_size=8, patch_size=2, norm_type="ada_norm_single",
                                           use_additional_conditions=False).eval()
    sched = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                        num_train_timesteps=1000)
    PixArtSigmaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(), vae=_vae(4), transformer=transformer,
                        scheduler=sched).save_pretrained(folder)
    return folder


def tiny_sd3(folder: Path, seed: int = 0, t5: bool = True) -> Path:
    """A StableDiffusion3Pipeline folder: MMDiT with qk RMSNorm and a dual-attention layer (SD3.5's), CLIP-L/G of
    width 16 (projections 16 + 16 = pooled 32), T5 of width 40 = joint_attention_dim, flow-matching Euler with
    shift 3, 8 × 8 latents of 16 channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=SD3_T5,
                                        caption_projection_dim=16, pooled_projection_dim=2 * CLIP_WIDTH,
                                        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,)).eval()
    tok = CLIPTokenizer.from_pretrained(TOKENIZER)
    clip = _encoder_config(CLIP_WIDTH, CLIP_WIDTH)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(16),
        text_encoder=CLIPTextModelWithProjection(clip).eval(), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip).eval(), tokenizer_2=tok,
        text_encoder_3=t5_encoder(SD3_T5) if t5 else None, tokenizer_3=t5_tokenizer() if t5 else None,
    ).save_pretrained(folder)
    return folder


def tiny_flux(folder: Path, seed: int = 0, guidance: bool = True) -> Path:
    """A FluxPipeline folder: one double- and one single-stream block, RoPE over (2, 2, 4) axes, Flux-dev's
    guidance embedding, CLIP of width 16 (pooled 16), T5 of width 24, flow-matching Euler with Flux's
    resolution-dependent shift, 16-channel latents packed in 2 × 2 patches (in_channels 64)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                         pooled_projection_dim=CLIP_WIDTH, guidance_embeds=guidance,
                                         axes_dims_rope=(2, 2, 4)).eval()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(transformer=transformer, scheduler=sched, vae=_vae(16),
                 text_encoder=CLIPTextModel(_encoder_config(CLIP_WIDTH, CLIP_WIDTH)).eval(),
                 tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER), text_encoder_2=t5_encoder(),
                 tokenizer_2=t5_tokenizer()).save_pretrained(folder)
    return folder
