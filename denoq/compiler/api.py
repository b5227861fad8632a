"""The Python API: `denoq.quantize` compiles a model into an artifact, `denoq.load` gives its quantized denoiser
back as a drop-in `torch.nn.Module` for a diffusers pipeline (docs/architecture.md, The drop-in). The CLI's compile is
the same call.

    art = denoq.quantize("my-pipeline-folder", "w8a8", out="art", weights__method="gptq")
    pipe = DDIMPipeline(unet=denoq.load("art", backend="ort"), scheduler=DDIMScheduler.from_config(...))
    images = pipe(batch_size=4, num_inference_steps=50).images
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from denoq.calibrators.calibset import CalibrationSet, record_calls
from denoq.calibrators.distributed import is_main
from denoq.compiler.artifact import Artifact
from denoq.compiler.artifact_writer import check_output_dir
from denoq.compiler.backend_names import BACKENDS
from denoq.compiler.data_parallel import on_main
from denoq.compiler.load import load_model
from denoq.compiler.mixed_compile import compile_mixed
from denoq.compiler.pipeline import compile_model
from denoq.compiler.recipe import Recipe, load_recipe
from denoq.errors import DenoqError
from denoq.log import verbose
from denoq.sampling.cond import COND_INPUTS, TEXT_INPUT, Cond, Conditioning

#: The diffusers output class each denoiser class returns (module, class name).
OUTPUT_CLASSES = {
    "UNet2DModel": ("diffusers.models.unets.unet_2d", "UNet2DOutput"),
    "UNet2DConditionModel": ("diffusers.models.unets.unet_2d_condition", "UNet2DConditionOutput"),
    **{cls: ("diffusers.models.modeling_outputs", "Transformer2DModelOutput") for cls in (
        "DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel")},
}
CUDA_BACKENDS = ("trt", "ort-cuda", "ort-trt")


def _set_items(keys: Mapping[str, Any]) -> list[str]:
    """`--set` items of Python keyword arguments: `weights__bits=4` → `weights.bits=4`, booleans as true/false."""
    items = []
    for key, value in keys.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        items.append(f"{key.replace('__', '.')}={text}")
    return items


def _source_folder(model: Any, scheduler: Any, out: Path) -> str | None:
    """The pipeline folder or embedded name to compile: `model` itself when it is one, else a diffusers pipeline
    or model object saved with `save_pretrained` beside the artifact as `OUT-model/` (the FP reference that the
    torch backends and denoq eval reload)."""
    if model is None or isinstance(model, str | Path):
        if scheduler is not None:
            raise DenoqError("scheduler= goes with a model object; a pipeline folder brings its own scheduler/ "
                             "(save the scheduler you want into it)")
        return None if model is None else str(model)
    if not hasattr(model, "save_pretrained"):
        raise DenoqError(f"model must be a diffusers pipeline or model (save_pretrained), a pipeline folder or an "
                         f"embedded model name, not {type(model).__name__}")
    folder = out.with_name(out.name + "-model")  # quantize removes it again when the compile fails
    components = getattr(model, "components", None)
    if components is not None:  # a DiffusionPipeline
        model.save_pretrained(folder)
        if scheduler is not None:
            scheduler.save_pretrained(folder / "scheduler")
        return str(folder)
    if scheduler is None:
        raise DenoqError(f"a bare {type(model).__name__} needs its noise schedule: pass scheduler= (e.g. the "
                         "pipeline's DDPMScheduler)")
    component = "transformer" if "Transformer" in type(model).__name__ else "unet"
    model.save_pretrained(folder / component)
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "DiffusionPipeline", component: ["diffusers", type(model).__name__],
             "scheduler": ["diffusers", type(scheduler).__name__]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return str(folder)


def quantize(model: Any = None, recipe: str = "w8a8", *, out: str | Path, scheduler: Any = None,
             calib: Callable[[torch.nn.Module], Any] | None = None, config: str | Path | None = None,
             force: bool = False, progress: bool = True,
             allow_parity_failure: bool = False, **keys: Any) -> CompiledArtifact | None:
    """Calibrate, export and quantize `model` with the recipe preset `recipe` into the artifact folder `out`.

    `model`: a diffusers pipeline folder (`DiffusionPipeline.save_pretrained`; Stable Diffusion 1.x/2.x and SDXL
    pipelines calibrate on prompts encoded by their own text encoders, `calib__prompts=FILE`), an embedded model
    name (`digits`, `digits-cond`, `digits-dit`, `digits-sd`; None = `digits`), or a diffusers pipeline or denoiser
    object (saved beside the artifact as `OUT-model/`; a bare denoiser needs `scheduler`). `recipe` and `config` (a
    TOML file) as on the command line; `**keys` override recipe keys, with `__` for the dot:
    `weights__method="gptq"`, `activations__timestep_groups=4` (`denoq recipes` lists them). `calib`: None
    calibrates on denoq's own seeded FP trajectories (`calib.sampler`, from the model's noise schedule); a callable
    is Model Optimizer's `forward_loop(model)`: it runs the user's own sampling loop (e.g. the pipeline on the
    user's prompts or labels) and every call it makes to the
    denoiser is recorded as calibration input (`record_calls`: one integral timestep per call, the same rows and
    conditioning at every step). Returns the committed artifact (`CompiledArtifact`: `.sample`, `.evaluate`,
    `.build`, `.load`). `progress`: denoq's messages and progress bars on stderr while it works (`denoq.log`;
    False leaves the user's own logging configuration in charge). Every user error is a DenoqError (one line: the
    problem and the fix), and nothing is written then. Under an initialized process group (data-parallel
    calibration, docs/distributed.md) rank 0 writes and returns the artifact, the other ranks return None; every
    rank runs the whole `forward_loop`, which must make the same calls on each (seeded), and keeps its share of them.
    """
    if calib is not None and not callable(calib):
        raise DenoqError(f"calib= takes None (denoq's own FP sampling trajectories) or a forward_loop(model) "
                         f"callable, not {type(calib).__name__}; calibration prompts go in calib__prompts=FILE")
    out = Path(out)
    rec = load_recipe(recipe, _set_items(keys), None if config is None else Path(config))
    on_main(lambda: check_output_dir(out, force), "checking the output folder")  # before a model object is saved
    saved = out.with_name(out.name + "-model")
    fresh = not saved.exists()
    # under a process group rank 0 alone saves a model object; every rank then loads the saved folder
    source = on_main(lambda: _source_folder(model, scheduler, out), "saving the model beside the artifact")
    source = source if is_main() else _source_name(model, saved)
    try:
        with verbose(progress):
            pool = None if calib is None else _forward_loop_inputs(model, source, calib)
            art = compile_artifact(source, rec, out, force=force, allow_parity_failure=allow_parity_failure,
                                   pool=pool)
            return None if art is None else CompiledArtifact.of(art)
    except BaseException:
        if fresh and source == str(saved) and is_main():  # nothing half-written: the saved model goes too
            shutil.rmtree(saved, ignore_errors=True)
        raise


def _source_name(model: Any, saved: Path) -> str | None:
    """What `_source_folder` returns, without saving anything: `model` itself, or the folder it saves to."""
    return None if model is None else str(model) if isinstance(model, str | Path) else str(saved)


def _forward_loop_inputs(model: Any, source: str | None, forward_loop: Callable[[torch.nn.Module], Any]
                         ) -> CalibrationSet:
    """The inputs `forward_loop(denoiser)` feeds the FP denoiser: the user's own object's (`pipe.unet` /
    `pipe.transformer` of a pipeline, or the model itself), or, for a folder or name, the model loaded from it."""
    spec = load_model(source)
    denoiser = spec.module
    if model is not None and not isinstance(model, str | Path):
        denoiser = next((getattr(model, c) for c in ("unet", "transformer") if hasattr(model, c)), model)
    return record_calls(denoiser, forward_loop, spec.cond_input)


def compile_artifact(model: str | None, recipe: Recipe, out: Path, *, force: bool = False,
                     allow_parity_failure: bool = False,
                     pool: CalibrationSet | None = None) -> Artifact | None:
    """`compile_model` for one plan, `compile_mixed` for a `precision.mixed` recipe (one member per candidate);
    `pool`: calibration inputs from a user's loop (one plan only). None on the ranks ≠ 0 of a process group."""
    if recipe["precision.mixed"]:
        if pool is not None:
            raise DenoqError("precision.mixed chooses its members on denoq's own trajectories; pass calib=None")
        return compile_mixed(model, recipe, out, force=force,
                             allow_parity_failure=allow_parity_failure)
    return compile_model(model, recipe, out, force=force,
                         allow_parity_failure=allow_parity_failure, pool=pool)


class QuantizedDenoiser(torch.nn.Module):
    """An artifact's quantized denoiser as a drop-in for the diffusers model it was compiled from: the same
    `config`, `dtype`, `device`, `forward(sample | hidden_states, timestep, encoder_hidden_states | class_labels,
    added_cond_kwargs=…, return_dict=…, **conditioning)` (the conditioning inputs by the forward's names:
    `pooled_projections`, `img_ids`, `txt_ids`, `guidance`, `encoder_attention_mask`) and output class, so any
    diffusers pipeline and scheduler drives it.
    `forward` runs the artifact's graph on the backend it was loaded with (`denoq sample --backend` names), at the
    scheduler's own timesteps (float ones included: the per-timestep tables are read at the nearest training
    timestep, `denoq.sampling.cond.timestep_index`)."""

    def __init__(self, art: Artifact, backend: str, threads: int | None = None) -> None:
        super().__init__()
        from denoq.compiler.backends import make_backend

        model = art.manifest["model"]
        if "config" not in model:
            raise DenoqError(f"{art.path} records no model config (compiled by an older denoq); recompile it")
        from diffusers.configuration_utils import FrozenDict

        self.artifact, self.backend = art, backend
        self.config = FrozenDict(model["config"])
        self.cond_input = model.get("cond_input")
        module, name = OUTPUT_CLASSES[model["class"]]
        self._output = getattr(__import__(module, fromlist=[name]), name)
        self._eps = make_backend(art, backend, threads=threads)
        self._device = torch.device("cuda" if backend in CUDA_BACKENDS else "cpu")
        if self.config.get("addition_embed_type") == "text_time":  # SDXL's pipeline checks the added-embedding width
            width = int(self.config["projection_class_embeddings_input_dim"])
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self._device

    def cache_context(self, name: str) -> contextlib.AbstractContextManager:
        """diffusers' cache-context hook (FluxPipeline enters one per branch): the graph keeps no cache."""
        return contextlib.nullcontext()

    def forward(self, sample: torch.Tensor | None = None, timestep: torch.Tensor | int | float | None = None,
                encoder_hidden_states: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None, return_dict: bool = True, *,
                hidden_states: torch.Tensor | None = None, **inputs: Any) -> Any:
        """ε (or the model's output) for `sample` (a transformer's `hidden_states`) at `timestep`, as the original
        model's forward returns it. Keyword arguments the graph does not take must be None (diffusers passes e.g.
        `timestep_cond=None`, `joint_attention_kwargs=None`)."""
        sample = hidden_states if sample is None else sample
        named = {k: v for k, v in {**inputs, **(added_cond_kwargs or {})}.items()
                 if v is not None and not (isinstance(v, dict) and not v)}  # e.g. joint_attention_kwargs={}
        unknown = sorted(k for k in named if k not in COND_INPUTS)
        if unknown:
            raise DenoqError(f"the quantized denoiser takes no {', '.join(unknown)}; it was compiled for "
                             f"{self.cond_input or 'no conditioning'}")
        cond: Cond = class_labels if self.cond_input == "class_labels" else encoder_hidden_states
        if named:
            cond = Conditioning({TEXT_INPUT: encoder_hidden_states, **named})
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        out = self._eps(sample.float(), t.expand(sample.shape[0]) if t.numel() == 1 else t, cond)
        out = out.to(sample.dtype)
        return self._output(sample=out) if return_dict else (out,)


class CompiledArtifact(Artifact):
    """An artifact with the commands that use it as methods (what `denoq.quantize` and `denoq.open` return)."""

    @classmethod
    def of(cls, art: Artifact) -> CompiledArtifact:
        return cls(art.path, art.manifest)

    def sample(self, n: int = 16, *, backend: str = "ort", sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
               seed: int = 0, threads: int | None = None, label: int | None = None,
               guidance: float | None = None) -> torch.Tensor:
        """`n` samples `[N, C, H, W]` (model range) from `backend`, as `denoq sample` draws them."""
        from denoq.compiler.generate import generate

        return generate(self, backend, sampler=sampler, steps=steps, eta=eta, seed=seed, n=n, threads=threads,
                        label=label, guidance=guidance)

    def evaluate(self, **settings: Any) -> dict[str, Any]:
        """`denoq eval`: FP vs quantized from the same noise; writes report.json / report.html into the artifact
        and returns the report. `settings`: the fields of `denoq.compiler.evaluate.EvalSettings`."""
        from denoq.compiler.evaluate import EvalSettings, evaluate

        return evaluate(self, EvalSettings(**settings))

    def build(self, profile: str = "", optimization_level: int = 3) -> CompiledArtifact:
        """`denoq build`: the TensorRT engine (an NVIDIA GPU and `denoq[gpu]`)."""
        from denoq.compiler.build import build

        return CompiledArtifact.of(build(self.path, profile, optimization_level))

    def load(self, backend: str = "ort", *, threads: int | None = None) -> QuantizedDenoiser:
        """The drop-in denoiser (`denoq.load`)."""
        return load(self, backend, threads=threads)


def open_artifact(path: str | Path) -> CompiledArtifact:
    """The artifact folder at `path`, checked (`Artifact.open`), with its commands as methods."""
    return CompiledArtifact.of(Artifact.open(Path(path)))


def load(art: str | Path | Artifact, backend: str = "ort", *, threads: int | None = None) -> QuantizedDenoiser:
    """The quantized denoiser of artifact `art` as a drop-in `torch.nn.Module` (`QuantizedDenoiser`) running on
    `backend` (one of `denoq sample --backend`'s names: ort, torch-sim, ort-fp, ort-fp16, trt, ort-cuda, ort-trt,
    torch-fp), e.g. `pipe.unet = denoq.load("art")`."""
    if backend not in BACKENDS:
        raise DenoqError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return QuantizedDenoiser(art if isinstance(art, Artifact) else Artifact.open(Path(art)), backend, threads)
