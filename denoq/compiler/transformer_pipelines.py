"""The text side of a PixArt, SD3 or Flux pipeline folder, checked from its configs before anything heavy loads
(docs/architecture.md, Transformer pipelines).

- `PixArtSigmaPipeline` / `PixArtAlphaPipeline`: one T5 encoder whose width is the transformer's
  `caption_channels`; prompts padded to 300 (Σ) or 120 (α) tokens with their attention mask; PixArt-α at 1024 px
  (`use_additional_conditions`) adds the resolution and aspect-ratio micro-conditions.
- `StableDiffusion3Pipeline`: CLIP-L and CLIP-G (with projections; their pooled outputs concatenated are
  `pooled_projections`, their hidden states concatenated and zero-padded to `joint_attention_dim`) and T5 (optional,
  zeros without it): 77 + 256 tokens.
- `FluxPipeline`: CLIP-L's pooled output is `pooled_projections`, T5's hidden states `encoder_hidden_states`
  (512 tokens); Flux-dev (`guidance_embeds`) takes the distilled guidance as an input.

A folder whose model_index.json names no text encoder (a bare transformer) is conditioned through
`calib.embeddings` or `calib.conditioning=random`; one that names the pipeline but lacks an encoder it needs is
refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from denoq.compiler.pipelines import TextModel, component, encoder_config
from denoq.errors import DenoqError

PIXART, PIXART_ALPHA = "PixArtSigmaPipeline", "PixArtAlphaPipeline"
SD3, FLUX = "StableDiffusion3Pipeline", "FluxPipeline"
#: the denoiser class → the pipelines that drive it, and the encoders each needs
PIPELINES = {"PixArtTransformer2DModel": {PIXART: ("text_encoder",), PIXART_ALPHA: ("text_encoder",)},
             "SD3Transformer2DModel": {SD3: ("text_encoder", "text_encoder_2")},
             "FluxTransformer2DModel": {FLUX: ("text_encoder", "text_encoder_2")}}
#: T5's token length in each pipeline's encode_prompt (its max_sequence_length default); CLIP's is 77
T5_TOKENS = {PIXART: 300, PIXART_ALPHA: 120, SD3: 256, FLUX: 512}
CLIP_TOKENS = 77


def _width(cfg: dict[str, Any], what: str) -> int:
    value = cfg.get("d_model", cfg.get("hidden_size"))
    if not isinstance(value, int):
        raise DenoqError(f"{what}: its config gives no width (d_model / hidden_size); re-save the pipeline")
    return value


def _mismatch(folder: Path, what: str, got: int, want: int, key: str) -> DenoqError:
    return DenoqError(f"{folder}: {what} gives {got} channels but the transformer's {key} is {want}; the encoders "
                      "do not belong to this transformer, save the matching pipeline")


def transformer_text(folder: Path, index: dict[str, Any], cls: str, config: dict[str, Any],
                     prompts: tuple[str, ...]) -> TextModel:
    """The text side of a PixArt / SD3 / Flux pipeline folder (`index` = model_index.json, `config` = the
    transformer's), every mismatch refused in one line."""
    pipeline = index.get("_class_name")
    known = PIPELINES[cls]
    pixart, flux = cls == "PixArtTransformer2DModel", cls == "FluxTransformer2DModel"
    width = int(config["caption_channels"] if pixart else config["joint_attention_dim"])
    pooled = None if pixart else int(config["pooled_projection_dim"])
    extra = {"guidance_embeds": bool(config.get("guidance_embeds"))} if flux else {}
    if pixart:
        use = config.get("use_additional_conditions")  # diffusers' default: on at sample_size 128 (1024 px)
        extra["additional_conditions"] = bool(use) if use is not None else config.get("sample_size") == 128
    bare = not any(component(index, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    if bare:
        tokens = T5_TOKENS[PIXART] if pixart else T5_TOKENS[FLUX] if flux else CLIP_TOKENS + T5_TOKENS[SD3]
        return TextModel(folder, None, tokens, width, pooled, prompts, denoiser=cls, **extra)
    if pipeline not in known:
        raise DenoqError(f"{folder}: a {cls} is driven by {' or '.join(known)}, not {pipeline}; save the model "
                         f"as one of them (or a bare transformer folder and calib.embeddings)")
    missing = [n for n in known[pipeline] if not component(index, n)]
    if missing:
        raise DenoqError(f"{folder}: the {pipeline} has no {', '.join(missing)}; the transformer needs it to "
                         "encode prompts, save the whole pipeline (or give calib.embeddings)")
    if pixart:
        got = _width(encoder_config(folder, "text_encoder"), "text_encoder")
        if got != width:
            raise _mismatch(folder, "the T5 encoder", got, width, "caption_channels")
        return TextModel(folder, pipeline, T5_TOKENS[pipeline], width, None, prompts, denoiser=cls, **extra)
    clip = encoder_config(folder, "text_encoder")
    if flux:
        got = _width(clip, "text_encoder")
        if got != pooled:
            raise _mismatch(folder, "the CLIP encoder's pooled output", got, pooled, "pooled_projection_dim")
        got = _width(encoder_config(folder, "text_encoder_2"), "text_encoder_2")
        if got != width:
            raise _mismatch(folder, "the T5 encoder", got, width, "joint_attention_dim")
        return TextModel(folder, pipeline, T5_TOKENS[FLUX], width, pooled, prompts, denoiser=cls, **extra)
    clip_g = encoder_config(folder, "text_encoder_2")
    got = int(clip.get("projection_dim", -1)) + int(clip_g.get("projection_dim", -1))
    if got != pooled:
        raise _mismatch(folder, "the CLIP encoders' projections", got, pooled, "pooled_projection_dim")
    got = _width(clip, "text_encoder") + _width(clip_g, "text_encoder_2")
    if got > width:
        raise DenoqError(f"{folder}: the CLIP encoders give {got} channels together, more than the transformer's "
                         f"joint_attention_dim {width} they are padded to; save the matching pipeline")
    if component(index, "text_encoder_3"):
        got = _width(encoder_config(folder, "text_encoder_3"), "text_encoder_3")
        if got != width:
            raise _mismatch(folder, "the T5 encoder", got, width, "joint_attention_dim")
    return TextModel(folder, pipeline, CLIP_TOKENS + T5_TOKENS[SD3], width, pooled, prompts, denoiser=cls)
