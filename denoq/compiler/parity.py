"""The compile's parity checks and gate: the exported graphs against PyTorch (docs/architecture.md, Quantizer
semantics).

End to end, ONNX Runtime and the PyTorch simulation cannot agree bit-exactly (a 1e-7 float difference flips a
rounding that propagates), so the gate is stated against the quantization error itself: the Q/DQ graph in ORT may
differ from the simulation by at most `PARITY_BOUND` × the simulation's own error to the FP model, both as RMS over
the check batch. Above it the graph computes something else than what was calibrated: a wrong integer kernel (ORT's
u8×s8 kernels saturate without VNNI unless `session.x64quantprecision` is set, `denoq.cpu`), or a pass bug.
`first_disagreeing_layer` then names the layer: each quantized layer is cut out of the graph with its own Q/DQ
(and timestep selector) and run in ORT on the simulation's own input to that layer, in execution order.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.utils
import torch

from denoq.calibrators.ptqd import PtqdStats
from denoq.calibrators.simulate import SimulatedLayer, simulate
from denoq.compiler.backends import torch_eps, with_ptqd_head
from denoq.compiler.load import ModelSpec
from denoq.engines.ort import OrtBackend, create_session
from denoq.engines.reference import needs_reference, reference_backend
from denoq.errors import DenoqError
from denoq.export.onnx_export import GraphInputs
from denoq.onnxio import load_model
from denoq.plan import QuantPlan
from denoq.sampling.guidance import classifier_free

#: rms(ORT − simulation) / rms(simulation − FP) above which a compile fails. Measured on correct graphs (VNNI and
#: AVX2 CPUs): 0.03–0.72 on the embedded models, up to 1.05 on untrained tiny UNets, whose random weights amplify
#: rounding flips most; with ORT's saturating AVX2 kernels 1.3–6.8 (docs/cpu.md).
PARITY_BOUND = 2.0
#: A layer disagrees in isolation when more than this fraction of its outputs differ by more than float rounding
#: (and, for a quantized output, one quantization step).
LAYER_FLIP_FRACTION = 1e-3
LAYER_RTOL = 1e-5
CHECK_BATCH = 8
#: models past this many parameters run the checks on two rows (the first and last calibration steps): one forward
#: of a full-size transformer at 1024 px is teraflops, minutes on a CPU, and each executor runs every row
LARGE_MODEL_PARAMETERS = 100_000_000
#: Sample pixels (rows × H × W, or rows × tokens of a packed [B, S, C] sample) the checks run through one model
#: call: a full-size UNet's attention holds [heads, H·W, H·W] scores per row (1 GB at SD 1.5's 64×64 latents in
#: ORT, 2 GB for Flux's 24 heads over 4608 tokens), so its check batch goes a row at a time.
CHECK_PIXELS = 4096


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def _by_rows(eps: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`eps(sample, timestep, cond)` on chunks of rows of at most `CHECK_PIXELS` sample pixels, concatenated."""
    def run(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        pixels = int(np.prod(x.shape[2:])) if x.dim() == 4 else int(x.shape[1])
        step = max(1, CHECK_PIXELS // pixels)
        return torch.cat([eps(x[i:i + step], t[i:i + step], None if cond is None else cond[i:i + step])
                          for i in range(0, len(x), step)])
    return run


def graph_executor(path: Path) -> str:
    """Who runs the Q/DQ graph at `path` in the checks: `onnx.reference` where ONNX Runtime's CPU kernels cannot
    (NVFP4: float4e2m1 Q/DQ and TensorRT's FP4 op; `denoq.engines.reference`), else `onnxruntime`."""
    return "onnx.reference" if needs_reference(load_model(path, load_external_data=False)) else "onnxruntime"


def graph_backend(path: Path) -> OrtBackend:
    """The eps backend of the Q/DQ graph at `path` on its `graph_executor`."""
    return reference_backend(path) if graph_executor(path) == "onnx.reference" else OrtBackend(path)


def parity(spec: ModelSpec, plan: QuantPlan, inputs: GraphInputs, fp_path: Path, qdq_path: Path,
           ptqd: PtqdStats | None = None, half_path: Path | None = None) -> dict[str, Any]:
    """FP export vs PyTorch, and Q/DQ graph vs PyTorch simulation, on real inputs with mixed timesteps; with
    `half_path`, the float16 TensorRT graph vs the float32 Q/DQ graph, both in ORT.

    `qdq_ort_vs_sim_rms_over_quant_error` is what the gate reads (`check_gate`). Float16 moves roundings too; what
    matters there is that it adds no error: its RMS error to the FP graph over the float32 Q/DQ graph's (≈ 1).
    """
    args = (inputs.sample, inputs.timestep, inputs.cond)
    fp_torch = _by_rows(torch_eps(spec.module))(*args)
    sim = _by_rows(with_ptqd_head(torch_eps(simulate(spec.module, plan)), ptqd))(*args)
    fp_ort = _by_rows(OrtBackend(fp_path))(*args)
    q_ort = _by_rows(graph_backend(qdq_path))(*args)
    quant_err = _max_abs(sim, fp_torch)
    checks = {"qdq_executor": graph_executor(qdq_path), "fp_onnx_vs_torch_max_abs": _max_abs(fp_ort, fp_torch),
              "qdq_ort_vs_sim_max_abs": _max_abs(q_ort, sim),
              "sim_vs_fp_max_abs": quant_err,
              "qdq_ort_vs_sim_over_quant_error": _max_abs(q_ort, sim) / max(quant_err, 1e-12),
              "qdq_ort_vs_sim_rms_over_quant_error": _rms(q_ort, sim) / max(_rms(sim, fp_torch), 1e-12)}
    if half_path is not None:
        q_half = _by_rows(graph_backend(half_path))(*args)
        checks.update({"fp16_vs_qdq_rms": _rms(q_half, q_ort),
                       "fp16_error_over_fp32_error": _rms(q_half, fp_ort) / max(_rms(q_ort, fp_ort), 1e-12)})
    return checks


def check_batch(parameters: int) -> int:
    """Rows of the parity batch for a model of `parameters` parameters: CHECK_BATCH, or 2 for a large model."""
    return CHECK_BATCH if parameters < LARGE_MODEL_PARAMETERS else 2


def check_scales(scales: list[float], rows: int) -> torch.Tensor:
    """Guidance scales for the parity batch of `rows` rows: the calibration's scales in turn, or 1, 2, 4 in turn
    when the calibration was unguided."""
    pool = scales or [1.0, 2.0, 4.0]
    return torch.tensor([pool[j % len(pool)] for j in range(rows)], dtype=torch.float32)


def guided_parity(spec: ModelSpec, plan: QuantPlan, inputs: GraphInputs, scales: torch.Tensor, qdq_path: Path,
                  guided_path: Path, ptqd: PtqdStats | None) -> dict[str, Any]:
    """The guided graph (ORT) against (a) the plain Q/DQ graph driven by `classifier_free` then PTQD's head in
    Python (same float32 ops: agree to rounding) and (b) the simulation guided the same way, relative to the guided
    quantization error; `ptqd`: the head after the combination (statistics on guided outputs), else none."""
    null = torch.tensor(int(spec.num_classes))
    args = (inputs.sample, inputs.timestep, inputs.cond)
    guided = graph_backend(guided_path)(*args, guidance=scales)
    plain = with_ptqd_head(classifier_free(graph_backend(qdq_path), null, scales), ptqd)(*args)
    sim = with_ptqd_head(classifier_free(torch_eps(simulate(spec.module, plan)), null, scales), ptqd)(*args)
    fp = classifier_free(torch_eps(spec.module), null, scales)(*args)
    quant_err = _max_abs(sim, fp)
    return {"guided_vs_plain_guided_max_abs": _max_abs(guided, plain),
            "guided_vs_sim_max_abs": _max_abs(guided, sim), "guided_sim_vs_fp_max_abs": quant_err,
            "guided_vs_sim_over_quant_error": _max_abs(guided, sim) / max(quant_err, 1e-12)}


# -- the gate ------------------------------------------------------------------------------------------------

def _layer_ends(model: onnx.ModelProto, node_name: str) -> tuple[str, str, bool] | None:
    """The graph tensors around one quantized layer: its float input before its activation quantizer (and
    timestep selector Mul), its output after its own output Q/DQ, selector Div and bias Add, and whether it reads
    the timestep. None for a layer whose input is not a Q → DQ pair (weight-only, IGQ's dynamic groups)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name for i in model.graph.initializer}
    node = next((n for n in model.graph.node if n.name == node_name), None)
    dq = producer.get(node.input[0]) if node is not None else None
    q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if q is None or q.op_type != "QuantizeLinear":
        return None
    start, timed = q.input[0], False
    mul = producer.get(start)
    if mul is not None and mul.op_type == "Mul" and any(
            producer.get(i) is not None and producer[i].op_type == "Gather" for i in mul.input[1:]):
        start, timed = mul.input[0], True
    end = node.output[0]
    while len(consumers.get(end, [])) == 1:
        nxt = consumers[end][0]
        tail = (nxt.op_type in ("QuantizeLinear", "DequantizeLinear", "Div")
                or (nxt.op_type == "Add" and any(i in inits for i in nxt.input)))
        if not tail:
            break
        end, timed = nxt.output[0], timed or nxt.op_type == "Div"
    return start, end, timed


def first_disagreeing_layer(spec: ModelSpec, plan: QuantPlan, inputs: GraphInputs, qdq_path: Path,
                            layer_map: dict[str, Any]) -> str | None:
    """The first quantized layer, in execution order, whose Q/DQ subgraph run alone in ORT on the simulation's
    input to it disagrees with the simulation's output (more than LAYER_FLIP_FRACTION of its values off by more
    than float rounding and one output step); None when every layer agrees alone."""
    sim = simulate(spec.module, plan)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(mod: SimulatedLayer, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.setdefault(mod.plan.name, (args[0].detach(), out.detach()))

    handles = [m.register_forward_hook(hook) for m in sim.modules() if isinstance(m, SimulatedLayer)]
    try:
        torch_eps(sim)(inputs.sample, inputs.timestep, inputs.cond)
    finally:
        for h in handles:
            h.remove()
    model = onnx.load(str(qdq_path))
    timestep = inputs.timestep.numpy().astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (x, expected) in seen.items():  # dicts keep insertion = execution order
            ends = _layer_ends(model, layer_map[name]["node"])
            if ends is None:
                continue
            start, end, timed = ends
            sub = Path(tmp) / "layer.onnx"
            onnx.utils.extract_model(str(qdq_path), str(sub), [start, *(["timestep"] if timed else [])], [end],
                                     check_model=False)
            session = create_session(sub, threads=1)
            feeds = {start: x.numpy(), **({"timestep": timestep} if timed else {})}
            got = torch.from_numpy(session.run([end], feeds)[0])
            out_q = plan.layers[name].output
            step = 0.0 if out_q is None else float(out_q.scale.max())
            tol = step * 1.001 + LAYER_RTOL * float(expected.abs().max())
            if ((got - expected).abs() > tol).float().mean() > LAYER_FLIP_FRACTION:
                return name
    return None


def check_gate(checks: dict[str, Any], allow_failure: bool, locate: Callable[[], str | None]) -> dict[str, Any]:
    """The gate's record for the manifest: bound, ratio, passed, and (when it failed) the first disagreeing layer
    from `locate()`. DenoqError when it failed and `allow_failure` is false."""
    ratio = float(checks["qdq_ort_vs_sim_rms_over_quant_error"])
    gate: dict[str, Any] = {"bound": PARITY_BOUND, "ratio": ratio, "passed": ratio <= PARITY_BOUND}
    if gate["passed"]:
        return gate
    layer = locate()
    gate.update({"first_layer": layer, "allowed_failure": allow_failure})
    where = (f"it starts at layer {layer} (run alone on the simulation's input, its Q/DQ graph gives other "
             "values)" if layer else "every layer agrees when run alone: rounding flips grow through this model")
    if not allow_failure:
        raise DenoqError(f"the Q/DQ graph in ONNX Runtime differs from the PyTorch simulation by {ratio:.2f}× the "
                         f"quantization error (bound {PARITY_BOUND}); {where}; check the ONNX Runtime build and "
                         "CPU (denoq.cpu), or pass --allow-parity-failure to keep the artifact anyway")
    return gate
