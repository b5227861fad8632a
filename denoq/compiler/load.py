"""Load a model to compile: a local diffusers pipeline folder or an embedded model by name → ModelSpec.

A pipeline folder is what `DiffusionPipeline.save_pretrained` writes: `model_index.json`, `unet/` or `transformer/`
(config.json and safetensors weights) and `scheduler/scheduler_config.json`. Supported denoisers: `UNet2DModel`
(unconditional, or class-conditional with `num_class_embeds`: conditioning input `class_labels`, int64 [B], the
last class embedding being the null label of classifier-free guidance), `UNet2DConditionModel` (conditioning input
`encoder_hidden_states`, the pipeline's text side in `pipelines`), `DiTTransformer2DModel` (class-conditional:
`class_labels`, labels 0 … num_embeds_ada_norm − 1, null label num_embeds_ada_norm; with or without learned
variance, out_channels = 2 × or 1 × in_channels), and the text-to-image transformers `PixArtTransformer2DModel`,
`SD3Transformer2DModel` and `FluxTransformer2DModel` (their text side in `transformer_pipelines`). Flux's sample
is packed as FluxPipeline packs it: [B, (h/2)·(w/2), 4·C] for a latent of C × h × w. Nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from denoq.compiler.pipelines import TextModel, read_json, text_model, text_prompts
from denoq.compiler.transformer_pipelines import PIPELINES, transformer_text
from denoq.errors import DenoqError
from denoq.models import DEFAULT_MODEL, EMBEDDED
from denoq.sampling.names import FLOW_SCHEDULER_CLASS, is_flow, scheduler_class

SUPPORTED_CLASSES = {"UNet2DModel": "unet", "UNet2DConditionModel": "unet", "DiTTransformer2DModel": "transformer",
                     **{cls: "transformer" for cls in PIPELINES}}
FLUX, PIXART = "FluxTransformer2DModel", "PixArtTransformer2DModel"
#: FluxPipeline's default latent size (1024 px through its 8× VAE); Flux's config has no sample_size
FLUX_LATENT = 128
#: the recipe aliases of each class's input and output layers, and of its conditioning path (`@cond`: the time,
#: guidance and text embedders and the adaLN modulation)
LAYER_ALIASES = {
    "UNet2DModel": {"@in": "conv_in", "@out": "conv_out", "@cond": "time_embedding.*,*.time_emb_proj"},
    "UNet2DConditionModel": {"@in": "conv_in", "@out": "conv_out",
                             "@cond": "time_embedding.*,*.time_emb_proj,add_embedding.*"},
    "DiTTransformer2DModel": {"@in": "pos_embed.proj", "@out": "proj_out_2",
                              "@cond": "*.norm1.emb.*,*.norm1.linear,proj_out_1"},
    PIXART: {"@in": "pos_embed.proj", "@out": "proj_out", "@cond": "adaln_single.*,caption_projection.*"},
    "SD3Transformer2DModel": {"@in": "pos_embed.proj", "@out": "proj_out",
                              "@cond": "time_text_embed.*,context_embedder,*.norm1.linear,*.norm1_context.linear,"
                                       "norm_out.linear"},
    FLUX: {"@in": "x_embedder", "@out": "proj_out",
           "@cond": "time_text_embed.*,context_embedder,*.norm1.linear,*.norm1_context.linear,*.norm.linear,"
                    "norm_out.linear"},
}


@dataclass
class ModelSpec:
    """What the compiler knows about the model: the module, its input shapes and its scheduler config."""

    name: str
    folder: Path
    module: nn.Module
    model_class: str
    scheduler_config: dict[str, Any]
    sample_shape: tuple[int, ...]  # (C, H, W); Flux: (tokens, channels), packed
    cond_shape: tuple[int, ...] | None
    weights_sha256: str
    cond_input: str | None = None  # graph input of the conditioning: encoder_hidden_states | class_labels | None
    num_classes: int | None = None  # class_labels models: labels 0 … num_classes − 1; num_classes is the null label
    text: TextModel | None = None  # text-conditioned models: the pipeline's text side (`pipelines.TextModel`)
    checkpoint: tuple[Path, ...] = ()  # the safetensors files the module's weights were loaded from

    @property
    def resolution_multiple(self) -> int:
        """A UNet's and SD3's latent height and width are dynamic in the graph, in multiples of the downsampling or
        patch factor; DiT and PixArt export at their resolution; Flux's packed tokens are dynamic (0 here)."""
        if self.model_class == "SD3Transformer2DModel":
            return int(self.module.config.patch_size)
        if "block_out_channels" not in self.module.config:
            return 0
        return 2 ** (len(self.module.config.block_out_channels) - 1)

    @property
    def packed(self) -> bool:
        """Flux: the sample is [B, tokens, 4 · latent channels] (`sample_shape` = (tokens, channels))."""
        return self.model_class == FLUX

    @property
    def token_grid(self) -> tuple[int, int]:
        """The latent's patch grid (rows, columns): Flux's `img_ids` positions and the image token count of the
        resolution-dependent shift (`FlowSchedule.mu`)."""
        if self.packed:
            side = round(self.sample_shape[0] ** 0.5)
            return side, side
        return self.sample_shape[1] // self.patch, self.sample_shape[2] // self.patch

    @property
    def patch(self) -> int:
        """A transformer's patch size (1 for UNets, and for Flux's packed tokens)."""
        return 1 if self.packed else int(self.module.config.get("patch_size") or 1)

    @property
    def latent_hw(self) -> tuple[int, int]:
        """The latent's height and width (Flux: before packing)."""
        if self.packed:
            return tuple(2 * g for g in self.token_grid)
        return self.sample_shape[1], self.sample_shape[2]

    @property
    def timestep_scale(self) -> float:
        """What the pipeline multiplies the scheduler's timesteps by before the denoiser (FluxPipeline: 1/1000)."""
        return 1e-3 if self.packed else 1.0

    @property
    def learned_variance(self) -> bool:
        """Whether the model also predicts its variance: out_channels = 2 × in_channels (DiT's Σ; the graph's
        output holds both, the samplers read `denoq.sampling.cond.split_variance`)."""
        channels = int(self.module.config.get("in_channels") or 4)
        return int(self.module.config.get("out_channels") or channels) == 2 * channels

    @property
    def io_layers(self) -> dict[str, str]:
        """The recipe aliases: `@in` (the layer that reads the sample), `@out` (the one that writes the output),
        `@cond` (the conditioning path), each a comma-separated pattern list (`LAYER_ALIASES`)."""
        return LAYER_ALIASES[self.model_class]

    def layer_patterns(self, text: str) -> tuple[str, ...]:
        """Comma-separated module-name patterns (a recipe value) with the aliases resolved (`io_layers`)."""
        patterns = tuple(p.strip() for p in text.split(",") if p.strip())
        unknown = [p for p in patterns if p.startswith("@") and p not in self.io_layers]
        if unknown:
            raise DenoqError(f"layer alias {unknown[0]!r} is not known; use {', '.join(self.io_layers)}, or "
                             "module-name patterns")
        return tuple(q for p in patterns for q in self.io_layers.get(p, p).split(","))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def random_cond(self, n: int, seed: int) -> torch.Tensor | None:
        """Seeded labels for class-conditional models, uniform over the classes *and* the null label, so that the
        statistics see both halves of classifier-free guidance; None for unconditional models. (Text models are
        conditioned by `text`.)"""
        g = torch.Generator().manual_seed(seed)
        if self.cond_input == "class_labels":
            return torch.randint(0, int(self.num_classes) + 1, (n,), generator=g)
        return None

    def describe(self) -> dict[str, Any]:
        """The manifest's `model` section."""
        return {"name": self.name, "class": self.model_class, "sample_shape": list(self.sample_shape),
                "cond_shape": None if self.cond_shape is None else list(self.cond_shape),
                "cond_input": self.cond_input, "num_classes": self.num_classes,
                **({} if self.text is None else {"text": self.text.describe()}),
                "num_train_timesteps": self.num_train_timesteps, "weights_sha256": self.weights_sha256,
                "parameters": sum(p.numel() for p in self.module.parameters()),
                "config": json.loads(json.dumps({k: v for k, v in self.module.config.items()  # denoq.load's
                                                 if not k.startswith("_")}))}  # (no _name_or_path: a local path)


def check_label(model: dict[str, Any], label: int | None, guidance: float | None) -> None:
    """Refuse a label / guidance the model (its manifest `model` section, `ModelSpec.describe`) cannot take: a
    label or guidance for a model without classes, a label outside its classes, guidance without a label, or no
    label for a class-conditional model."""
    name, classes = model["name"], model.get("num_classes")
    if model.get("cond_input") != "class_labels":
        if label is not None or guidance is not None:
            raise DenoqError(f"model {name} is not class-conditional; sample it without --label / --guidance")
        return
    if label is None:
        raise DenoqError(f"model {name} is class-conditional: pass --label N (0–{classes - 1}), and --guidance S "
                         "for classifier-free guidance")
    if not 0 <= label < classes:
        raise DenoqError(f"label {label} is outside model {name}'s classes 0–{classes - 1}; pass one of them")


def resolve_model(model: str | None) -> tuple[str, Path]:
    """(display name, folder) for an embedded model name, a folder path, or None (the default model)."""
    name = model or DEFAULT_MODEL
    if name in EMBEDDED:
        return name, EMBEDDED[name]
    folder = Path(name).expanduser()
    if not folder.exists():
        raise DenoqError(f"model {name!r} is neither an embedded model ({', '.join(sorted(EMBEDDED))}) nor an existing "
                         "folder; pass a diffusers pipeline folder (model_index.json, unet/, scheduler/)")
    if not folder.is_dir():
        raise DenoqError(f"model {name!r} is a file; pass the diffusers pipeline folder that holds model_index.json")
    return str(folder), folder



def _denoiser_class(folder: Path) -> tuple[str, str]:
    """(class name, component folder) of the pipeline's denoiser (`unet` or `transformer`)."""
    index = read_json(folder / "model_index.json", "model folder")
    component = next((c for c in ("unet", "transformer") if c in index), None)
    if component is None:
        parts = ", ".join(sorted(k for k in index if not k.startswith("_")))
        raise DenoqError(f"model folder {folder} has no unet or transformer (components: {parts}); denoq compiles "
                         f"{', '.join(SUPPORTED_CLASSES)} pipelines")
    entry = index[component]
    cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if SUPPORTED_CLASSES.get(cls) != component:
        raise DenoqError(f"model folder {folder}: {component} is a {cls}, not one of "
                         f"{', '.join(c for c, k in SUPPORTED_CLASSES.items() if k == component)}; pass a pipeline "
                         "folder with a supported denoiser")
    return cls, component


#: denoisers trained for one family of schedulers: SD3 and Flux predict a flow-matching velocity, DiT and PixArt ε
#: (a UNet can be trained either way; its scheduler says which)
VELOCITY_MODELS = ("SD3Transformer2DModel", FLUX)
EPSILON_MODELS = ("DiTTransformer2DModel", PIXART)


def _check_scheduler_family(folder: Path, cls: str, scheduler_config: dict[str, Any]) -> None:
    """Refuse a scheduler of the other family than the one the denoiser class was trained for."""
    got = scheduler_class(scheduler_config)
    if cls in VELOCITY_MODELS and not is_flow(scheduler_config):
        raise DenoqError(f"{folder}: a {cls} predicts a flow-matching velocity but the scheduler is {got}; save the "
                         f"pipeline with its {FLOW_SCHEDULER_CLASS}")
    if cls in EPSILON_MODELS and is_flow(scheduler_config):
        raise DenoqError(f"{folder}: a {cls} predicts ε (and Σ) for DDPM-family schedulers; {got} would integrate "
                         "it as a velocity, save the pipeline with a DDPM / DDIM / DPM-Solver scheduler")


def _weights_hash(model_dir: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _check_dit(folder: Path, config: dict[str, Any]) -> None:
    """A DiT denoq can sample: class-conditional (adaLN-Zero with a label table), predicting ε, or ε and its
    variance (`ModelSpec.learned_variance`)."""
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or not config.get("num_embeds_ada_norm"):
        raise DenoqError(f"{folder}: denoq compiles class-conditional DiTs (norm_type ada_norm_zero with "
                         "num_embeds_ada_norm classes); this config has neither")
    out, inp = config.get("out_channels"), config.get("in_channels", 4)
    if out is not None and out not in (inp, 2 * inp):
        raise DenoqError(f"{folder}: out_channels {out} is neither in_channels {inp} (ε) nor twice it (ε and the "
                         "learned variance Σ, as DiT-XL/2 ships); re-save a model with one of those")


def _sample_shape(cls: str, config: dict[str, Any], size: int) -> tuple[int, int, int] | tuple[int, int]:
    """(C, H, W) of the latent the denoiser reads (`size` > 0 overrides the config's sample_size), or Flux's packed
    (tokens, channels): a latent of `in_channels` / 4 channels and FLUX_LATENT (or `size`) squared, in 2 × 2
    patches."""
    if cls == FLUX:
        side = size or FLUX_LATENT
        if side % 2:
            raise DenoqError(f"calib.size={side}: Flux packs the latent in 2 × 2 patches; give an even size")
        return (side // 2) ** 2, int(config.get("in_channels", 64))
    sample = config.get("sample_size", 32)
    h, w = (size, size) if size else (sample, sample) if isinstance(sample, int) else tuple(sample)
    return int(config.get("in_channels", 4)), int(h), int(w)


def load_model(model: str | None = None, size: int = 0) -> ModelSpec:
    """Load the denoiser (float32, eval mode, CPU) and its scheduler config, its sample `size` × `size` when
    given (`calib.size`); every failure is a DenoqError."""
    name, folder = resolve_model(model)
    cls, component = _denoiser_class(folder)
    model_dir = folder / component
    config = read_json(model_dir / "config.json", component)
    if cls == "DiTTransformer2DModel":
        _check_dit(model_dir, config)
    if not any(model_dir.glob("*.safetensors")):
        raise DenoqError(f"{component} folder {model_dir} has no .safetensors weights; save the pipeline with "
                         "safe_serialization=True")
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json", "scheduler")
    _check_scheduler_family(folder, cls, scheduler_config)
    index = read_json(folder / "model_index.json", "model folder")
    text = None
    if cls == "UNet2DConditionModel":
        text = text_model(folder, index, config)
    elif cls in PIPELINES:
        text = transformer_text(folder, index, cls, config, text_prompts(folder))
    sample_shape = _sample_shape(cls, config, size)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = getattr(diffusers, cls).from_pretrained(model_dir, torch_dtype=torch.float32,
                                                             low_cpu_mem_usage=False)
    except Exception as exc:  # diffusers/safetensors raise many types for corrupt or mismatched files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DenoqError(f"cannot load {cls} from {model_dir}: {first}; the weights are corrupt or do not match "
                         "config.json (re-save the pipeline)") from exc
    module = module.eval().requires_grad_(False)
    cond_shape, cond_input, num_classes = None, None, None
    if text is not None:
        cond_shape, cond_input = (text.tokens, text.width), "encoder_hidden_states"
    elif cls == "DiTTransformer2DModel":
        cond_shape, cond_input, num_classes = (), "class_labels", int(config["num_embeds_ada_norm"])
    elif config.get("num_class_embeds"):
        if config.get("class_embed_type") is not None:
            raise DenoqError(f"{model_dir}: class_embed_type {config['class_embed_type']!r} is not supported; denoq "
                             "compiles UNet2DModel class conditioning through num_class_embeds (an embedding table)")
        cond_shape, cond_input, num_classes = (), "class_labels", int(config["num_class_embeds"]) - 1
    return ModelSpec(name=name, folder=folder, module=module, model_class=cls, scheduler_config=scheduler_config,
                     sample_shape=sample_shape, cond_shape=cond_shape, weights_sha256=_weights_hash(model_dir),
                     cond_input=cond_input, num_classes=num_classes, text=text,
                     checkpoint=tuple(sorted(model_dir.glob("*.safetensors"))))
