"""Benchmark denoq's quantized graphs against FP32 and against ONNX Runtime's own `quantize_static`, side by side.

Everything is measured in one run on this machine, so the numbers to read are the *ratios* (DESIGN.md, Measuring
quality: targets are ratios to the FP model measured in the same run).

1. **Latency** (ONNX Runtime CPU, per model call, `--threads` intra-op threads, spinning off): for every model of
   `--models` and every batch of `--batches`, five graphs of the same model:
   - `FP32`: the artifact's `model.fp.onnx`;
   - `denoq trt`: `model.qdq.onnx` of a `w8a8` compile (symmetric int8, inputs only: TensorRT's rules);
   - `denoq ort-cpu`: `model.qdq.onnx` of a `w8a8-ort` compile (uint8 activations, quantized outputs);
   - `ORT quantize_static`: what a user would pick today: `onnxruntime.quantization.quantize_static` on our
     `model.fp.onnx`, QDQ format, int8 activations and weights, per channel, symmetric both, MinMax calibration
     (ORT's default) over exactly the calibration inputs our compile used (the same FP DDIM trajectories,
     recomputed with the recipe's settings and seed; checked against the manifest's record). `quant_pre_process`
     is skipped unless `--peer-preprocess`: it makes slower graphs here (see `quantize_peer`).
   - `ORT quantize_static, t-emb. + keep_fp FP`: the same, with the fix a user would find, `nodes_to_exclude` = the
     ops between the `timestep` input and the first layer (the sinusoidal timestep embedding), plus the layers our
     recipe keeps in float (`layers.keep_fp`, default conv_in/conv_out) so that both quantize the same layers.
     With ORT's default op
     types the peer quantizes `t·freq` (up to ~1000) to int8 before Sin/Cos (a step of ~7), which destroys the
     time embedding; the quality section shows what that costs.
   The variants are interleaved: `--rounds` rounds, each timing every variant once (`--iters` calls after one
   warm-up call, in a rotated order), after a warm-up of every session. A variant's latency is the median of its
   round medians; its speed-up is the median over rounds of FP32 / variant within the round (the machine is
   shared: load that changes between rounds cancels), printed with its range over the rounds. Feeds are
   prepared numpy arrays (`session.run` only).
   Each quantized graph's integer-kernel fusion is read from the graph ORT optimized (`fusion_report`).
   **Timestep selector overhead** (`--groups G`, default 4; 1 = off): two more graphs, `denoq trt G=4` and
   `denoq ort-cpu G=4`, compiled from the same profiles with `activations.timestep_groups=G` added to the recipe
   (layers whose input scales differ between timestep groups get the selector `x → Mul(Gather(r, t)) → Q → DQ →
   layer → Div → Add(bias)`, `denoq.passes.selector`), timed in the same interleaved rounds. Their overhead is
   the median over rounds of G-graph ms / G=1-graph ms of the same profile within the round (goal: ≤ 1.05), in
   a separate table with the G graphs' fusion fraction. G must not exceed the calibrated timesteps
   (`calib.steps`). The quality section does not sample these graphs.
2. **Quality** on the default model `digits`: the FP model (PyTorch), the FP32 ONNX graph, both denoq graphs and
   both peer graphs sample from the same noise with the same sampler (DDIM, `--steps` steps, η = 0, `--n` samples,
   `--seed`); every ONNX graph runs in ONNX Runtime. Reported: FD-digits (and its ratio to FP), FD to the FP
   samples and PSNR vs the FP samples.

Models: `digits` (the embedded default), `big` (a conv-heavy random-weight UNet2DModel, seeded, 4×32×32, calibrated
with few trajectories since only its speed matters) or the path of any diffusers pipeline folder.

    OMP_NUM_THREADS=1 python tools/bench.py --json /tmp/bench.json 2>&1 | tee /tmp/bench.log

Progress goes to stderr, the markdown tables (ready for the README) to stdout, all numbers to `--json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from denoq.calibrators.calibset import CalibrationSet
from denoq.compiler.artifact import Artifact, library_versions
from denoq.compiler.backends import EpsFn, torch_eps
from denoq.compiler.load import ModelSpec, load_model
from denoq.compiler.pipeline import calibration_set, compile_model
from denoq.compiler.recipe import Recipe, load_recipe
from denoq.cpu import cpu_record
from denoq.engines.ort import OrtBackend
from denoq.engines.ort_report import fusion_report, latency
from denoq.layers import quantizable_layers, select_layers
from denoq.metrics import fd_between, fd_digits, psnr
from denoq.sampling import NoiseSchedule, sample

#: Variant key → (label in the tables, what it is).
VARIANTS: dict[str, str] = {
    "fp32": "FP32",
    "trt": "denoq trt",
    "ort-cpu": "denoq ort-cpu",
    "ort-cpu-raw": "denoq ort-cpu, ORT's default kernels",
    "ort-cpu-w7": "denoq ort-cpu, 7-bit weights",
    "peer": "ORT quantize_static",
    "peer-t": "ORT quantize_static, t-emb. + keep_fp FP",
}
#: Our compiles: variant key → recipe preset and its overrides.
OUR_RECIPES: dict[str, tuple[str, list[str]]] = {"trt": ("w8a8", []), "ort-cpu": ("w8a8-ort", []),
                                                 "ort-cpu-w7": ("w8a8-ort", ["weights.bits=7"])}
#: Variants run in sessions with ORT's default integer kernels, without the `session.x64quantprecision` that
#: denoq's sessions set on CPUs without VNNI for graphs whose weights exceed 7 bits (denoq.engines.ort): what the
#: remedies cost and save (`ort-cpu-raw` is the `ort-cpu` graph so run; `ort-cpu-w7`'s 7-bit weights never need
#: it). The peer's graphs run so too: that is how a user of ORT's quantizer runs them, and onnxruntime 1.32's
#: s8→u8 weight conversion fails on their shared zero-point initializers ("Attempt to replace the existing
#: tensor") on such CPUs.
DEFAULT_KERNELS: tuple[str, ...] = ("ort-cpu-raw", "peer", "peer-t")
#: Timestep-selector variants (`--groups G` > 1): variant key → the G=1 variant of the same profile.
SELECTORS: dict[str, str] = {"trt-sel": "trt", "ort-cpu-sel": "ort-cpu"}
#: PTQD head variants (`--ptqd-head`): variant key → the graph it extends, and its label.
HEADS: dict[str, tuple[str, str]] = {"trt-head": ("trt", "denoq trt + PTQD head")}
#: The selector's latency goal: G graph ms / G=1 graph ms of the same profile.
SELECTOR_OVERHEAD_GOAL = 1.05
#: Recipe overrides per model name (applied before `--set`): the random `big` model only needs plausible ranges.
MODEL_SETS: dict[str, list[str]] = {"big": ["calib.samples=8", "calib.steps=5"]}
DIGITS_SHAPE = (1, 16, 16)
LATENCY_TIMESTEP = 500
PEER_CALIB_BATCH = 64
_T0 = time.perf_counter()


def variant_label(key: str, groups: int = 1) -> str:
    """A variant's name in the tables: VARIANTS', `denoq trt G=4` for a selector variant, HEADS' for a head."""
    if key in HEADS:
        return HEADS[key][1]
    return f"{VARIANTS[SELECTORS[key]]} G={groups}" if key in SELECTORS else VARIANTS[key]


def log(msg: str) -> None:
    """A progress line on stderr with the seconds since start."""
    print(f"[bench {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- models ------------------------------------------------------------------------------------------------

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
    """What `compile_model` takes for a `--models` entry: the embedded name, the `big` folder (made here), a path."""
    if name == "big":
        folder = work / "models" / "big"
        if not (folder / "model_index.json").is_file():
            save_pipeline(big_unet(seed), folder)
        return str(folder)
    return name


def display_name(name: str) -> str:
    return Path(name).name if os.sep in name else name


# -- calibration inputs and the peer -----------------------------------------------------------------------

def calibration_inputs(spec: ModelSpec, recipe: Recipe) -> CalibrationSet:
    """The model inputs `denoq.compiler.pipeline.calibrate` records for `recipe` (the same call, recomputed)."""
    torch.manual_seed(recipe["seed"])
    layers, _ = select_layers(quantizable_layers(spec.module), spec.layer_patterns(recipe["layers.keep_fp"]))
    return calibration_set(spec, recipe, layers, progress=False)[0]


def check_same_calibration(calib: CalibrationSet, art: Artifact) -> None:
    """Refuse to go on when the recomputed inputs are not the ones the artifact was calibrated on."""
    rec = art.manifest["calibration"]
    if len(calib) != rec["inputs"] or list(calib.t) != list(rec["timesteps"]):
        raise RuntimeError(f"recomputed calibration ({len(calib)} inputs, timesteps {calib.t[:5]}…) differs from "
                           f"{art.path}'s ({rec['inputs']} inputs, timesteps {rec['timesteps'][:5]}…)")


class TrajectoryReader(CalibrationDataReader):
    """`onnxruntime.quantization.CalibrationDataReader` over a CalibrationSet: one feed dict per batch (one
    timestep each), `sample` float32 and `timestep` int64, plus `encoder_hidden_states` for conditional models."""

    def __init__(self, calib: CalibrationSet, batch_size: int = PEER_CALIB_BATCH) -> None:
        self.calib = calib
        self.batch_size = batch_size
        self._it: Iterator[dict[str, np.ndarray]] = self._feeds()

    def _feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for x, t, cond in self.calib.batches(self.batch_size):
            feed = {"sample": x.numpy().astype(np.float32), "timestep": t.numpy().astype(np.int64)}
            if cond is not None:
                feed["encoder_hidden_states"] = cond.numpy().astype(np.float32)
            yield feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._feeds()


def preprocess(fp_path: Path, out: Path) -> dict[str, Any]:
    """`quant_pre_process` (symbolic shape inference, ORT basic optimization, ONNX shape inference) into `out`;
    symbolic shape inference fails on our exported graphs unless its dims are merged (`auto_merge`), so that is
    tried second. Returns what worked."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    errors = []
    for kwargs in ({}, {"auto_merge": True}):
        try:
            quant_pre_process(str(fp_path), str(out), **kwargs)
            return {"preprocessed": True, "preprocess_options": kwargs, "preprocess_errors": errors}
        except Exception as exc:  # onnxruntime raises plain Exceptions here
            errors.append(" ".join(str(exc).split())[:200])
    return {"preprocessed": False, "preprocess_errors": errors}


def timestep_path_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes reachable from the `timestep` input without passing a Conv/Gemm/MatMul: the sinusoidal
    timestep embedding (Mul, Unsqueeze, Cast, Mul, Sin, Cos, Concat, Slice in diffusers' UNets)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: list[str] = []
    frontier = ["timestep"]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type not in ("Conv", "Gemm", "MatMul") and node.name not in found:
                found.append(node.name)
                frontier.extend(node.output)
    return found


def sin_input_scale(path: Path) -> float | None:
    """The quantization scale of the first Sin's input in a Q/DQ graph (None when it is not quantized)."""
    model = onnx.load(str(path))
    dq = {o: n for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    sin = next((n for n in model.graph.node if n.op_type == "Sin"), None)
    if sin is None or sin.input[0] not in dq or dq[sin.input[0]].input[1] not in inits:
        return None
    return float(numpy_helper.to_array(inits[dq[sin.input[0]].input[1]]).reshape(-1)[0])


def quantize_peer(fp_path: Path, calib: CalibrationSet, out: Path, pre: bool,
                  exclude: Sequence[str] = ()) -> dict[str, Any]:
    """ORT's static quantization of `fp_path` into `out`, as a user would run it today (see module docstring),
    leaving the nodes named in `exclude` in float.

    With `pre`, `quant_pre_process` runs first (see `preprocess`). It does not help here, so it is off by default:
    its ORT optimization inlines GroupNormalization (opset 21) into Reshape/ReduceMean/Sub/Div/… and the quantizer
    then puts Q/DQ around every one of those ops (about twice the Q/DQ nodes, the same integer kernels). Measured
    at batch 8, 2 threads: a 0.2M-parameter UNet 8.5 ms with it vs 6.2 ms without (FP32 4.2 ms); the `big`
    model 560 ms vs 511 ms (FP32 617 ms).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    out.parent.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"calibrate_method": "MinMax", "quant_format": "QDQ", "per_channel": True,
                            "activation_type": "QInt8", "weight_type": "QInt8",
                            "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True},
                            "calibration_inputs": len(calib), "calibration_batch": PEER_CALIB_BATCH,
                            "nodes_to_exclude": list(exclude), "preprocessed": False}
    src = fp_path
    if pre:
        info.update(preprocess(fp_path, out.with_name(out.stem + ".pre.onnx")))
        if info["preprocessed"]:
            src = out.with_name(out.stem + ".pre.onnx")
    start = time.perf_counter()
    with _quiet_root_logger():
        quantize_static(str(src), str(out), TrajectoryReader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(exclude),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    info["seconds"] = round(time.perf_counter() - start, 1)
    info["sin_input_scale"] = sin_input_scale(out)
    return info


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """quantize_static logs "Please consider pre-processing" on the root logger; keep only errors meanwhile."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# -- building every variant of a model ---------------------------------------------------------------------

@dataclass
class Prepared:
    """One model's graphs (variant key → ONNX path) and what it took to make them."""

    name: str
    source: str
    spec: ModelSpec
    artifacts: dict[str, Artifact]
    paths: dict[str, Path]
    info: dict[str, Any] = field(default_factory=dict)


def recipe_for(model: str, preset: str, sets: Sequence[str]) -> Recipe:
    return load_recipe(preset, [*MODEL_SETS.get(model, []), *sets])


def compile_ours(source: str, recipe: Recipe, out: Path, reuse: bool) -> Artifact:
    """Compile (or, with `reuse`, reopen an artifact of the same recipe); denoq's own log goes to stderr."""
    if reuse and (out / "manifest.json").is_file():
        art = Artifact.open(out)
        if art.manifest["recipe"] == recipe.to_dict():
            log(f"  reusing {out}")
            return art
    with contextlib.redirect_stdout(sys.stderr):
        return compile_model(source, recipe, out, force=True, progress=False)


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


def prepare(name: str, work: Path, sets: Sequence[str], seed: int, reuse: bool, peer_pre: bool,
            groups: int = 1, head: bool = False) -> Prepared:
    """Compile both denoq profiles of model `name` (and, with `groups` > 1, both again with that many timestep
    groups: the selector variants; with `head`, the trt graph with PTQD's head appended), recompute its
    calibration inputs, quantize the peer."""
    source = model_source(name, work, seed)
    label = display_name(name)
    spec = load_model(source)
    folder = work / "artifacts" / label
    prep = Prepared(label, source, spec, {}, {})
    prep.info["parameters"] = sum(p.numel() for p in spec.module.parameters())
    prep.info["sample_shape"] = list(spec.sample_shape)
    for key, (preset, extra) in OUR_RECIPES.items():
        recipe = recipe_for(name, preset, [*extra, *sets])
        log(f"{label}: compiling {preset} (target {recipe['target']}, calib.samples={recipe['calib.samples']}, "
            f"calib.steps={recipe['calib.steps']})")
        start = time.perf_counter()
        art = compile_ours(source, recipe, folder / key, reuse)
        prep.info[f"compile_{key}_seconds"] = round(time.perf_counter() - start, 1)
        prep.artifacts[key] = art
        prep.paths[key] = art.file("model.qdq.onnx")
    if groups > 1:
        for key, base in SELECTORS.items():
            recipe = recipe_for(name, OUR_RECIPES[base][0], [*sets, f"activations.timestep_groups={groups}"])
            log(f"{label}: compiling {OUR_RECIPES[base][0]} with activations.timestep_groups={groups} "
                f"(calib.steps={recipe['calib.steps']})")
            start = time.perf_counter()
            art = compile_ours(source, recipe, folder / f"{base}-g{groups}", reuse)
            prep.info[f"compile_{key}_seconds"] = round(time.perf_counter() - start, 1)
            prep.info[f"selector_layers_{key}"] = len(art.manifest["calibration"].get("timestep_groups", {}))
            prep.artifacts[key] = art
            prep.paths[key] = art.file("model.qdq.onnx")
    trt = prep.artifacts["trt"]
    if head:
        for key, (base, _) in HEADS.items():
            prep.paths[key] = with_head(prep.paths[base], folder / f"{key}.onnx",
                                        trt.manifest["plan"]["num_train_timesteps"], seed)
    prep.paths = {"fp32": trt.file("model.fp.onnx"), **prep.paths, "ort-cpu-raw": prep.paths["ort-cpu"]}
    prep.info["recipe_trt"] = trt.manifest["recipe"]["values"]

    log(f"{label}: recomputing the calibration inputs for the peer")
    calib = calibration_inputs(spec, recipe_for(name, OUR_RECIPES["trt"][0], sets))
    for art in prep.artifacts.values():
        check_same_calibration(calib, art)
    prep.info["calibration_inputs"] = len(calib)
    fp_path = trt.file("model.fp.onnx")
    # the fixed peer also leaves in float the layers our recipe keeps in float (layers.keep_fp), so both quantize
    # the same layers
    kept_nodes = [trt.manifest["layer_map"][m]["node"] for m in trt.manifest["calibration"]["kept_fp"]]
    t_nodes = timestep_path_nodes(onnx.load(str(fp_path), load_external_data=False))
    excludes = {"peer": [], "peer-t": t_nodes + kept_nodes}
    for key, exclude in excludes.items():
        path = folder / "peer" / f"model.{key}.onnx"
        if reuse and path.is_file():
            log(f"  reusing {path}")
        else:
            log(f"{label}: onnxruntime.quantization.quantize_static on {len(calib)} calibration inputs"
                + (f", {len(exclude)} nodes excluded (timestep embedding, layers.keep_fp)" if exclude else ""))
            info = quantize_peer(fp_path, calib, path, peer_pre, exclude)
            prep.info[key] = info
            if peer_pre and not info["preprocessed"]:
                log(f"  quant_pre_process failed, quantized the exported graph: {info['preprocess_errors']}")
        prep.paths[key] = path
    return prep


# -- latency -----------------------------------------------------------------------------------------------

def latency_inputs(shape: Sequence[int], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded N(0, 1) samples and a mid-schedule timestep for every sample (as `denoq eval` times)."""
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
    return x, torch.full((batch,), LATENCY_TIMESTEP, dtype=torch.int64)


def time_interleaved(backends: dict[str, OrtBackend], x: torch.Tensor, t: torch.Tensor, rounds: int,
                     iters: int, target_s: float) -> dict[str, dict[str, Any]]:
    """Median ms per call of every backend on (x, t), the variants interleaved round-robin.

    Every session is warmed up first (3 calls); `iters` = 0 picks the number of calls per measurement so that the
    slowest variant takes about `target_s` (at least 5, at most 200). Round r times the variants in the order
    rotated by r, each with one warm-up call then `iters` calls; the result is the median of the round medians.
    """
    feeds = {k: b.feeds(x, t) for k, b in backends.items()}
    warm = {k: latency(b, feeds[k], warmup=3, iters=3)["median_ms"] for k, b in backends.items()}
    if iters <= 0:
        iters = int(min(200, max(5, round(target_s * 1e3 / max(warm.values())))))
    keys = list(backends)
    per_round: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            per_round[k].append(latency(backends[k], feeds[k], warmup=1, iters=iters)["median_ms"])
    return {k: {"median_ms": statistics.median(v), "round_medians_ms": [round(m, 4) for m in v], "iters": iters}
            for k, v in per_round.items()}


def speedups(fp32_ms: Sequence[float], variant_ms: Sequence[float]) -> dict[str, float]:
    """FP32 / variant per round (both timed within the same round, so slow load changes on a shared machine
    cancel), then their median (`speedup`) and range (`speedup_min`, `speedup_max`)."""
    ratios = [f / v for f, v in zip(fp32_ms, variant_ms, strict=True)]
    return {"speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios)}


def overheads(base_ms: Sequence[float], selector_ms: Sequence[float]) -> dict[str, float]:
    """Selector / G=1 graph per round (same profile, same round), then their median (`overhead`) and range."""
    ratios = [s / b for b, s in zip(base_ms, selector_ms, strict=True)]
    return {"overhead": statistics.median(ratios), "overhead_min": min(ratios), "overhead_max": max(ratios)}


def ort_backend(prep: Prepared, key: str, threads: int) -> OrtBackend:
    """The session of variant `key`: ORT's default integer kernels for DEFAULT_KERNELS, denoq's otherwise."""
    return OrtBackend(prep.paths[key], threads=threads, exact_integers=key not in DEFAULT_KERNELS)


def timed_keys(prep: Prepared) -> list[str]:
    """The variants of `prep` to time and fuse: VARIANTS, then the selector and head variants it has."""
    return [*VARIANTS, *(k for k in [*SELECTORS, *HEADS] if k in prep.paths)]


def bench_latency(prep: Prepared, batches: Sequence[int], rounds: int, iters: int, threads: int,
                  target_s: float, groups: int = 1) -> dict[str, Any]:
    """Latency of every variant of `prep` at every batch size, with speed-ups FP32 / variant and, for the
    selector variants, the overhead selector / G=1 graph of the same profile."""
    backends = {k: ort_backend(prep, k, threads) for k in timed_keys(prep)}
    out: dict[str, Any] = {}
    for batch in batches:
        log(f"{prep.name}: timing batch {batch} ({rounds} rounds × {len(backends)} variants)")
        x, t = latency_inputs(prep.spec.sample_shape, batch)
        res = time_interleaved(backends, x, t, rounds, iters, target_s)
        for k in res:
            res[k].update(speedups(res["fp32"]["round_medians_ms"], res[k]["round_medians_ms"]))
            base = SELECTORS.get(k) or HEADS.get(k, (None,))[0]
            if base is not None:
                res[k].update(overheads(res[base]["round_medians_ms"], res[k]["round_medians_ms"]))
        out[f"batch{batch}"] = res
        log("  " + ", ".join(f"{variant_label(k, groups)} {v['median_ms']:.2f} ms ({v['speedup']:.2f}×)"
                             for k, v in res.items()))
    return out


def bench_fusion(prep: Prepared) -> dict[str, Any]:
    """`fusion_report` of every quantized graph of `prep` (what ORT's CPU EP made of the quantized layers)."""
    return {k: fusion_report(prep.paths[k], threads=1, exact_integers=k not in DEFAULT_KERNELS)
            for k in timed_keys(prep) if k not in ("fp32", "ort-cpu-raw")}


# -- quality -----------------------------------------------------------------------------------------------

def sample_from(eps: EpsFn, scheduler_config: dict[str, Any], shape: Sequence[int], *, steps: int, seed: int,
                n: int) -> torch.Tensor:
    """`n` DDIM (η = 0) samples driven by `eps`, from the noise of `seed` (as `denoq.compiler.generate.generate`)."""
    return sample(eps, NoiseSchedule.from_config(scheduler_config), sampler="ddim", steps=steps, eta=0.0,
                  shape=(n, *shape), generator=torch.Generator().manual_seed(seed), cond=None, progress=False)


def bench_quality(prep: Prepared, *, steps: int, seed: int, n: int, threads: int) -> dict[str, Any]:
    """FD-digits, FD to FP and PSNR vs FP of the FP model, the FP32 graph, both denoq graphs and the peer's graph.

    The FP reference is the PyTorch model; every graph runs in ONNX Runtime through the same sampler and noise.
    FD needs 1×16×16 samples; for other models only PSNR is reported.
    """
    if prep.spec.cond_shape is not None:
        raise RuntimeError(f"{prep.name} is conditional; the quality bench samples unconditional models only")
    config = prep.artifacts["trt"].manifest["scheduler"]
    shape = prep.spec.sample_shape
    digits = tuple(shape) == DIGITS_SHAPE
    eps: dict[str, EpsFn] = {"torch-fp": torch_eps(prep.spec.module)}
    eps.update({k: ort_backend(prep, k, threads) for k in VARIANTS})
    samples: dict[str, torch.Tensor] = {}
    rows: dict[str, Any] = {}
    for k, fn in eps.items():
        log(f"{prep.name}: sampling {n} × DDIM {steps} steps with {label_quality(k)}")
        start = time.perf_counter()
        samples[k] = sample_from(fn, config, shape, steps=steps, seed=seed, n=n)
        fp = samples["torch-fp"]
        rows[k] = {
            "fd_digits": fd_digits(samples[k]) if digits else None,
            "fd_to_fp": fd_between(samples[k], fp) if digits else None,
            "psnr_vs_fp": psnr(samples[k], fp) if k != "torch-fp" else None,
            "seconds": round(time.perf_counter() - start, 1),
        }
        if digits:
            rows[k]["fd_ratio"] = rows[k]["fd_digits"] / rows["torch-fp"]["fd_digits"]
    return {"sampler": "ddim", "steps": steps, "eta": 0.0, "seed": seed, "n": n, "threads": threads,
            "reference": "torch-fp", "rows": rows}


def label_quality(key: str) -> str:
    return "FP (PyTorch)" if key == "torch-fp" else VARIANTS[key] + (" (ORT)" if key == "fp32" else "")


# -- tables ------------------------------------------------------------------------------------------------

def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def latency_table(results: dict[str, Any], threads: int, rounds: int) -> str:
    header = ["model", "batch", *(f"{VARIANTS[k]} ms (×FP32)" if k != "fp32" else "FP32 ms" for k in VARIANTS)]
    # selector variants are in `selector_table`
    rows = []
    for model, res in results.items():
        for bkey, per in res["latency"].items():
            cells = [f"{per['fp32']['median_ms']:.2f}"]
            cells += [f"{per[k]['median_ms']:.2f} ({per[k]['speedup']:.2f}×, {per[k]['speedup_min']:.2f}–"
                      f"{per[k]['speedup_max']:.2f})" for k in VARIANTS if k != "fp32"]
            rows.append([model, bkey.removeprefix("batch"), *cells])
    note = (f"ONNX Runtime CPU, {threads} intra-op threads, spinning off. ms: median of {rounds} interleaved "
            "round medians; ×FP32: median (and range) over the rounds of FP32 / variant timed in the same round. "
            "ORT quantize_static: QDQ, per-channel int8 weights, int8 activations, both symmetric, MinMax "
            "calibration on the same calibration inputs as denoq's compile.")
    return md_table(header, rows) + "\n\n" + note


def selector_table(results: dict[str, Any], groups: int) -> str:
    """Per model, batch and profile: the G=1 and G graphs' ms, the overhead G / G=1 (median and range over
    rounds), the selector layers and the fusion fraction of both graphs."""
    header = ["model", "batch", "profile", "selector layers", "G=1 ms", f"G={groups} ms",
              f"G={groups} / G=1 (range)", "fused G=1", f"fused G={groups}"]
    rows = []
    for model, res in results.items():
        for bkey, per in res["latency"].items():
            for k, base in SELECTORS.items():
                if k not in per:
                    continue
                fusion = res.get("fusion", {})
                fused = [f"{fusion[v]['fraction_fused']:.0%}" if v in fusion else "–" for v in (base, k)]
                rows.append([model, bkey.removeprefix("batch"), VARIANTS[base],
                             str(res["info"].get(f"selector_layers_{k}", "–")),
                             f"{per[base]['median_ms']:.2f}", f"{per[k]['median_ms']:.2f}",
                             f"{per[k]['overhead']:.3f} ({per[k]['overhead_min']:.3f}–{per[k]['overhead_max']:.3f})",
                             *fused])
    note = (f"`activations.timestep_groups={groups}` added to each profile's recipe; a selector layer runs "
            "x → Mul(Gather(r, t)) → Q → DQ → layer → Div → Add(bias). G / G=1: median (and range) over the "
            f"rounds of the two graphs' ms timed in the same round; goal ≤ {SELECTOR_OVERHEAD_GOAL:.2f}.")
    return md_table(header, rows) + "\n\n" + note


def head_table(results: dict[str, Any]) -> str:
    """Per model and batch: the trt graph's ms without and with PTQD's head, and their ratio."""
    header = ["model", "batch", "without head ms", "with head ms", "with / without (range)"]
    rows = []
    for model, res in results.items():
        for bkey, per in res["latency"].items():
            for k, (base, _) in HEADS.items():
                if k in per:
                    rows.append([model, bkey.removeprefix("batch"), f"{per[base]['median_ms']:.2f}",
                                 f"{per[k]['median_ms']:.2f}", f"{per[k]['overhead']:.3f} "
                                 f"({per[k]['overhead_min']:.3f}–{per[k]['overhead_max']:.3f})"])
    note = ("The `denoq trt` graph with `ε = (ε_q − Gather(bias, t)) · Gather(1/(1+k), t)` appended at its output "
            "(`denoq.passes.ptqd_head`); ratio: median (and range) over the rounds of the two graphs' ms timed in "
            "the same round.")
    return md_table(header, rows) + "\n\n" + note


def fusion_table(results: dict[str, Any], groups: int = 1) -> str:
    header = ["model", "graph", "quantized layers", "fused", "fraction fused", "integer kernels",
              "unfused float kernels", "Q / DQ left"]
    rows = []
    for model, res in results.items():
        for k, rep in res["fusion"].items():
            ints = ", ".join(f"{op} {c}" for op, c in rep["integer_ops"].items()) or "–"
            floats = ", ".join(f"{op} {c}" for op, c in rep["float_ops"].items()) or "–"
            rows.append([model, variant_label(k, groups), str(rep["layers"]), str(rep["fused"]),
                         f"{rep['fraction_fused']:.0%}", ints, floats,
                         f"{rep['quantize_nodes']} / {rep['dequantize_nodes']}"])
    return md_table(header, rows)


def quality_table(model: str, q: dict[str, Any], info: dict[str, Any]) -> str:
    header = ["sampler backend", "FD-digits", "FD / FP", "FD to FP samples", "PSNR vs FP (dB)"]
    rows = [[label_quality(k), _fmt(r["fd_digits"]), _fmt(r.get("fd_ratio"), ".3f"), _fmt(r["fd_to_fp"]),
             _fmt(r["psnr_vs_fp"])] for k, r in q["rows"].items()]
    note = (f"Model `{model}`, DDIM {q['steps']} steps (η = 0), {q['n']} samples from the same noise (seed "
            f"{q['seed']}); graphs run in ONNX Runtime, the FP reference in PyTorch.")
    scale = info.get("peer", {}).get("sin_input_scale")
    if scale is not None:
        note += (f" ORT quantize_static quantizes the timestep embedding's t·freq to int8 before Sin/Cos (scale "
                 f"{scale:.3g}); `t-emb. + keep_fp FP` leaves that path and the layers denoq keeps in float "
                 f"({len(info.get('peer-t', {}).get('nodes_to_exclude', []))} nodes, `nodes_to_exclude`) in float.")
    return md_table(header, rows) + "\n\n" + note


def models_table(results: dict[str, Any]) -> str:
    header = ["model", "parameters", "sample", "calibration inputs", "peer: quant_pre_process",
              "peer: int8 scale of t·freq (Sin input)"]
    rows = []
    for m, r in results.items():
        peer = r["info"].get("peer", {})
        scale = peer.get("sin_input_scale")
        rows.append([m, f"{r['info']['parameters']:,}", "×".join(map(str, r["info"]["sample_shape"])),
                     str(r["info"]["calibration_inputs"]), str(peer.get("preprocessed", "reused")),
                     "–" if scale is None else f"{scale:.3g}"])
    return md_table(header, rows)


# -- main --------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits,big",
                   help="comma-separated: digits, big, or diffusers pipeline folders (default: digits,big)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes for latency (default: 1,8)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default: 7)")
    p.add_argument("--iters", type=int, default=0,
                   help="calls per variant per round; 0 = about --round-seconds for the slowest (default: 0)")
    p.add_argument("--round-seconds", type=float, default=0.5, help="target seconds per measurement (default: 0.5)")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default: 2)")
    p.add_argument("--n", type=int, default=512, help="samples for the quality section (default: 512)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps for the quality section (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling noise seed and the big model's seed (default: 0)")
    p.add_argument("--quality-model", default="digits", help="model for the quality section (default: digits)")
    p.add_argument("--skip-quality", action="store_true", help="latency and fusion only")
    p.add_argument("--skip-latency", action="store_true", help="quality only")
    p.add_argument("--groups", type=int, default=4,
                   help="timestep groups of the selector variants (denoq trt/ort-cpu G=N, timed against G=1); "
                        "1 = no selector variants (default: 4)")
    p.add_argument("--ptqd-head", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the trt graph with PTQD's correction head appended (default: on)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every compile (after the per-model defaults), repeatable")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where models, artifacts and the peer's graphs go (kept); default: a temp dir, removed")
    p.add_argument("--reuse", action="store_true",
                   help="reuse artifacts of the same recipe found in --out-dir (and the peer's graph as found)")
    p.add_argument("--peer-preprocess", action="store_true",
                   help="run onnxruntime's quant_pre_process before quantize_static (slower graphs here; off)")
    p.add_argument("--gptq-cols", default="256,512,1024,2048",
                   help="GPTQ timing: comma-separated column counts of random layers; empty = skip (default: "
                        "256,512,1024,2048)")
    p.add_argument("--gptq-rows", type=int, default=512, help="GPTQ timing: rows of each random layer (default: 512)")
    p.add_argument("--obq-max-cols", type=int, default=512, help="GPTQ timing: also time OBQ up to this many columns")
    p.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    args = p.parse_args(argv)
    args.gptq_cols = [int(c) for c in args.gptq_cols.split(",") if c.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.groups < 1:
        p.error("--groups must be ≥ 1")
    if args.reuse and args.out_dir is None:
        p.error("--reuse needs --out-dir")
    return args


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "versions": library_versions(), "loadavg_start": list(os.getloadavg()), "cpu": cpu_record()}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Prepare every model, time it, and sample the quality model; returns the JSON report."""
    report: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "environment": environment(), "models": {}}
    names = list(args.models)
    if not args.skip_quality and args.quality_model not in names:
        names.append(args.quality_model)
    prepared: dict[str, Prepared] = {}
    for name in names:
        start = time.perf_counter()
        prep = prepare(name, work, args.sets, args.seed, args.reuse, args.peer_preprocess,
                       args.groups if name in args.models else 1, args.ptqd_head and name in args.models)
        prepared[name] = prep
        entry: dict[str, Any] = {"info": prep.info, "paths": {k: str(p) for k, p in prep.paths.items()}}
        entry["info"]["prepare_seconds"] = round(time.perf_counter() - start, 1)
        if name in args.models:
            entry["fusion"] = bench_fusion(prep)
            if not args.skip_latency:
                entry["latency"] = bench_latency(prep, args.batches, args.rounds, args.iters, args.threads,
                                                 args.round_seconds, args.groups)
        report["models"][prep.name] = entry
    if not args.skip_quality:
        prep = prepared[args.quality_model]
        report["quality"] = {"model": prep.name, **bench_quality(prep, steps=args.steps, seed=args.seed, n=args.n,
                                                                 threads=args.threads)}
    if args.gptq_cols:
        report["gptq"] = bench_gptq(args.gptq_cols, args.gptq_rows, args.obq_max_cols, args.seed)
    report["environment"]["loadavg_end"] = list(os.getloadavg())
    report["seconds"] = round(time.perf_counter() - _T0, 1)
    return report


# -- GPTQ / OBQ timing ---------------------------------------------------------------------------------------

def bench_gptq(cols_list: list[int], rows: int, obq_max_cols: int, seed: int) -> dict[str, Any]:
    """Seconds of GPTQ (4-bit, per channel, block 128) and OBQ on random `[rows, cols]` layers whose Hessian comes
    from correlated random inputs (rank cols/4 + noise, 2·cols samples), float64, on CUDA when torch has it. GPTQ
    is O(rows·cols² + cols³) and OBQ O(rows·cols³): the fitted log-log slope of time vs cols shows the growth."""
    from denoq.calibrators.gptq import GptqSettings, gptq, obq

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    settings = GptqSettings(bits=4)
    out: dict[str, Any] = {"device": device, "rows": rows, "threads": torch.get_num_threads(), "layers": []}
    warm = torch.eye(32, dtype=torch.float64, device=device)
    gptq(torch.randn(8, 32, generator=g).to(device), warm, settings)  # first-call overheads out of the timings
    obq(torch.randn(8, 32, generator=g).to(device), warm, settings)
    for cols in cols_list:
        basis = torch.randn(cols, cols // 4, generator=g, dtype=torch.float64)
        x = basis @ torch.randn(cols // 4, 2 * cols, generator=g, dtype=torch.float64)
        x += 0.1 * torch.randn(cols, 2 * cols, generator=g, dtype=torch.float64)
        h = (2 * x @ x.T / x.shape[1]).to(device)
        w = torch.randn(rows, cols, generator=g).to(device)
        entry: dict[str, Any] = {"cols": cols}
        for name, fn in (("gptq", gptq), ("obq", obq)):
            if name == "obq" and cols > obq_max_cols:
                continue
            start = time.perf_counter()
            fn(w, h, settings)
            if device == "cuda":
                torch.cuda.synchronize()
            entry[f"{name}_s"] = time.perf_counter() - start
        log(f"gptq timing: {rows}×{cols}: " + ", ".join(f"{k} {v:.2f}" for k, v in entry.items() if k != "cols"))
        out["layers"].append(entry)
    for name in ("gptq", "obq"):
        pts = [(e["cols"], e[f"{name}_s"]) for e in out["layers"] if f"{name}_s" in e]
        if len(pts) >= 2:
            lx = np.log([c for c, _ in pts])
            ly = np.log([max(t, 1e-9) for _, t in pts])
            out[f"{name}_slope"] = float(np.polyfit(lx, ly, 1)[0])
    return out


def gptq_table(r: dict[str, Any]) -> str:
    lines = [f"{r['rows']} rows, 4-bit, per channel, on {r['device']} ({r['threads']} torch threads); "
             f"log-log slope of time vs columns: GPTQ {r.get('gptq_slope', float('nan')):.2f}"
             + (f", OBQ {r['obq_slope']:.2f}" if "obq_slope" in r else ""), "",
             "| columns | GPTQ s | OBQ s |", "|---|---|---|"]
    for e in r["layers"]:
        obq_s = f"{e['obq_s']:.2f}" if "obq_s" in e else "—"
        lines.append(f"| {e['cols']} | {e['gptq_s']:.2f} | {obq_s} |")
    return "\n".join(lines)


def render(report: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown sections printed to stdout."""
    timed = {m: r for m, r in report["models"].items() if "latency" in r}
    fused = {m: r for m, r in report["models"].items() if "fusion" in r}
    parts = ["## Models\n", models_table(report["models"])] if report["models"] else []
    if timed:
        parts += ["\n## Latency per model call\n", latency_table(timed, args.threads, args.rounds)]
        if any(k in per for r in timed.values() for per in r["latency"].values() for k in SELECTORS):
            parts += ["\n## Timestep selector overhead\n", selector_table(timed, args.groups)]
        if any(k in per for r in timed.values() for per in r["latency"].values() for k in HEADS):
            parts += ["\n## PTQD head overhead\n", head_table(timed)]
    if fused:
        parts += ["\n## Integer-kernel fusion in ONNX Runtime (CPU EP)\n", fusion_table(fused, args.groups)]
    if "quality" in report:
        model = report["quality"]["model"]
        parts += ["\n## Sample quality\n", quality_table(model, report["quality"], report["models"][model]["info"])]
    if "gptq" in report:
        parts += ["\n## GPTQ / OBQ time vs layer width\n", gptq_table(report["gptq"])]
    env = report["environment"]
    cpu = env["cpu"]
    parts.append(f"\nCPU: {cpu['model']}, instruction set seen by ONNX Runtime: {cpu['isa']} (u8×s8 kernels "
                 f"{'saturate' if cpu['u8s8_saturates'] else 'exact'} without session.x64quantprecision).")
    parts.append(f"\nRun: {report['seconds']:.0f} s on {env['cpu_count']} CPUs (load average "
                 f"{env['loadavg_start'][0]:.1f} → {env['loadavg_end'][0]:.1f}), onnxruntime "
                 f"{env['versions']['onnxruntime']}, torch {env['versions']['torch']}.")
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "accelerate not found" on every model load
    args = parse_args(argv)
    work = args.out_dir or Path(tempfile.mkdtemp(prefix="denoq-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"working in {work}")
    try:
        report = run(args, work)
    finally:
        if args.out_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(render(report, args), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
