"""Making every graph of a model (`toolkit.bench.variants`): denoq's compiles, the head, the peer's graphs."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from denoq.calibrators.calibset import CalibrationSet
from denoq.compiler.api import compile_artifact, open_artifact
from denoq.compiler.artifact import Artifact
from denoq.compiler.load import ModelSpec, load_model
from denoq.compiler.recipe import Recipe, load_recipe
from toolkit.bench.peer import quantize_peer, timestep_path_nodes
from toolkit.bench.variants import BY_KEY, MODEL_SETS, Variant, of_kind
from toolkit.common import log


def big_unet(seed: int = 0) -> torch.nn.Module:
    """The conv-heavy random-weight UNet (~27M parameters at 4×32×32), seeded."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                       block_out_channels=(128, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def save_pipeline(unet: torch.nn.Module, folder: Path) -> Path:
    """A pipeline folder as `DiffusionPipeline.save_pretrained` writes it (model_index.json, unet/, scheduler/)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def model_source(name: str, work: Path, seed: int) -> str:
    """What a compile takes for a `--models` entry: the embedded name, the `big` folder (made here once), a path."""
    if name == "big":
        folder = work / "models" / "big"
        if not (folder / "model_index.json").is_file():
            save_pipeline(big_unet(seed), folder)
        return str(folder)
    return name


def display_name(name: str) -> str:
    """A `--models` entry as the tables name it: a path's last part, else the entry."""
    return Path(name).name if os.sep in name else name


def calibration_inputs(spec: ModelSpec, recipe: Recipe) -> CalibrationSet:
    """The model inputs a denoq compile of `recipe` calibrates on (the compiler's own call, recomputed)."""
    # the compiler's internals, imported here so that a move inside denoq.compiler breaks only this step
    from denoq.compiler.calibrate import calibration_set
    from denoq.layers import quantizable_layers, select_layers

    torch.manual_seed(recipe["seed"])
    layers, _ = select_layers(quantizable_layers(spec.module), spec.layer_patterns(recipe["layers.keep_fp"]))
    return calibration_set(spec, recipe, layers)[0]


def check_same_calibration(calib: CalibrationSet, art: Artifact) -> None:
    """RuntimeError when the recomputed inputs are not the ones the artifact was calibrated on."""
    rec = art.manifest["calibration"]
    if len(calib) != rec["inputs"] or list(calib.t) != list(rec["timesteps"]):
        raise RuntimeError(f"recomputed calibration ({len(calib)} inputs, timesteps {calib.t[:5]}…) differs from "
                           f"{art.path}'s ({rec['inputs']} inputs, timesteps {rec['timesteps'][:5]}…)")


@dataclass
class Prepared:
    """One model's graphs (variant key → ONNX path), the artifacts of its compiles and what it took to make them."""

    name: str
    source: str
    spec: ModelSpec
    artifacts: dict[str, Artifact]
    paths: dict[str, Path]
    info: dict[str, Any] = field(default_factory=dict)


def recipe_for(model: str, preset: str, sets: Sequence[str]) -> Recipe:
    """Recipe `preset` with the model's own overrides (`MODEL_SETS`), then `sets`."""
    return load_recipe(preset, [*MODEL_SETS.get(model, []), *sets])


def compile_ours(source: str, recipe: Recipe, out: Path, reuse: bool) -> Artifact:
    """Compile (or, with `reuse`, reopen an artifact of the same recipe); denoq's own log goes to stderr."""
    if reuse and (out / "manifest.json").is_file():
        art = open_artifact(out)
        if art.manifest["recipe"] == recipe.to_dict():
            log(f"  reusing {out}")
            return art
    with contextlib.redirect_stdout(sys.stderr):
        return compile_artifact(source, recipe, out, force=True)


def with_head(qdq_path: Path, out: Path, num_train_timesteps: int, seed: int) -> Path:
    """`qdq_path` with PTQD's correction head appended (`denoq.passes.ptqd_head`), seeded random tables of length
    T (the head's cost does not depend on their values: two Gathers, a Sub and a Mul)."""
    from denoq.passes.ptqd_head import AppendPtqdHead

    model = onnx.load(str(qdq_path))
    channels = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    g = torch.Generator().manual_seed(seed)
    head = AppendPtqdHead(0.01 * torch.randn(num_train_timesteps, channels, generator=g),
                          1 / (1 + 0.01 * torch.rand(num_train_timesteps, generator=g)))
    onnx.save(head(model), str(out))
    return out


def _compile(prep: Prepared, v: Variant, recipe: Recipe, out: Path, reuse: bool, what: str) -> Artifact:
    log(f"{prep.name}: compiling {what} (target {recipe['target']}, calib.samples={recipe['calib.samples']}, "
        f"calib.steps={recipe['calib.steps']})")
    start = time.perf_counter()
    art = compile_ours(prep.source, recipe, out, reuse)
    prep.info[f"compile_{v.key}_seconds"] = round(time.perf_counter() - start, 1)
    prep.artifacts[v.key] = art
    prep.paths[v.key] = art.file("model.qdq.onnx")
    return art


def _peer_graphs(prep: Prepared, model: str, sets: Sequence[str], folder: Path, reuse: bool, pre: bool) -> None:
    """The `peer` variants' graphs, each on the FP graph and the recomputed calibration inputs of its base."""
    calibs: dict[str, CalibrationSet] = {}
    for v in of_kind("peer"):
        base = BY_KEY[v.base]
        art = prep.artifacts[base.key]
        if base.key not in calibs:
            log(f"{prep.name}: recomputing the calibration inputs for the peer")
            calibs[base.key] = calibration_inputs(prep.spec, recipe_for(model, base.preset, [*base.sets, *sets]))
            for other in prep.artifacts.values():
                check_same_calibration(calibs[base.key], other)
            prep.info["calibration_inputs"] = len(calibs[base.key])
        calib = calibs[base.key]
        fp_path = art.file("model.fp.onnx")
        exclude: list[str] = []
        if v.peer_fix:  # the timestep embedding, and the layers the recipe keeps in float (so both quantize alike)
            exclude = timestep_path_nodes(onnx.load(str(fp_path), load_external_data=False))
            exclude += [art.manifest["layer_map"][m]["node"] for m in art.manifest["calibration"]["kept_fp"]]
        path = folder / "peer" / f"model.{v.key}.onnx"
        if reuse and path.is_file():
            log(f"  reusing {path}")
        else:
            log(f"{prep.name}: onnxruntime.quantization.quantize_static on {len(calib)} calibration inputs"
                + (f", {len(exclude)} nodes excluded (timestep embedding, layers.keep_fp)" if exclude else ""))
            info = quantize_peer(fp_path, calib, path, pre, exclude)
            prep.info[v.key] = info
            if pre and not info["preprocessed"]:
                log(f"  quant_pre_process failed, quantized the exported graph: {info['preprocess_errors']}")
        prep.paths[v.key] = path


def prepare(name: str, work: Path, sets: Sequence[str], seed: int, reuse: bool, peer_pre: bool,
            groups: int = 1, head: bool = False) -> Prepared:
    """Every graph of model `name` (a `--models` entry) under `work`: the `compile` variants with `sets` after
    their own, the `selector` variants when `groups` > 1, the `head` variants with `head`, then the peer's
    graphs on recomputed calibration inputs (checked against every compile's manifest). `reuse`: keep the
    artifacts of the same recipe and the peer graphs found in `work`; `peer_pre`: `quant_pre_process` first."""
    source = model_source(name, work, seed)
    spec = load_model(source)
    folder = work / "artifacts" / display_name(name)
    prep = Prepared(display_name(name), source, spec, {}, {})
    prep.info["parameters"] = sum(p.numel() for p in spec.module.parameters())
    prep.info["sample_shape"] = list(spec.sample_shape)
    for v in of_kind("compile"):
        _compile(prep, v, recipe_for(name, v.preset, [*v.sets, *sets]), folder / v.key, reuse, v.preset)
    for v in of_kind("selector") if groups > 1 else []:
        base = BY_KEY[v.base]
        recipe = recipe_for(name, base.preset, [*base.sets, *sets, f"activations.timestep_groups={groups}"])
        art = _compile(prep, v, recipe, folder / f"{base.key}-g{groups}", reuse,
                       f"{base.preset} with activations.timestep_groups={groups}")
        prep.info[f"selector_layers_{v.key}"] = len(art.manifest["calibration"].get("timestep_groups", {}))
    for v in of_kind("head") if head else []:
        plan = prep.artifacts[v.base].manifest["plan"]
        prep.paths[v.key] = with_head(prep.paths[v.base], folder / f"{v.key}.onnx", plan["num_train_timesteps"],
                                      seed)
    fp = {v.key: prep.artifacts[v.base].file("model.fp.onnx") for v in of_kind("fp")}
    prep.paths = {**fp, **prep.paths, **{v.key: prep.paths[v.base] for v in of_kind("same")}}
    prep.info["recipe_trt"] = prep.artifacts["trt"].manifest["recipe"]["values"]
    _peer_graphs(prep, name, sets, folder, reuse, peer_pre)
    return prep
