"""Text conditioning of Stable Diffusion 1.x/2.x and SDXL pipelines for calibration (docs/architecture.md,
Text-to-image pipelines).

The prompts are encoded by the pipeline's own text encoder(s) through diffusers' `encode_prompt`, as the pipeline
itself encodes them: the prompt embeddings `[N, 77, D]`, and the empty prompt's as the null half of classifier-free
guidance. SDXL (`addition_embed_type="text_time"`) adds the pooled embedding of its second encoder as `text_embeds`
and its micro-conditioning `time_ids` = (original size, crop top-left, target size) = (H, W, 0, 0, H, W) in pixels
(Podell et al. 2023, §2.2), as `StableDiffusionXLPipeline` builds them for an uncropped image at the model's
resolution. The result is a tensor (SD) or a `Conditioning` (SDXL) for the calibration trajectories.

Without text encoders (a bare UNet folder) the conditioning comes from `calib.embeddings`: a safetensors file with
what `encode_prompt` returns — `prompt_embeds` [N, L, D] and `negative_prompt_embeds` ([1 or N, L, D]), for SDXL
also `pooled_prompt_embeds` [N, P] and `negative_pooled_prompt_embeds`, and optionally `time_ids` [N or 1, 6].
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


def load_text_pipeline(folder: Path, pipeline_class: str, unet: torch.nn.Module) -> Any:
    """The diffusers pipeline of `folder` around the already-loaded `unet` (float32, CPU, no safety checker),
    for its `encode_prompt` and `vae_scale_factor`."""
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
        if pipeline_class == "StableDiffusionPipeline" else {}
    try:
        with quiet_libraries():
            import diffusers

            pipe = getattr(diffusers, pipeline_class).from_pretrained(folder, unet=unet, torch_dtype=torch.float32,
                                                                      low_cpu_mem_usage=False, **extra)
    except Exception as exc:  # diffusers/transformers raise many types for a broken component
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DenoqError(f"cannot load the {pipeline_class} of {folder}: {first}; re-save the pipeline") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: list[str], sample_hw: tuple[int, int], sdxl: bool,
                   batch: int = 64) -> tuple[Cond, Cond]:
    """(conditioning of `prompts`, the empty prompt's) as the pipeline computes them for classifier-free
    guidance; `sample_hw` is the latent size (SDXL's time ids are in pixels: × `pipe.vae_scale_factor`)."""
    conds, nulls = [], None
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo:lo + batch]
        out = pipe.encode_prompt(prompt=chunk, device=torch.device("cpu"), num_images_per_prompt=1,
                                 do_classifier_free_guidance=True)
        conds.append(out)
        nulls = nulls or out
    if not sdxl:
        return torch.cat([c[0] for c in conds]).float(), nulls[1][:1].float()
    h, w = (s * pipe.vae_scale_factor for s in sample_hw)
    pe, pooled = torch.cat([c[0] for c in conds]).float(), torch.cat([c[2] for c in conds]).float()
    cond = Conditioning({TEXT_INPUT: pe, "text_embeds": pooled, "time_ids": time_ids(h, w, len(prompts))})
    null = Conditioning({TEXT_INPUT: nulls[1][:1].float(), "text_embeds": nulls[3][:1].float(),
                         "time_ids": time_ids(h, w, 1)})
    return cond, null


def read_embeddings(path: str, n: int, shapes: dict[str, tuple[int, ...]], sample_hw: tuple[int, int]
                    ) -> tuple[Cond, Cond]:
    """(conditioning, null) from a `calib.embeddings` safetensors file, rows cycled to `n`; `shapes` are the
    per-sample shapes the UNet takes (`encoder_hidden_states` with its token length free, SDXL's added
    conditions). DenoqError naming the tensor for a missing file, a missing tensor or a wrong shape."""
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise DenoqError(f"calib.embeddings={path}: no such file; give a safetensors file with prompt_embeds and "
                         "negative_prompt_embeds (what the pipeline's encode_prompt returns)")
    try:
        data = load_file(str(p))
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise DenoqError(f"calib.embeddings={path}: not a readable safetensors file ({exc}); save it with "
                         "safetensors.torch.save_file") from exc
    sdxl = "text_embeds" in shapes
    names = {"prompt_embeds": TEXT_INPUT, "negative_prompt_embeds": TEXT_INPUT}
    if sdxl:
        names.update({"pooled_prompt_embeds": "text_embeds", "negative_pooled_prompt_embeds": "text_embeds"})
    for name, role in names.items():
        if name not in data:
            raise DenoqError(f"calib.embeddings={path} has no {name!r} (it has {', '.join(sorted(data))}); save "
                             f"{', '.join(names)} as encode_prompt returns them")
        want = shapes[role]
        got = tuple(data[name].shape)
        ok = len(got) == len(want) + 1 and all(w is None or g == w for g, w in zip(got[1:], want, strict=True))
        if not ok:
            spec = ", ".join("L" if w is None else str(w) for w in want)
            raise DenoqError(f"calib.embeddings={path}: {name} has shape {list(got)}, the UNet takes [N, {spec}]; "
                             "encode the prompts with this model's text encoder(s)")
    rows = torch.arange(n) % data["prompt_embeds"].shape[0]
    pe, npe = data["prompt_embeds"].float()[rows], data["negative_prompt_embeds"].float()[:1]
    if pe.shape[1] != npe.shape[1]:
        raise DenoqError(f"calib.embeddings={path}: prompt_embeds has {pe.shape[1]} tokens, negative_prompt_embeds "
                         f"{npe.shape[1]}; encode both to the same length")
    if not sdxl:
        return pe, npe
    ids = data.get("time_ids")
    ids = time_ids(*(8 * s for s in sample_hw), 1) if ids is None else ids.float().reshape(-1, TIME_IDS)
    cond = Conditioning({TEXT_INPUT: pe, "text_embeds": data["pooled_prompt_embeds"].float()[rows],
                         "time_ids": ids[torch.arange(n) % ids.shape[0]]})
    null = Conditioning({TEXT_INPUT: npe, "text_embeds": data["negative_pooled_prompt_embeds"].float()[:1],
                         "time_ids": ids[:1]})
    return cond, null


def random_text(n: int, shapes: dict[str, tuple[int, ...]], tokens: int, sample_hw: tuple[int, int],
                seed: int) -> tuple[Cond, Cond]:
    """N(0, 1) embeddings of `tokens` tokens (and pooled embeddings), seeded; SDXL's time ids are the real ones
    (8× the latent size). Unrepresentative: calibration ranges taken on them need not match any prompt."""
    g = torch.Generator().manual_seed(seed)
    width = shapes[TEXT_INPUT][-1]
    text = torch.randn((n + 1, tokens, width), generator=g)
    if "text_embeds" not in shapes:
        return text[1:], text[:1]
    pooled = torch.randn((n + 1, *shapes["text_embeds"]), generator=g)
    ids = time_ids(*(8 * s for s in sample_hw), n + 1)
    both = Conditioning({TEXT_INPUT: text, "text_embeds": pooled, "time_ids": ids})
    return both[1:], both[:1]


def text_condition(spec: Any, prompts_file: str, embeddings_file: str, random: bool, n: int,
                   seed: int) -> TextCondition:
    """The calibration conditioning of the text model `spec` (a `ModelSpec` with `.text`) for n trajectories:
    N(0, 1) embeddings when `random`, else the embeddings file, else the prompts (`prompts_file`, or the model's
    own, or `DEFAULT_PROMPTS`) encoded by the pipeline (trajectory i takes prompt i mod the number of prompts)."""
    text = spec.text
    hw = tuple(spec.sample_shape[1:])
    if random:
        cond, null = random_text(n, text.shapes(), text.tokens, hw, seed)
        return TextCondition(cond, null, "random")
    if embeddings_file:
        cond, null = read_embeddings(embeddings_file, n, text.shapes(), hw)
        return TextCondition(cond, null, "embeddings")
    prompts = read_prompts(prompts_file) if prompts_file else list(text.default_prompts or DEFAULT_PROMPTS)
    pipe = load_text_pipeline(text.folder, text.pipeline_class, spec.module)
    chosen = cycle(prompts, n)
    cond, null = encode_prompts(pipe, chosen, hw, text.sdxl)
    return TextCondition(cond, null, "prompts", tuple(chosen))
