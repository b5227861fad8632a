"""Text conditioning of text-to-image pipelines for calibration (docs/architecture.md, Text-to-image pipelines).

The prompts are encoded by the pipeline's own text encoder(s) through diffusers' `encode_prompt`, as the pipeline
itself encodes them, and the negative (empty) prompt's encoding is the null half of classifier-free guidance:

- SD 1.x/2.x: `encoder_hidden_states` [N, 77, D], a tensor;
- SDXL: adds the second encoder's pooled embedding `text_embeds` and the micro-conditioning `time_ids` = (original
  size, crop top-left, target size) = (H, W, 0, 0, H, W) in pixels (Podell et al. 2023, §2.2), as
  `StableDiffusionXLPipeline` builds them for an uncropped image at the model's resolution;
- PixArt: T5's states and their `encoder_attention_mask`; PixArt-α at 1024 px its `resolution` (H, W in pixels)
  and `aspect_ratio` (H / W);
- SD3: CLIP-L ‖ CLIP-G ‖ T5 states and the pooled `pooled_projections`;
- Flux: T5's states, CLIP's pooled `pooled_projections`, the RoPE ids `txt_ids` (zeros, one per token) and
  `img_ids` (0, row, column of each 2 × 2 patch), and Flux-dev's distilled `guidance` (FluxPipeline's default 3.5).

A prompt longer than an encoder's maximum is refused (the pipeline would cut it silently). Without text encoders
(a bare denoiser folder) the conditioning comes from `calib.embeddings`: a safetensors file with what
`encode_prompt` returns — `prompt_embeds` [N, L, D] and `negative_prompt_embeds` ([1 or N, L, D]; optional for
Flux), SDXL/SD3/Flux also `pooled_prompt_embeds` [N, P] and `negative_pooled_prompt_embeds`, PixArt
`prompt_attention_mask` [N, L] and `negative_prompt_attention_mask`, SDXL optionally `time_ids` [N or 1, 6].
`calib.conditioning=random` instead draws N(0, 1) embeddings: an explicit opt-in, flagged as unrepresentative.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from denoq.compiler.pipelines import TextModel, read_json
from denoq.compiler.transformer_pipelines import CLIP_TOKENS, T5_TOKENS
from denoq.errors import DenoqError
from denoq.sampling.cond import TEXT_INPUT, Cond, Conditioning

#: used when `calib.prompts` is empty and the model ships no prompts of its own: varied subjects, styles and
#: compositions, as calibration sets of text-to-image PTQ papers draw from captions
DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a windowsill", "a red sports car parked on a city street at night",
    "a bowl of fresh fruit on a wooden table", "a mountain lake at sunrise with mist over the water",
    "an astronaut riding a horse on the moon", "a portrait of an old man with a white beard, oil painting",
    "a busy market street in a small town, watercolor", "a close-up of a sunflower with a bee",
    "a futuristic city skyline with flying cars", "a cozy living room with a fireplace and a sofa",
    "a dog running on a beach", "a plate of spaghetti with tomato sauce",
    "a snowy forest with a wooden cabin", "a pencil sketch of a lighthouse on a cliff",
    "a group of people playing football in a park", "an abstract painting with bold colors",
    "a steaming cup of coffee next to a laptop", "a medieval castle on a hill under a cloudy sky",
    "a tropical beach with palm trees", "a robot reading a book in a library",
    "a bicycle leaning against a brick wall", "a bird perched on a branch in the rain",
    "a bowl of ramen, studio lighting", "a desert landscape with sand dunes at sunset",
    "a child drawing with crayons", "a vintage train crossing a bridge",
    "a pixel art scene of a village", "an underwater coral reef with fish",
    "a black and white photo of a jazz musician", "a field of lavender under a blue sky",
    "a 3d render of a glass chess set", "a street food stall in the evening",
)
TIME_IDS = 6
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale


@dataclass(frozen=True)
class TextCondition:
    """Calibration conditioning of a text model: `cond` (N rows, tensor or `Conditioning`), `null` (the empty
    prompt's, one row), where it came from (`source`: prompts | embeddings | random) and `prompts` (when encoded)."""

    cond: Cond
    null: Cond
    source: str
    prompts: tuple[str, ...] = ()

    @property
    def representative(self) -> bool:
        return self.source != "random"


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of the prompts file `path`; DenoqError for a missing, unreadable or empty file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DenoqError(f"calib.prompts={path}: no such file; give a text file with one prompt a line")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DenoqError(f"calib.prompts={path}: cannot read it ({exc}); give a UTF-8 text file") from exc
    prompts = [line for line in lines if line]
    if not prompts:
        raise DenoqError(f"calib.prompts={path} holds no prompt; write one prompt a line")
    return prompts


def cycle(prompts: list[str], n: int) -> list[str]:
    """`n` prompts: the list repeated in order (trajectory i takes prompt i mod len)."""
    return [prompts[i % len(prompts)] for i in range(n)]


def time_ids(height: int, width: int, n: int) -> torch.Tensor:
    """SDXL's micro-conditioning for n uncropped images of `height` × `width` pixels: [n, 6]."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(n, TIME_IDS).clone()


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers' and transformers' own warnings and loading bars off (denoq reports what matters itself)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error(), tlog.set_verbosity_error()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(levels[0]), tlog.set_verbosity(levels[1])
        for enabled, lib in zip(bars, (dlog, tlog), strict=True):
            (lib.enable_progress_bar if enabled else lib.disable_progress_bar)()


def load_text_pipeline(folder: Path, pipeline_class: str, denoiser: torch.nn.Module) -> Any:
    """The diffusers pipeline of `folder` around the already-loaded `denoiser` (float32, CPU, no safety
    checker), for its `encode_prompt`, tokenizers and `vae_scale_factor`. Components model_index.json leaves out
    (`[null, null]`, e.g. SD3 without T5) are passed as None, as diffusers asks."""
    extra: dict[str, Any] = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
        if pipeline_class == "StableDiffusionPipeline" else {}
    index = read_json(folder / "model_index.json", "model folder")
    extra.update({k: None for k, v in sorted(index.items()) if isinstance(v, list) and v == [None, None]})
    extra["unet" if type(denoiser).__name__.startswith("UNet") else "transformer"] = denoiser
    try:
        with quiet_libraries():
            import diffusers

            pipe = getattr(diffusers, pipeline_class).from_pretrained(folder, torch_dtype=torch.float32,
                                                                      low_cpu_mem_usage=False, **extra)
    except Exception as exc:  # diffusers/transformers raise many types for a broken component
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DenoqError(f"cannot load the {pipeline_class} of {folder}: {first}; re-save the pipeline") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_conditions(text: TextModel, n: int, sample_hw: tuple[int, int], grid: tuple[int, int], vae_scale: int,
                     tokens: int) -> dict[str, torch.Tensor]:
    """The conditioning inputs that come from the image, not the prompt (`TextModel.image_conditions`), for n
    rows: `sample_hw` is the latent size, `grid` the patch grid (Flux's `img_ids`), `vae_scale` the VAE's
    factor (pixel sizes), `tokens` the text's token count (Flux's `txt_ids`)."""
    h, w = (s * vae_scale for s in sample_hw)
    out: dict[str, torch.Tensor] = {}
    for name in text.image_conditions():
        if name == "time_ids":
            out[name] = time_ids(h, w, n)
        elif name == "resolution":
            out[name] = torch.tensor([[h, w]], dtype=torch.float32).expand(n, 2).clone()
        elif name == "aspect_ratio":
            out[name] = torch.full((n, 1), h / w, dtype=torch.float32)
        elif name == "guidance":
            out[name] = torch.full((n,), FLUX_GUIDANCE, dtype=torch.float32)
        elif name == "txt_ids":
            out[name] = torch.zeros(tokens, 3)
        else:  # img_ids: (0, row, column) of each patch, row-major as the packed tokens
            rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
            out[name] = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return out


def _with_image(text: TextModel, named: dict[str, torch.Tensor], hw: tuple[int, int], grid: tuple[int, int],
                vae_scale: int) -> Cond:
    """The conditioning of text tensors `named` (rows × …): a tensor for SD 1.x/2.x, else a `Conditioning` with the
    image conditions added."""
    if len(named) == 1 and not text.image_conditions():
        return named[TEXT_INPUT]
    n, tokens = named[TEXT_INPUT].shape[:2]
    return Conditioning({**named, **image_conditions(text, n, hw, grid, vae_scale, tokens)})


def check_prompt_lengths(pipe: Any, text: TextModel, prompts: list[str]) -> None:
    """Refuse, in one line, a prompt with more tokens than one of the pipeline's encoders takes (77 for CLIP,
    the pipeline's `max_sequence_length` for T5) — the pipeline would cut it without a word."""
    for attr in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, attr, None)
        if tok is None:
            continue
        limit = CLIP_TOKENS if type(tok).__name__.startswith("CLIP") else T5_TOKENS.get(text.pipeline_class,
                                                                                          tok.model_max_length)
        for prompt in sorted(set(prompts)):
            count = len(tok(prompt).input_ids)
            if count > limit:
                raise DenoqError(f"calibration prompt {prompt[:40]!r}… has {count} tokens, {attr} takes {limit}; "
                                 "shorten it (the pipeline would cut it)")


@torch.no_grad()
def _encode_chunk(pipe: Any, text: TextModel, prompts: list[str]) -> tuple[dict[str, torch.Tensor],
                                                                            dict[str, torch.Tensor]]:
    """(the prompts' text tensors, the negative prompt's first row), named as the denoiser's inputs."""
    cpu, cls = torch.device("cpu"), text.denoiser
    if cls == "FluxTransformer2DModel":
        pe, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=cpu, num_images_per_prompt=1,
                                           max_sequence_length=text.tokens)
        npe, npooled, _ = pipe.encode_prompt(prompt=[""], prompt_2=None, device=cpu, num_images_per_prompt=1,
                                             max_sequence_length=text.tokens)
        return {TEXT_INPUT: pe, "pooled_projections": pooled}, {TEXT_INPUT: npe, "pooled_projections": npooled}
    if cls == "PixArtTransformer2DModel":
        pe, mask, npe, nmask = pipe.encode_prompt(prompts, do_classifier_free_guidance=True, device=cpu,
                                                  num_images_per_prompt=1, max_sequence_length=text.tokens)
        return {TEXT_INPUT: pe, "encoder_attention_mask": mask.float()}, \
            {TEXT_INPUT: npe[:1], "encoder_attention_mask": nmask[:1].float()}
    if cls == "SD3Transformer2DModel":
        pe, npe, pooled, npooled = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=cpu,
                                                      num_images_per_prompt=1, do_classifier_free_guidance=True,
                                                      max_sequence_length=T5_TOKENS[text.pipeline_class])
        return {TEXT_INPUT: pe, "pooled_projections": pooled}, {TEXT_INPUT: npe[:1], "pooled_projections": npooled[:1]}
    out = pipe.encode_prompt(prompt=prompts, device=cpu, num_images_per_prompt=1, do_classifier_free_guidance=True)
    if not text.sdxl:
        return {TEXT_INPUT: out[0]}, {TEXT_INPUT: out[1][:1]}
    return {TEXT_INPUT: out[0], "text_embeds": out[2]}, {TEXT_INPUT: out[1][:1], "text_embeds": out[3][:1]}


def encode_prompts(pipe: Any, text: TextModel, prompts: list[str], sample_hw: tuple[int, int],
                   grid: tuple[int, int], batch: int = 64) -> tuple[Cond, Cond]:
    """(conditioning of `prompts`, the negative prompt's) as the pipeline computes them for classifier-free
    guidance; `sample_hw` is the latent size, `grid` the patch grid (`image_conditions`)."""
    check_prompt_lengths(pipe, text, prompts)
    parts, null = [], None
    for lo in range(0, len(prompts), batch):
        named, negative = _encode_chunk(pipe, text, prompts[lo:lo + batch])
        parts.append(named)
        null = null or negative
    named = {k: torch.cat([p[k] for p in parts]).float() for k in parts[0]}
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    return _with_image(text, named, sample_hw, grid, scale), \
        _with_image(text, {k: v.float() for k, v in null.items()}, sample_hw, grid, scale)


def _load_embeddings(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise DenoqError(f"calib.embeddings={path}: no such file; give a safetensors file with prompt_embeds and "
                         "negative_prompt_embeds (what the pipeline's encode_prompt returns)")
    try:
        return load_file(str(p))
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise DenoqError(f"calib.embeddings={path}: not a readable safetensors file ({exc}); save it with "
                         "safetensors.torch.save_file") from exc


def read_embeddings(path: str, text: TextModel, n: int, sample_hw: tuple[int, int], grid: tuple[int, int]
                    ) -> tuple[Cond, Cond]:
    """(conditioning, null) from a `calib.embeddings` safetensors file, rows cycled to `n`, checked against the
    per-sample shapes the denoiser takes (`TextModel.shapes`). DenoqError naming the tensor for a missing file, a
    missing tensor or a wrong shape. Flux's file may leave out the negatives (its null is then the prompts')."""
    data = _load_embeddings(path)
    shapes = text.shapes()
    inputs = {"prompt_embeds": TEXT_INPUT, "pooled_prompt_embeds": text.pooled_input,
              "prompt_attention_mask": "encoder_attention_mask"}  # what encode_prompt returns → the input it feeds
    roles = {name: role for name, role in inputs.items() if role in shapes}
    optional = text.denoiser == "FluxTransformer2DModel"
    wanted = [*roles, *(f"negative_{name}" for name in roles if not optional)]
    for name in wanted:
        if name not in data:
            raise DenoqError(f"calib.embeddings={path} has no {name!r} (it has {', '.join(sorted(data))}); save "
                             f"{', '.join(wanted)} as encode_prompt returns them")
    for name, role in roles.items():
        for key in (name, f"negative_{name}"):
            if key not in data:
                continue
            want, got = shapes[role], tuple(data[key].shape)
            ok = len(got) == len(want) + 1 and all(w is None or g == w for g, w in zip(got[1:], want, strict=True))
            if not ok:
                spec = ", ".join("L" if w is None else str(w) for w in want)
                raise DenoqError(f"calib.embeddings={path}: {key} has shape {list(got)}, the model takes "
                                 f"[N, {spec}]; encode the prompts with this model's text encoder(s)")
    rows = torch.arange(n) % data["prompt_embeds"].shape[0]
    named = {role: data[name].float()[rows] for name, role in roles.items()}
    negative = {role: data.get(f"negative_{name}", data[name]).float()[:1] for name, role in roles.items()}
    if named[TEXT_INPUT].shape[1] != negative[TEXT_INPUT].shape[1]:
        raise DenoqError(f"calib.embeddings={path}: prompt_embeds has {named[TEXT_INPUT].shape[1]} tokens, "
                         f"negative_prompt_embeds {negative[TEXT_INPUT].shape[1]}; encode both to the same length")
    cond, null = _with_image(text, named, sample_hw, grid, 8), _with_image(text, negative, sample_hw, grid, 8)
    if text.sdxl and "time_ids" in data:
        ids = data["time_ids"].float().reshape(-1, TIME_IDS)
        cond = Conditioning({**cond.tensors, "time_ids": ids[torch.arange(n) % ids.shape[0]]})
        null = Conditioning({**null.tensors, "time_ids": ids[:1]})
    return cond, null


def random_text(text: TextModel, n: int, sample_hw: tuple[int, int], grid: tuple[int, int],
                seed: int) -> tuple[Cond, Cond]:
    """N(0, 1) embeddings of the model's token length (and pooled embeddings; PixArt's mask all ones), seeded;
    the image conditions are the real ones (8× the latent size). Unrepresentative: calibration ranges taken on them
    need not match any prompt."""
    g = torch.Generator().manual_seed(seed)
    named: dict[str, torch.Tensor] = {}
    for name, shape in text.shapes().items():
        full = tuple(text.tokens if s is None else s for s in shape)
        named[name] = torch.ones((n + 1, *full)) if name == "encoder_attention_mask" else \
            torch.randn((n + 1, *full), generator=g)
    both = _with_image(text, named, sample_hw, grid, 8)
    return both[1:], both[:1]


def text_condition(spec: Any, prompts_file: str, embeddings_file: str, random: bool, n: int,
                   seed: int) -> TextCondition:
    """The calibration conditioning of the text model `spec` (a `ModelSpec` with `.text`) for n trajectories:
    N(0, 1) embeddings when `random`, else the embeddings file, else the prompts (`prompts_file`, or the model's
    own, or `DEFAULT_PROMPTS`) encoded by the pipeline (trajectory i takes prompt i mod the number of prompts)."""
    text = spec.text
    hw, grid = spec.latent_hw, spec.token_grid
    if random:
        cond, null = random_text(text, n, hw, grid, seed)
        return TextCondition(cond, null, "random")
    if embeddings_file:
        cond, null = read_embeddings(embeddings_file, text, n, hw, grid)
        return TextCondition(cond, null, "embeddings")
    prompts = read_prompts(prompts_file) if prompts_file else list(text.default_prompts or DEFAULT_PROMPTS)
    pipe = load_text_pipeline(text.folder, text.pipeline_class, spec.module)
    chosen = cycle(prompts, n)
    cond, null = encode_prompts(pipe, text, chosen, hw, grid)
    return TextCondition(cond, null, "prompts", tuple(chosen))
