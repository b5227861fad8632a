"""The peer: ONNX Runtime's own static quantizer, run as a user would run it, on denoq's calibration inputs."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from denoq.calibrators.calibset import CalibrationSet

#: Calibration inputs per `TrajectoryReader` feed.
PEER_CALIB_BATCH = 64


class TrajectoryReader(CalibrationDataReader):
    """`onnxruntime.quantization.CalibrationDataReader` over a CalibrationSet: one feed dict per batch (one
    timestep each), `sample` and `timestep` float32 (the graph interface), plus `encoder_hidden_states` for
    conditional models."""

    def __init__(self, calib: CalibrationSet, batch_size: int = PEER_CALIB_BATCH) -> None:
        self.calib = calib
        self.batch_size = batch_size
        self._it: Iterator[dict[str, np.ndarray]] = self._feeds()

    def _feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for x, t, cond in self.calib.batches(self.batch_size):
            feed = {"sample": x.numpy().astype(np.float32), "timestep": t.numpy().astype(np.float32)}
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


def quantize_peer(fp_path: Path, calib: CalibrationSet, out: Path, pre: bool,
                  exclude: Sequence[str] = ()) -> dict[str, Any]:
    """ORT's static quantization of `fp_path` into `out` as a user would run it today: QDQ format, int8
    activations and weights, per channel, both symmetric, MinMax calibration (ORT's default) over `calib`, the
    nodes named in `exclude` left in float. Returns those settings with the seconds it took and the scale of the
    first Sin's input (`sin_input_scale`).

    With `pre`, `quant_pre_process` runs first (`preprocess`; the exported graph is quantized when it fails). It
    makes slower graphs here: its ORT optimization inlines GroupNormalization (opset 21) into
    Reshape/ReduceMean/Sub/Div/…, and the quantizer then puts Q/DQ around each of those ops.
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
