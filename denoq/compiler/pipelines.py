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
EMBEDDED_PROMPTS = {"digits-sd": captions}


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
    """What calibration needs to know of a text-conditioned UNet's pipeline: its class (None for a bare UNet), the
    token length and width of `encoder_hidden_states`, SDXL's pooled width (None otherwise) and the prompts used
    when `calib.prompts` is empty."""

    folder: Path
    pipeline_class: str | None
    tokens: int
    width: int
    pooled: int | None
    default_prompts: tuple[str, ...]

    @property
    def sdxl(self) -> bool:
        return self.pooled is not None

    def shapes(self) -> dict[str, tuple[int | None, ...]]:
        """Per-sample shapes of the conditioning inputs (None: the token length, free)."""
        shapes: dict[str, tuple[int | None, ...]] = {TEXT_INPUT: (None, self.width)}
        if self.sdxl:
            shapes.update({"text_embeds": (int(self.pooled),), "time_ids": (TIME_IDS,)})
        return shapes

    def describe(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline_class, "tokens": self.tokens, "width": self.width,
                "pooled": self.pooled, "added_conditions": (self.sdxl and ["text_embeds", "time_ids"]) or []}


def _component(index: dict[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _encoder_config(folder: Path, name: str) -> dict[str, Any]:
    cfg = read_json(folder / name / "config.json", name)
    return cfg.get("text_config", cfg)  # a CLIPModel-style config nests its text part


def _tokens(folder: Path, name: str) -> int:
    path = folder / name / "tokenizer_config.json"
    length = read_json(path, name).get("model_max_length", 77) if path.is_file() else 77
    return int(length) if isinstance(length, int) and 0 < length <= 4096 else 77


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
    prompts = tuple(EMBEDDED_PROMPTS[folder.name]()) if folder.name in EMBEDDED_PROMPTS and \
        EMBEDDED.get(folder.name) == folder else ()
    cls = index.get("_class_name")
    if not _component(index, "text_encoder"):
        return TextModel(folder, None, 77, width, pooled, prompts)
    if cls not in (SD, SDXL):
        raise DenoqError(f"{folder}: {cls} is not a text-to-image pipeline denoq loads; save the model as a "
                         f"{SD} or {SDXL} (or a bare UNet folder and calib.embeddings)")
    if added == "text_time" and cls != SDXL:
        raise DenoqError(f"{folder}: the UNet takes SDXL's added conditions (addition_embed_type text_time) but the "
                         f"pipeline is a {cls}; save it as a {SDXL} with both text encoders")
    te = _encoder_config(folder, "text_encoder")
    got = int(te.get("hidden_size", -1))
    if cls == SDXL:
        if not (_component(index, "text_encoder_2") and _component(index, "tokenizer_2")):
            raise DenoqError(f"{folder}: the {SDXL} has no text_encoder_2 / tokenizer_2; SDXL's UNet needs both "
                             "text encoders, save the whole pipeline")
        te2 = _encoder_config(folder, "text_encoder_2")
        got += int(te2.get("hidden_size", -1))
        projection = int(te2.get("projection_dim", -1))
        if pooled is not None and projection != pooled:
            raise DenoqError(f"{folder}: text_encoder_2 projects to {projection} but the UNet's text_embeds take "
                             f"{pooled}; the encoders do not belong to this UNet")
    if got != width:
        raise DenoqError(f"{folder}: the text encoder(s) give {got} channels but the UNet's cross_attention_dim is "
                         f"{width}; the encoders do not belong to this UNet, save the matching pipeline")
    return TextModel(folder, cls, _tokens(folder, "tokenizer"), width, pooled, prompts)
