"""`denoq validate ART`: every backend this machine can run, compared with the ORT CPU reference.

Per tensor, through polygraphy's Comparator (runners over the same feeds): ONNX Runtime on the CPU runs the
float32 Q/DQ graph (the reference), the FP graph (the quantization error's own size) and, for a trt artifact, the
float16 TensorRT graph; where present, the TensorRT engine (`TrtRunner`) and ORT's CUDA / TensorRT providers.
Runners carry the sampler backends' names (`ort`, `ort-fp`, `ort-fp16`, `ort-cuda`, `ort-trt`, `trt`).
The feeds are real model inputs: states of FP DDIM trajectories (flow-matching Euler for a flow model) at
timesteps spread over the schedule.

Per image: each available sampler backend draws the same noise through the same DDIM (or flow-Euler) steps; PSNR
against the reference backend's images.

Tolerances. Elementwise 1e-5 is meaningless for a quantized graph: a float difference of 1e-7 (another kernel's
summation order, float16 activations) flips the rounding of some activation quantizer and the flip propagates
(docs/architecture.md, Quantizer semantics), so two correct executors of one quantized graph differ by rounding errors
of the quantization's own size. Per tensor, with e = RMS(reference − FP) the quantization error:
RMS(backend − reference) ≤ `DIFF_LIMIT` · e (√2: two equally good executions whose rounding errors were
independent differ by √2 · e; more means the backend computes something else) and RMS(backend − FP) ≤
`ERROR_LIMIT` · e (the backend adds at most 25 % to the quantization error; both limits live in
`denoq.engines.compare`). Per image: PSNR(backend, reference) ≥ PSNR(reference, FP) − `IMAGE_MARGIN_DB` (the
backend's images are about as close to the reference as the reference is to the FP model; a deterministic DDIM
trajectory amplifies early flips, hence the margin). A backend that cannot run here is listed with the reason,
never silently dropped. Results go to the artifact's `validate.json` and `validate.png`; any failure makes
`denoq validate` exit non-zero.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch

from denoq.compiler.artifact import Artifact
from denoq.compiler.backends import artifact_model, torch_eps
from denoq.compiler.build import TRT_GRAPH, beside, engine_bytes, trt_graph
from denoq.compiler.generate import check_own_sampling, generate
from denoq.compiler.pictures import grid_image
from denoq.engines.compare import DIFF_LIMIT, ERROR_LIMIT, FP, REFERENCE, run_comparison, tensor_checks
from denoq.engines.ort import create_session, gpu_providers
from denoq.engines.trt import require
from denoq.errors import DenoqError
from denoq.metrics import psnr
from denoq.onnxio import load_model
from denoq.sampling import sample, schedule_from_config
from denoq.sampling.flow import FlowSchedule
from denoq.sampling.names import default_sampler

IMAGE_MARGIN_DB = 3.0


@dataclass(frozen=True)
class ValidateSettings:
    """`batches` feed dicts of `batch` trajectory states each (a spread of timesteps per batch); images: `n`
    samples of DDIM (flow-Euler for a flow model) with `steps` steps from `seed`."""

    batch: int = 8
    batches: int = 4
    n: int = 16
    steps: int = 20
    seed: int = 0


def feeds(art: Artifact, settings: ValidateSettings) -> list[dict[str, np.ndarray]]:
    """Real graph inputs: FP trajectory states (DDIM, or the flow-matching Euler sampler of a flow model), each
    batch holding timesteps spread over the schedule."""
    check_own_sampling(art)
    spec = artifact_model(art)
    sampler = default_sampler(spec.scheduler_config)
    n = settings.batch * settings.batches
    cond = spec.random_cond(n, settings.seed + 1)
    graph = load_model(art.file("model.qdq.onnx"), load_external_data=False).graph
    timestep_dtype = next(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                          for i in graph.input if i.name == "timestep")
    states: list[tuple[torch.Tensor, float]] = []
    schedule = schedule_from_config(spec.scheduler_config)
    sample(torch_eps(spec.module), schedule, sampler=sampler, steps=settings.steps, shape=(n, *spec.sample_shape),
           generator=torch.Generator().manual_seed(settings.seed), cond=cond, desc=f"FP {sampler}",
           callback=lambda i, t, x, out: states.append((x.clone(), float(t[0]))),
           mu=schedule.mu_for(spec.sample_shape, spec.patch) if isinstance(schedule, FlowSchedule) else None)
    out = []
    for b in range(settings.batches):
        rows = range(b * settings.batch, (b + 1) * settings.batch)
        picks = [states[(b + i * settings.batches) % len(states)] for i in range(settings.batch)]
        sample_rows = torch.stack([s[0][r] for s, r in zip(picks, rows, strict=True)])
        feed = {"sample": sample_rows.numpy(), "timestep": np.array([s[1] for s in picks], dtype=timestep_dtype)}
        if cond is not None:
            feed[str(spec.cond_input)] = cond[list(rows)].numpy()
        out.append(feed)
    return out


def _runners(art: Artifact) -> tuple[list[Any], dict[str, str]]:
    """Polygraphy runners for every executor available here, and why each missing one is missing."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    def ort(name: str, path: str, providers: Callable[[], list[Any]]) -> Any:
        return OnnxrtRunner(lambda: create_session(art.file(path), threads=None, execution_providers=providers()),
                            name=name)

    runners = [ort(REFERENCE, "model.qdq.onnx", lambda: ["CPUExecutionProvider"]),
               ort(FP, "model.fp.onnx", lambda: ["CPUExecutionProvider"])]
    skipped: dict[str, str] = {}
    if art.has(TRT_GRAPH):
        runners.append(ort("ort-fp16", TRT_GRAPH, lambda: ["CPUExecutionProvider"]))
    for name, kind in (("ort-cuda", "cuda"), ("ort-trt", "tensorrt")):
        try:  # the same graphs as the sampler backends of these names (`backends.make_backend`)
            path = "model.qdq.onnx" if kind == "cuda" else trt_graph(art)
            providers = gpu_providers(kind, beside(art, "ort-trt-cache"))
            runners.append(ort(name, path, lambda p=providers: p))
        except DenoqError as exc:
            skipped[name] = str(exc)
    try:
        data = engine_bytes(art)
        trt_backend = require("polygraphy.backend.trt", "the TensorRT comparison")
        runners.append(trt_backend.TrtRunner(trt_backend.EngineFromBytes(data), name="trt"))
    except DenoqError as exc:
        skipped["trt"] = str(exc)
    return runners, skipped


def image_checks(art: Artifact, backends: list[str], settings: ValidateSettings
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """PSNR of each backend's samples vs the `ort` reference's, from the same noise; the samples themselves."""
    kw = {"sampler": default_sampler(art.manifest["scheduler"]), "steps": settings.steps, "eta": 0.0,
          "seed": settings.seed, "n": settings.n}
    images = {name: generate(art, name, **kw) for name in [REFERENCE, FP, *backends]}
    ref_vs_fp = psnr(images[REFERENCE], images[FP])
    out = {"reference": {"psnr_vs_fp_db": round(ref_vs_fp, 2)}}
    for name in backends:
        value = psnr(images[name], images[REFERENCE])
        out[name] = {"psnr_vs_reference_db": round(value, 2), "passed": value >= ref_vs_fp - IMAGE_MARGIN_DB}
    return out, images


def validate(art: Artifact, settings: ValidateSettings = ValidateSettings()) -> dict[str, Any]:
    """Run every available comparison; returns the report (also written into the artifact)."""
    require("polygraphy", "denoq validate")
    if "mixed" in art.manifest:
        raise DenoqError(f"{art.path} is a mixed-precision artifact; validate each member: denoq validate "
                         f"{art.path}/members/NAME")
    runners, skipped = _runners(art)
    tensors = tensor_checks(run_comparison(runners, feeds(art, settings)))
    image_backends = [r.name for r in runners if r.name not in (REFERENCE, FP)]
    images, samples = image_checks(art, image_backends, settings)
    passed = all(v.get("passed", True) for v in [*tensors.values(), *images.values()])
    report = {"passed": passed, "reference": "ORT CPU on model.qdq.onnx", "diff_limit": DIFF_LIMIT,
              "error_limit": ERROR_LIMIT, "image_margin_db": IMAGE_MARGIN_DB, "tensors": tensors, "images": images,
              "skipped": skipped, "settings": settings.__dict__}
    art.add_files({"validate.json": (json.dumps(report, indent=2, sort_keys=True) + "\n").encode(),
                   "validate.png": _picture(samples)}, {"validate": {"passed": passed, "skipped": sorted(skipped)}})
    return report


def _picture(samples: dict[str, torch.Tensor]) -> bytes:
    """One row of samples per backend, labelled."""
    from PIL import Image, ImageDraw

    rows = [(name, grid_image(x, ncol=x.shape[0])) for name, x in samples.items()]
    label = 90
    width = label + max(img.width for _, img in rows)
    canvas = Image.new("RGB", (width, sum(img.height for _, img in rows)), "white")
    y = 0
    for name, img in rows:
        canvas.paste(img.convert("RGB"), (label, y))
        ImageDraw.Draw(canvas).text((4, y + img.height // 2 - 5), name, fill="black")
        y += img.height
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
