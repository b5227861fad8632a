"""Load a model to compile: a local diffusers pipeline folder or an embedded model by name → ModelSpec.

A pipeline folder is what `DiffusionPipeline.save_pretrained` writes: `model_index.json`, `unet/` or `transformer/`
(config.json and safetensors weights) and `scheduler/scheduler_config.json`. Supported denoisers: `UNet2DModel`
(unconditional, or class-conditional with `num_class_embeds`: conditioning input `class_labels`, int64 [B], the
last class embedding being the null label of classifier-free guidance), `UNet2DConditionModel` (conditioning input
`encoder_hidden_states`, the pipeline's text side in `pipelines`) and `DiTTransformer2DModel` in pixel space
(class-conditional: `class_labels`, labels 0 … num_embeds_ada_norm − 1, null label num_embeds_ada_norm; with or
without learned variance, out_channels = 2 × or 1 × in_channels). Nothing is fetched from a hub.
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

from denoq.compiler.pipelines import TextModel, read_json, text_model
from denoq.errors import DenoqError
from denoq.models import DEFAULT_MODEL, EMBEDDED

SUPPORTED_CLASSES = {"UNet2DModel": "unet", "UNet2DConditionModel": "unet", "DiTTransformer2DModel": "transformer"}
COND_TOKENS = 77  # CLIP's context length: encoder_hidden_states of a UNet without a tokenizer


@dataclass
class ModelSpec:
    """What the compiler knows about the model: the module, its input shapes and its scheduler config."""

    name: str
    folder: Path
    module: nn.Module
    model_class: str
    scheduler_config: dict[str, Any]
    sample_shape: tuple[int, int, int]
    cond_shape: tuple[int, ...] | None
    weights_sha256: str
    cond_input: str | None = None  # graph input of the conditioning: encoder_hidden_states | class_labels | None
    num_classes: int | None = None  # class_labels models: labels 0 … num_classes − 1; num_classes is the null label
    text: TextModel | None = None  # text-conditioned UNets: the pipeline's text side (`pipelines.TextModel`)

    @property
    def resolution_multiple(self) -> int:
        """A UNet's latent height and width are dynamic in the graph, in multiples of its downsampling factor."""
        if self.model_class == "DiTTransformer2DModel":
            return 0
        return 2 ** (len(self.module.config.block_out_channels) - 1)

    @property
    def learned_variance(self) -> bool:
        """Whether the model also predicts its variance: out_channels = 2 × in_channels (DiT's Σ; the graph's
        output holds both, the samplers read `denoq.sampling.cond.split_variance`)."""
        return int(self.module.config.get("out_channels") or self.sample_shape[0]) == 2 * self.sample_shape[0]

    @property
    def io_layers(self) -> dict[str, str]:
        """The recipe aliases `@in` / `@out`: the layer that reads the sample and the one that writes the output."""
        if self.model_class == "DiTTransformer2DModel":
            return {"@in": "pos_embed.proj", "@out": "proj_out_2"}
        return {"@in": "conv_in", "@out": "conv_out"}

    def layer_patterns(self, text: str) -> tuple[str, ...]:
        """Comma-separated module-name patterns (a recipe value) with `@in` / `@out` resolved (`io_layers`)."""
        patterns = tuple(p.strip() for p in text.split(",") if p.strip())
        unknown = [p for p in patterns if p.startswith("@") and p not in self.io_layers]
        if unknown:
            raise DenoqError(f"layer alias {unknown[0]!r} is not known; use @in or @out, or module-name patterns")
        return tuple(self.io_layers.get(p, p) for p in patterns)

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


def load_model(model: str | None = None) -> ModelSpec:
    """Load the denoiser (float32, eval mode, CPU) and its scheduler config; every failure is a DenoqError."""
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
    size = config.get("sample_size", 32)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    sample_shape = (int(config.get("in_channels", 4)), int(h), int(w))
    cond_shape, cond_input, num_classes, text = None, None, None, None
    if cls == "UNet2DConditionModel":
        text = text_model(folder, read_json(folder / "model_index.json", "model folder"), config)
        cond_shape, cond_input = (text.tokens, int(config["cross_attention_dim"])), "encoder_hidden_states"
    elif cls == "DiTTransformer2DModel":
        cond_shape, cond_input, num_classes = (), "class_labels", int(config["num_embeds_ada_norm"])
    elif config.get("num_class_embeds"):
        if config.get("class_embed_type") is not None:
            raise DenoqError(f"{model_dir}: class_embed_type {config['class_embed_type']!r} is not supported; denoq "
                             "compiles UNet2DModel class conditioning through num_class_embeds (an embedding table)")
        cond_shape, cond_input, num_classes = (), "class_labels", int(config["num_class_embeds"]) - 1
    return ModelSpec(name=name, folder=folder, module=module, model_class=cls, scheduler_config=scheduler_config,
                     sample_shape=sample_shape, cond_shape=cond_shape, weights_sha256=_weights_hash(model_dir),
                     cond_input=cond_input, num_classes=num_classes, text=text)
