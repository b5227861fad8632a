"""`denoq compile`: model + recipe → artifact folder (docs/architecture.md, Flow). Orchestration only.

The stages, each a function with typed inputs and outputs:
load (`load_model` → ModelSpec) → calibrate (`calibrate.calibrate` → Calibration: the QuantPlan) → export
(`export_fp` → model.fp.onnx and the module → weight map) → passes (`graphs.write_graphs` → Graphs: the Q/DQ graph
and those derived from it) → checks (`check` → Checks: parity of the Q/DQ graph in ONNX Runtime against the PyTorch
simulation, and its gate) → store (`store.store` → Artifact: written to a temporary folder, renamed into place).
Mixed precision is a stage above this one (`denoq.compiler.mixed_compile`), which calls it once per member.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from denoq.calibrators.calibset import CalibrationSet
from denoq.compiler.artifact import Artifact
from denoq.compiler.artifact_writer import ArtifactWriter, check_output_dir
from denoq.compiler.calibrate import Calibration, calibrate, check_inputs, guidance_scales, resolve_sampler
from denoq.compiler.data_parallel import on_main
from denoq.compiler.graphs import Graphs, head_after_guidance, write_graphs
from denoq.compiler.load import ModelSpec, load_model
from denoq.compiler.parity import check_gate, check_scales, first_disagreeing_layer, guided_parity, parity
from denoq.compiler.recipe import Recipe
from denoq.compiler.store import Checks, store
from denoq.errors import DenoqError
from denoq.export.onnx_export import GraphInputs, export_fp

log = logging.getLogger(__name__)


def export(spec: ModelSpec, inputs: GraphInputs, path: Path) -> dict[str, Any]:
    """The export stage: the FP ONNX graph at `path` (checked against PyTorch) and its module → weight map."""
    start = time.perf_counter()
    layer_map = export_fp(spec.module, inputs, path)
    log.info("exported FP ONNX (%d quantizable layers mapped) in %.1f s", len(layer_map), time.perf_counter() - start)
    return layer_map


def check(spec: ModelSpec, cal: Calibration, inputs: GraphInputs, fp_path: Path, graphs: Graphs,
          layer_map: dict[str, Any], guided_scales: list[float], allow_parity_failure: bool) -> Checks:
    """The checks stage: ONNX Runtime on the written graphs against the PyTorch simulation (`parity`), and the
    gate: DenoqError beyond its bound unless `allow_parity_failure`."""
    ptqd = cal.ptqd
    after = head_after_guidance(spec, guided_scales)
    checks = parity(spec, cal.plan, inputs, fp_path, graphs.qdq, None if after else ptqd, graphs.half)
    if graphs.guided is not None:
        scales = check_scales(guided_scales, len(inputs.sample))
        checks.update(guided_parity(spec, cal.plan, inputs, scales, graphs.qdq, graphs.guided, ptqd if after else None))
    log.info("parity: %s", json.dumps({k: v if isinstance(v, str) else float(f"{v:.3g}") for k, v in checks.items()}))
    gate = check_gate(checks, allow_parity_failure,
                      lambda: first_disagreeing_layer(spec, cal.plan, inputs, graphs.qdq, layer_map))
    if not gate["passed"]:
        log.warning("parity gate failed (allowed): ratio %.2f > %s, first layer %s", gate["ratio"], gate["bound"],
                    gate["first_layer"])
    return Checks(checks, gate)


def compile_model(model: str | None, recipe: Recipe, out: Path, *, force: bool = False,
                  allow_parity_failure: bool = False, pool: CalibrationSet | None = None) -> Artifact | None:
    """Compile `model` with `recipe` into the artifact folder `out` (see module docstring): one model, one plan.
    `denoq.compiler.api.compile_artifact` also compiles `precision.mixed` recipes (`denoq.compiler.mixed_compile`).

    DenoqError when the Q/DQ graph in ONNX Runtime disagrees with the simulation beyond the parity bound
    (`denoq.compiler.parity`), unless `allow_parity_failure`, which the manifest then records. `pool`: the
    calibration inputs of a user's own loop (`record_calls`) instead of denoq's trajectories.

    Under a process group (`torchrun`: docs/distributed.md) every rank calibrates its shard and ends with the same
    plan; rank 0 alone checks `out`, exports and writes, and the others return None once it has committed (or
    fail with its one line)."""
    if recipe.config.precision.mixed:
        raise DenoqError(f"precision.mixed={recipe.config.precision.mixed} compiles one member per candidate; use "
                         "denoq.quantize or denoq.compiler.api.compile_artifact (the CLI does)")
    on_main(lambda: check_output_dir(out, force), "checking the output folder")
    spec = load_model(model, recipe.config.calib.size)
    recipe = resolve_sampler(spec, recipe)
    log.info("model %s: %s, sample %s, %s parameters", spec.name, spec.model_class, spec.sample_shape,
             f"{sum(p.numel() for p in spec.module.parameters()):,}")
    torch.manual_seed(recipe.config.seed)
    cal = calibrate(spec, recipe, pool)
    log.info("calibrated %d layers on %d inputs in %s s", len(cal.plan.layers), cal.info["inputs"],
             cal.info["seconds"])
    inputs = check_inputs(spec, cal.calib)
    return on_main(lambda: write(spec, recipe, cal, inputs, out, force, allow_parity_failure), "writing the artifact")


def write(spec: ModelSpec, recipe: Recipe, cal: Calibration, inputs: GraphInputs, out: Path, force: bool,
          allow_parity_failure: bool) -> Artifact:
    """The export, passes, checks and store stages of `compile_model`, in an atomic `ArtifactWriter`."""
    scales = guidance_scales(spec, recipe)
    with ArtifactWriter(out, force) as writer:
        fp_path = writer.path("model.fp.onnx")
        layer_map = export(spec, inputs, fp_path)
        graphs = write_graphs(spec, recipe, cal.plan, cal.ptqd, scales, fp_path, writer)
        checks = check(spec, cal, inputs, fp_path, graphs, layer_map, scales, allow_parity_failure)
        art = store(writer, spec, recipe, cal, inputs, layer_map, graphs, checks, scales)
    storage = art.manifest["weights"]
    log.info("weights on disk: %.2f MB vs %.2f MB FP32 (×%.3f)", storage["qdq_bytes"] / 1e6,
             storage["fp32_bytes"] / 1e6, storage["ratio"])
    log.info("wrote %s", out)
    return art
