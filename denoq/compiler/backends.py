"""Wire a backend into the sampler: the only place that turns an artifact into an `eps(x, t, cond)` callable.

Backends: `torch-fp` (the FP PyTorch model), `torch-sim` (the PyTorch simulation of the Q/DQ graph), `ort` (ONNX
Runtime on `model.qdq.onnx`, CPU), `ort-fp` (ONNX Runtime on `model.fp.onnx`) and `ort-fp16` (ONNX Runtime, CPU,
on the float16 graph compiled for TensorRT, `model.trt.onnx`); on an NVIDIA GPU with
`denoq[gpu]`: `trt` (the artifact's TensorRT engine, `denoq build`), `ort-cuda` (ORT's CUDA provider on
`model.qdq.onnx`) and `ort-trt` (ORT's TensorRT provider on the TensorRT graph, engine cache beside the artifact).
Each GPU backend says exactly what is missing when it cannot run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from denoq.calibrators.ptqd import PtqdStats
from denoq.calibrators.simulate import simulate
from denoq.compiler.artifact import Artifact
from denoq.compiler.backend_names import BACKENDS, QUANTIZED_BACKENDS
from denoq.compiler.load import ModelSpec, load_model
from denoq.errors import DenoqError
from denoq.plan import QuantPlan
from denoq.sampling import module_eps
from denoq.sampling.cond import timestep_index
from denoq.sampling.guidance import classifier_free

EpsFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def torch_eps(module: torch.nn.Module) -> EpsFn:
    """The sampler's eps callable around a diffusers UNet or a SimulatedModel (`module_eps` without gradients)."""
    inner = module_eps(module)

    def eps(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        with torch.no_grad():
            return inner(x, t, cond)

    return eps


def artifact_model(art: Artifact) -> ModelSpec:
    """Reload the FP model an artifact was compiled from, refusing a model whose weights changed since."""
    meta = art.manifest["model"]
    spec = load_model(meta["name"])
    if spec.weights_sha256 != meta["weights_sha256"]:
        raise DenoqError(f"model {meta['name']} changed since {art.path} was compiled (weights sha256 differs); "
                         "recompile the artifact")
    return spec


def check_timestep_tables(art: Artifact) -> None:
    """The plan's per-timestep tables (and the graph's Gather tables made from them) have length T = the
    scheduler's num_train_timesteps; an artifact whose scheduler says otherwise would index past them."""
    tables = int(art.manifest["plan"]["num_train_timesteps"])
    scheduler = int(art.manifest["scheduler"].get("num_train_timesteps", 1000))
    if tables != scheduler:
        raise DenoqError(f"{art.path}: the quantization tables have length T = {tables} but the artifact's scheduler "
                         f"has num_train_timesteps = {scheduler}; recompile with the scheduler you sample with")


def artifact_plan(art: Artifact) -> QuantPlan:
    check_timestep_tables(art)
    return QuantPlan.load(art.file("plan.safetensors"), art.manifest["plan"])


PTQD_FILE = "ptqd.safetensors"


def artifact_ptqd(art: Artifact) -> PtqdStats | None:
    """The artifact's PTQD statistics (`ptqd.safetensors` + manifest `ptqd`), or None when it has no head."""
    meta = art.manifest.get("ptqd")
    if meta is None:
        return None
    from safetensors.torch import load_file

    return PtqdStats.from_tensors(load_file(str(art.file(PTQD_FILE))), meta)


def with_ptqd_head(eps: EpsFn, stats: PtqdStats | None) -> EpsFn:
    """`eps` followed by the correction head in the graph's op order (`passes.ptqd_head.apply_head`)."""
    if stats is None:
        return eps
    from denoq.passes.ptqd_head import apply_head

    bias, inv = stats.bias.float(), stats.inv_one_plus_k.float()

    def corrected(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        out = eps(x, t, cond)
        rows = timestep_index(torch.as_tensor(t).reshape(-1).expand(out.shape[0]), bias.shape[0])
        return apply_head(out, rows, bias, inv)

    return corrected


def sampling_variance(art: Artifact, backend: str, sampler: str, steps: int) -> torch.Tensor | None:
    """For a quantized backend of an artifact with a PTQD head: refuse a sampler / step count other than the one
    its statistics were measured with, and return the residual variance table for the sampler's variance schedule
    calibration when the recipe asks for it (`ptqd.vsc`); None otherwise."""
    meta = art.manifest.get("ptqd")
    if meta is None or backend not in QUANTIZED_BACKENDS:
        return None
    from denoq.calibrators.ptqd import check_matches

    check_matches(meta, sampler, steps)
    stats = artifact_ptqd(art)
    return stats.corrected_var if meta.get("vsc") and stats is not None else None


def check_ort_runs(art: Artifact) -> None:
    """DenoqError when ONNX Runtime's CPU kernels cannot run the artifact's Q/DQ graph (its checks ran in
    `onnx.reference`: NVFP4)."""
    if art.manifest.get("checks", {}).get("qdq_executor") == "onnx.reference":
        raise DenoqError(f"{art.path} holds NVFP4 (float4e2m1, TensorRT's FP4 op), which ONNX Runtime's CPU kernels "
                         "do not run; use --backend onnx-ref (onnx.reference), torch-sim, or trt")


def make_backend(art: Artifact, name: str, *, threads: int | None = None, spec: ModelSpec | None = None) -> EpsFn:
    """The eps callable of backend `name` for artifact `art` (`spec` avoids reloading the FP model)."""
    if name not in BACKENDS:
        raise DenoqError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in QUANTIZED_BACKENDS and name != "torch-sim":
        check_timestep_tables(art)
    if name == "trt":
        from denoq.compiler.build import engine_bytes
        from denoq.engines.trt import TrtBackend

        return TrtBackend(engine_bytes(art), cuda_graph=True)
    if name in ("ort-fp16", "ort-cuda", "ort-trt"):
        from denoq.compiler.build import TRT_GRAPH, beside, trt_graph
        from denoq.engines.ort import OrtBackend, gpu_providers

        if name == "ort-fp16":
            if not art.has(TRT_GRAPH):
                raise DenoqError(f"{art.path} has no float16 graph {TRT_GRAPH}; compile it with target=trt and "
                                 "trt.fp16=true")
            return OrtBackend(art.file(TRT_GRAPH), threads=threads, providers=["CPUExecutionProvider"])
        if name == "ort-cuda":
            return OrtBackend(art.file("model.qdq.onnx"), providers=gpu_providers("cuda"))
        return OrtBackend(art.file(trt_graph(art)), providers=gpu_providers("tensorrt", beside(art, "ort-trt-cache")))
    if name == "onnx-ref":
        from denoq.engines.reference import reference_backend

        return reference_backend(art.file("model.qdq.onnx"))
    if name in ("ort", "ort-fp"):
        from denoq.engines.ort import OrtBackend

        if name == "ort":
            check_ort_runs(art)
        return OrtBackend(art.file("model.qdq.onnx" if name == "ort" else "model.fp.onnx"), threads=threads,
                          providers=["CPUExecutionProvider"])
    spec = spec or artifact_model(art)
    if name == "torch-fp":
        return torch_eps(spec.module)
    sim = torch_eps(simulate(spec.module, artifact_plan(art)))
    return sim if ptqd_after_guidance(art) else with_ptqd_head(sim, artifact_ptqd(art))


def ptqd_after_guidance(art: Artifact) -> bool:
    """True when the artifact's PTQD statistics were taken on guided outputs (`calib.guidance`): the head then
    follows the guidance combination (the guided graph, or `guide`), and no plain graph or backend carries it."""
    return bool((art.manifest.get("ptqd") or {}).get("guidance"))


def check_guidance(art: Artifact, name: str, guidance: float | None) -> bool:
    """Whether backend `name` of `art` takes PTQD's head after the guidance combination (statistics taken on
    guided outputs); refuse sampling such an artifact unguided, or at a scale it was not calibrated at."""
    after = ptqd_after_guidance(art) and name in QUANTIZED_BACKENDS
    scales = (art.manifest.get("ptqd") or {}).get("guidance") or []
    if after and (guidance is None or float(guidance) not in [float(s) for s in scales]):
        asked = "without guidance" if guidance is None else f"at guidance {guidance:g}"
        raise DenoqError(f"{art.path}: PTQD's statistics were taken on outputs guided at "
                         f"{', '.join(f'{s:g}' for s in scales)}; sampling {asked} would correct with the wrong "
                         f"tables: pass --guidance {scales[0]:g}, or recompile with --set calib.guidance=<scale>")
    return after


def guide(art: Artifact, name: str, eps: EpsFn, guidance: float | None) -> EpsFn:
    """Backend `name`'s `eps` of `art` as the sampler calls it with classifier-free guidance of scale `guidance`
    (eq. 6, `denoq.sampling.guidance`; None: `eps` unguided), followed by PTQD's head when its statistics were
    taken on guided outputs (`check_guidance`, which also refuses the scales they were not)."""
    after = check_guidance(art, name, guidance)
    if guidance is None:
        return eps
    guided = classifier_free(eps, torch.tensor(int(art.manifest["model"]["num_classes"])), guidance)
    return with_ptqd_head(guided, artifact_ptqd(art)) if after else guided


def guided_backend(art: Artifact, name: str, guidance: float | None, *, threads: int | None = None,
                   spec: ModelSpec | None = None) -> EpsFn:
    """Backend `name` of `art` guided at `guidance` (`guide`); for `ort` on an artifact whose PTQD head follows
    the combination, the artifact's guided graph itself (doubled batch, combination and head inside), so the
    plain session is never built."""
    if name == "ort" and guidance is not None and check_guidance(art, name, guidance):
        from denoq.engines.ort import OrtBackend
        from denoq.passes.guidance import GUIDED_GRAPH

        check_ort_runs(art)
        graph = OrtBackend(art.file(GUIDED_GRAPH), threads=threads, providers=["CPUExecutionProvider"])
        return lambda x, t, cond=None: graph(x, t, cond, guidance=guidance)
    return guide(art, name, make_backend(art, name, threads=threads, spec=spec), guidance)
