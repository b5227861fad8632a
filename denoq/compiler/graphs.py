"""The passes stage: the FP ONNX graph + the QuantPlan → the Q/DQ graph and the graphs derived from it.

`model.qdq.onnx` (Q/DQ, timestep selectors, IGQ groups, attention; PTQD's head unless it goes after the
guidance combination, `head_after_guidance`), for a
class-conditional model `model.guided.onnx` (the classifier-free guidance combination, PTQD's head after it when
calibrated on guided trajectories), and for target trt `model.trt.onnx` (float16 with float32 islands) with the
TensorRT rule check. Each pipeline of passes is verified after every pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx

from denoq.calibrators.ptqd import PtqdStats
from denoq.compiler.artifact_writer import ArtifactWriter
from denoq.compiler.build import TRT_GRAPH
from denoq.compiler.load import ModelSpec
from denoq.compiler.recipe import Recipe
from denoq.onnxio import save_model
from denoq.passes.fp16 import ConvertFp16
from denoq.passes.guidance import GUIDED_GRAPH, GuideClassFree
from denoq.passes.manager import PassManager, PassRecord
from denoq.passes.ptqd_head import AppendPtqdHead
from denoq.passes.qdq import InsertQDQ
from denoq.passes.trt_rules import summarize, trt_violations
from denoq.plan import QuantPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Graphs:
    """The graphs the passes wrote (None where not made), what each pass did, and the TensorRT rule violations
    (None for target ort-cpu). `trt_graph` names the file `denoq build` compiles."""

    qdq: Path
    guided: Path | None
    half: Path | None
    records: list[PassRecord]
    trt_rules: list | None
    trt_graph: str | None


def head_after_guidance(spec: ModelSpec, guided_scales: list[float]) -> bool:
    """Whether PTQD's head goes after the in-graph guidance combination (a class-conditional model calibrated on
    guided trajectories) rather than into `model.qdq.onnx`. A text model's guidance is combined by its pipeline,
    outside the graph; its head stays in the Q/DQ graph, which gives the same result: the head is affine,
    ε ↦ (ε − b_t)/(1 + k_t), and the combination u + s·(c − u) has weights summing to 1, so correcting both halves
    and combining equals combining and correcting."""
    return bool(guided_scales) and spec.cond_input == "class_labels"


def write_graphs(spec: ModelSpec, recipe: Recipe, plan: QuantPlan, ptqd: PtqdStats | None, guided_scales: list[float],
                 fp_path: Path, writer: ArtifactWriter) -> Graphs:
    """Run the pass pipelines on `fp_path` and save their graphs into `writer`'s folder."""
    head = [] if ptqd is None else [AppendPtqdHead(ptqd.bias, ptqd.inv_one_plus_k)]
    after = head_after_guidance(spec, guided_scales)
    qdq, records = PassManager([InsertQDQ(plan), *([] if after else head)], verify=True)(
        onnx.load(str(fp_path)))
    qdq_path = writer.path("model.qdq.onnx")
    save_model(qdq, qdq_path)
    guided_path = None
    if spec.cond_input == "class_labels":  # the guided graph; PTQD's head after the combination when guided
        guided, guided_records = PassManager([GuideClassFree(int(spec.num_classes)),
                                              *(head if guided_scales else [])], verify=True)(qdq)
        guided_path = writer.path(GUIDED_GRAPH)
        save_model(guided, guided_path)
        records += guided_records
    rules, trt_graph, half_path = None, None, None
    if recipe.config.target == "trt":
        graph = qdq
        if recipe.config.trt.fp16:
            patterns = spec.layer_patterns(recipe.config.trt.fp32_layers)
            graph, half_records = PassManager([ConvertFp16(patterns)], verify=True)(qdq)
            half_path = writer.path(TRT_GRAPH)
            save_model(graph, half_path)
            records += half_records
        trt_graph = TRT_GRAPH if half_path else "model.qdq.onnx"
        rules = trt_violations(graph)
        if rules:
            log.info("TensorRT: %s (manifest trt_rules; denoq build refuses this graph)", summarize(rules))
    for rec in records:
        log.info("pass %s", rec.summary())
    return Graphs(qdq_path, guided_path, half_path, records, rules, trt_graph)
