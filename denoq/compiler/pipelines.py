"""The text side of a Stable Diffusion pipeline folder, checked from its configs before anything heavy loads
(docs/architecture.md, Text-to-image pipelines).

A `UNet2DConditionModel` is text-conditioned. Its folder is a `StableDiffusionPipeline` (one CLIP text encoder whose
width is the UNet's `cross_attention_dim`), a `StableDiffusionXLPipeline` (two encoders whose widths add up to it,
the second's projection giving SDXL's pooled `text_embeds`, with `addition_embed_type="text_time"`), or a bare
UNet folder without text encoders (its conditioning then comes from `calib.embeddings`, or from the explicit opt-in
`calib.conditioning=random`). Only the denoiser is quantized; the encoders run in float32 to encode the
calibration prompts (`text_cond`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from denoq.errors import DenoqError
from denoq.models import EMBEDDED
from denoq.models.captions import captions
from denoq.sampling.cond import TEXT_INPUT

SD, SDXL = "StableDiffusionPipeline", "StableDiffusionXLPipeline"
TIME_IDS = 6
#: the embedded text models' own calibration prompts (their training captions)
EMBEDDED_PROMPTS = {"digits-sd": captions, "digits-flow": captions}


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file of a pipeline folder; DenoqError (with the fix) when missing or unreadable."""
    if not path.is_file():
        raise DenoqError(f"{what}: {path} is missing; save the pipeline with DiffusionPipeline.save_pretrained")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DenoqError(f"{what}: cannot read {path} ({exc}); re-save the pipeline") from exc
    if not isinstance(data, dict):
        raise DenoqError(f"{what}: {path} is not a JSON object; re-save the pipeline")
    return data


@dataclass(frozen=True)
class TextModel:
    """What calibration needs to know of a text-conditioned denoiser's pipeline: its class (None for a bare
    denoiser folder), the token length and width of `encoder_hidden_states`, the pooled width (SDXL's
    `text_embeds`, SD3's and Flux's `pooled_projections`; None otherwise), the prompts used when `calib.prompts`
    is empty, the denoiser's class, and whether it takes Flux-dev's `guidance` or PixArt-α's micro-conditions."""

    folder: Path
    pipeline_class: str | None
    tokens: int
    width: int
    pooled: int | None
    default_prompts: tuple[str, ...]
    denoiser: str = "UNet2DConditionModel"
    guidance_embeds: bool = False
    additional_conditions: bool = False

    @property
    def sdxl(self) -> bool:
        return self.pooled is not None and self.denoiser == "UNet2DConditionModel"

    @property
    def pooled_input(self) -> str | None:
        """The graph input of the pooled embedding: SDXL's `text_embeds` or the transformers' `pooled_projections`."""
        if self.pooled is None:
            return None
        return "text_embeds" if self.sdxl else "pooled_projections"

    def shapes(self) -> dict[str, tuple[int | None, ...]]:
        """Per-sample shapes of the text conditioning inputs (None: the token length, free); the inputs that
        depend on the image (`image_conditions`) are not among them."""
        shapes: dict[str, tuple[int | None, ...]] = {TEXT_INPUT: (None, self.width)}
        if self.pooled_input:
            shapes[self.pooled_input] = (int(self.pooled),)
        if self.denoiser == "PixArtTransformer2DModel":
            shapes["encoder_attention_mask"] = (None,)
        return shapes

    def image_conditions(self) -> list[str]:
        """The conditioning inputs computed from the image size (and guidance), not from the text."""
        if self.sdxl:
            return ["time_ids"]
        if self.denoiser == "FluxTransformer2DModel":
            return ["img_ids", "txt_ids", *(["guidance"] if self.guidance_embeds else [])]
        return ["aspect_ratio", "resolution"] if self.additional_conditions else []

    def describe(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline_class, "tokens": self.tokens, "width": self.width,
                "pooled": self.pooled,
                "added_conditions": sorted({*self.shapes(), *self.image_conditions()} - {TEXT_INPUT})}


def component(index: dict[str, Any], name: str) -> bool:
    """Whether model_index.json names the component `name` (a [library, class] pair that is not None)."""
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def encoder_config(folder: Path, name: str) -> dict[str, Any]:
    """A text encoder's config (the text part of a CLIPModel-style config)."""
    cfg = read_json(folder / name / "config.json", name)
    return cfg.get("text_config", cfg)  # a CLIPModel-style config nests its text part


def _tokens(folder: Path, name: str) -> int:
    path = folder / name / "tokenizer_config.json"
    length = read_json(path, name).get("model_max_length", 77) if path.is_file() else 77
    return int(length) if isinstance(length, int) and 0 < length <= 4096 else 77


def text_prompts(folder: Path) -> tuple[str, ...]:
    """The calibration prompts an embedded text model ships (its training captions); () for any other folder."""
    if folder.name in EMBEDDED_PROMPTS and EMBEDDED.get(folder.name) == folder:
        return tuple(EMBEDDED_PROMPTS[folder.name]())
    return ()


def text_model(folder: Path, index: dict[str, Any], unet: dict[str, Any]) -> TextModel:
    """The text side of the pipeline folder (`index` = model_index.json, `unet` = the UNet's config), with every
    mismatch refused in one line: an unsupported added conditioning, an SDXL UNet without its second encoder, an
    encoder width that is not the UNet's `cross_attention_dim`."""
    width = int(unet["cross_attention_dim"]) if not isinstance(unet["cross_attention_dim"], list) else -1
    if width < 0:
        raise DenoqError(f"{folder}: per-block cross_attention_dim {unet['cross_attention_dim']} is not supported; "
                         "denoq compiles UNets with one cross_attention_dim")
    added = unet.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise DenoqError(f"{folder}: addition_embed_type {added!r} is not supported; denoq compiles SD 1.x/2.x "
                         "(none) and SDXL (text_time) UNets")
    pooled = None
    if added == "text_time":
        pooled = int(unet["projection_class_embeddings_input_dim"]) - TIME_IDS * int(unet["addition_time_embed_dim"])
    prompts = text_prompts(folder)
    cls = index.get("_class_name")
    if not component(index, "text_encoder"):
        return TextModel(folder, None, 77, width, pooled, prompts)
    if cls not in (SD, SDXL):
        raise DenoqError(f"{folder}: {cls} is not a text-to-image pipeline denoq loads; save the model as a "
                         f"{SD} or {SDXL} (or a bare UNet folder and calib.embeddings)")
    if added == "text_time" and cls != SDXL:
        raise DenoqError(f"{folder}: the UNet takes SDXL's added conditions (addition_embed_type text_time) but the "
                         f"pipeline is a {cls}; save it as a {SDXL} with both text encoders")
    te = encoder_config(folder, "text_encoder")
    got = int(te.get("hidden_size", -1))
    if cls == SDXL:
        if not (component(index, "text_encoder_2") and component(index, "tokenizer_2")):
            raise DenoqError(f"{folder}: the {SDXL} has no text_encoder_2 / tokenizer_2; SDXL's UNet needs both "
                             "text encoders, save the whole pipeline")
        te2 = encoder_config(folder, "text_encoder_2")
        got += int(te2.get("hidden_size", -1))
        projection = int(te2.get("projection_dim", -1))
        if pooled is not None and projection != pooled:
            raise DenoqError(f"{folder}: text_encoder_2 projects to {projection} but the UNet's text_embeds take "
                             f"{pooled}; the encoders do not belong to this UNet")
    if got != width:
        raise DenoqError(f"{folder}: the text encoder(s) give {got} channels but the UNet's cross_attention_dim is "
                         f"{width}; the encoders do not belong to this UNet, save the matching pipeline")
    return TextModel(folder, cls, _tokens(folder, "tokenizer"), width, pooled, prompts)
