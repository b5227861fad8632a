"""The store stage: the plan, PTQD's tables and the manifest into the artifact folder, which is then committed
(renamed into place; `denoq.compiler.artifact`). Also what the manifest reports of the model's cost: MACs and BOPs
per call, and the weights' bytes on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from safetensors.torch import save_file

from denoq.bops import FLOAT_BITS, layer_macs, plan_bops
from denoq.calibrators.ptqd_plot import ptqd_pictures
from denoq.compiler.artifact import Artifact
from denoq.compiler.artifact_writer import ArtifactWriter
from denoq.compiler.backends import PTQD_FILE, torch_eps
from denoq.compiler.calibrate import Calibration
from denoq.compiler.graphs import Graphs
from denoq.compiler.load import ModelSpec
from denoq.compiler.recipe import Recipe
from denoq.cpu import cpu_record
from denoq.export.onnx_export import GraphInputs
from denoq.passes.guidance import GUIDED_GRAPH
from denoq.plan import QuantPlan


@dataclass(frozen=True)
class Checks:
    """The checks stage's result: the parity figures (`denoq.compiler.parity`) and the gate's verdict."""

    parity: dict[str, float]
    gate: dict[str, Any]


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of a graph's weight tensors: its initializers of rank ≥ 2 (float, int8, packed int4)."""
    model = onnx.load(str(path))
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer
               if len(t.dims) >= 2)


def weight_storage(plan: QuantPlan, fp_path: Path, qdq_path: Path) -> dict[str, Any]:
    """On-disk weight bytes of the Q/DQ graph vs the FP32 graph, and the conv layers whose ≤ 4-bit integers sit
    in an int8 container (TensorRT has no INT4 convolution; MatMul / Gemm weights are ONNX int4)."""
    fp, qdq = onnx_weight_bytes(fp_path), onnx_weight_bytes(qdq_path)
    return {"fp32_bytes": fp, "qdq_bytes": qdq, "ratio": round(qdq / max(fp, 1), 4),
            "conv_int4_in_int8_container": sorted(n for n, lp in plan.layers.items()
                                                  if lp.op == "conv" and lp.weight_bits <= 4)}


def model_cost(spec: ModelSpec, plan: QuantPlan, inputs: GraphInputs) -> dict[str, Any]:
    """MACs and BOPs of one model call with a batch of one (`denoq.bops`), quantized and FP."""
    x, t = inputs.sample[:1], inputs.timestep[:1]
    cond = None if inputs.cond is None else inputs.cond[:1]
    macs = layer_macs(spec.module, lambda: torch_eps(spec.module)(x, t, cond))
    return {"macs_per_call": sum(macs.values()), "bops_per_call": plan_bops(macs, plan),
            "fp_bops_per_call": plan_bops(macs, None), "float_bits": FLOAT_BITS}


def store(writer: ArtifactWriter, spec: ModelSpec, recipe: Recipe, cal: Calibration, inputs: GraphInputs,
          layer_map: dict[str, Any], graphs: Graphs, checks: Checks, guided_scales: list[float]) -> Artifact:
    """Write the plan and PTQD's tables beside the graphs, assemble the manifest and commit the folder."""
    plan, ptqd = cal.plan, cal.ptqd
    plan_meta = plan.save(writer.path("plan.safetensors"))
    if ptqd is not None:
        save_file(ptqd.to_tensors(), str(writer.path(PTQD_FILE)))
        writer.path("ptqd.png").write_bytes(ptqd_pictures(ptqd))
    storage = weight_storage(plan, writer.path("model.fp.onnx"), graphs.qdq)
    c = recipe.config
    manifest = {
        "recipe": recipe.to_dict(),
        "cost": model_cost(spec, plan, inputs),
        "model": spec.describe(),
        "scheduler": spec.scheduler_config,
        "plan": plan_meta,
        "weights": storage,
        **({} if ptqd is None else {"ptqd": {**ptqd.meta(), "vsc": c.ptqd.vsc, "correlation": c.ptqd.correlation,
                                             "guidance": guided_scales or None}}),
        **({} if graphs.guided is None else {"guidance": {"graph": GUIDED_GRAPH, "calib_scales": guided_scales,
                                                          "ptqd_after_guidance": bool(guided_scales and ptqd)}}),
        "layer_map": layer_map,
        "calibration": cal.info,
        "checks": checks.parity,
        "parity_gate": checks.gate,
        "cpu": cpu_record(),
        **({} if graphs.trt_rules is None else {
            "trt": {"graph": graphs.trt_graph, "fp16": c.trt.fp16},
            "trt_rules": {"count": len(graphs.trt_rules), "violations": [str(v) for v in graphs.trt_rules]}}),
        "passes": [rec.summary(timed=False) for rec in graphs.records],
        "pass_seconds": [round(rec.seconds, 3) for rec in graphs.records],
    }
    return writer.commit(manifest)


