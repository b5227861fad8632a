"""`onnx.reference` as a graph executor for the formats ONNX Runtime's CPU kernels lack (opset-23 `float4e2m1`
Q/DQ) and for TensorRT's FP4 dynamic quantizer, `trt::TRT_FP4DynamicQuantize`, which Model Optimizer's NVFP4
graphs (and denoq's, `denoq.passes.blockquant`) use.

`TRT_FP4DynamicQuantize(x, g; axis, block_size, scale_type)` as TensorRT documents it (its `IDynamicQuantizeLayer`:
blocks of `block_size` along `axis`, FP8 E4M3 block scales relative to the per-tensor scale g): per block,
`s8 = fp8(max(amax / 6 / g, 2⁻⁹))` (saturating) and the values `fp4(x / (s8 · g))` (E2M1, nearest even,
saturating); outputs the values (float4e2m1) and the block scales (float8e4m3fn, `x`'s shape with `axis` divided
by `block_size`). Written here in NumPy with `ml_dtypes` from those definitions; the PyTorch simulation
(`denoq.calibrators.quantizer.fake_quant_blocks`) is the independent other side of the parity tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from denoq.engines.ort import OrtBackend
from denoq.formats import FP4_MAX, FP8_MAX, FP8_TINY
from denoq.onnxio import load_model


class TRT_FP4DynamicQuantize(OpRun):
    op_domain = "trt"

    def _run(self, x: np.ndarray, global_scale: np.ndarray, axis: int = -1, block_size: int = 16,
             scale_type: int = onnx.TensorProto.FLOAT8E4M3FN) -> tuple[np.ndarray, np.ndarray]:
        if scale_type != onnx.TensorProto.FLOAT8E4M3FN:
            raise ValueError(f"TRT_FP4DynamicQuantize: scale_type {scale_type} is not FLOAT8E4M3FN")
        x = np.moveaxis(np.asarray(x, dtype=np.float32), axis, -1)
        g = np.float32(np.asarray(global_scale, dtype=np.float32).reshape(()))
        blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
        amax = np.abs(blocks).max(axis=-1, keepdims=True)
        ratio = np.maximum((amax / np.float32(FP4_MAX)) / g, np.float32(FP8_TINY))
        s8 = np.clip(ratio, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
        scale = s8.astype(np.float32) * g
        values = np.clip(blocks / scale, -FP4_MAX, FP4_MAX).astype(ml_dtypes.float4_e2m1fn)
        return (np.moveaxis(values.reshape(x.shape), -1, axis),
                np.moveaxis(s8[..., 0], -1, axis))


def reference_session(model: onnx.ModelProto) -> ReferenceEvaluator:
    """An `onnx.reference` evaluator of `model` that also runs TensorRT's FP4 dynamic quantizer."""
    return ReferenceEvaluator(model, new_ops=[TRT_FP4DynamicQuantize])


def run_reference(model: onnx.ModelProto, feeds: dict[str, Any]) -> list[np.ndarray]:
    """All outputs of `model` on `feeds` in `onnx.reference` (`reference_session`)."""
    return reference_session(model).run(None, feeds)


def needs_reference(model: onnx.ModelProto) -> bool:
    """True when ONNX Runtime's CPU kernels cannot run `model`: float4e2m1 tensors or TensorRT's FP4 op."""
    fp4 = onnx.TensorProto.FLOAT4E2M1
    return any(i.data_type == fp4 for i in model.graph.initializer) or any(
        n.domain == "trt" for n in model.graph.node)


@dataclass(frozen=True)
class _Io:
    name: str
    type: str


class ReferenceSession:
    """`onnx.reference` behind ONNX Runtime's session interface (what `OrtBackend` calls)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.evaluator = reference_session(model)

    def _io(self, values: Any) -> list[_Io]:
        kinds = {v: k for k, v in onnx.TensorProto.DataType.items()}
        return [_Io(v.name, f"tensor({_ORT_NAMES.get(kinds[v.type.tensor_type.elem_type], 'float')})")
                for v in values]

    def get_inputs(self) -> list[_Io]:
        return self._io(self.model.graph.input)

    def get_outputs(self) -> list[_Io]:
        return self._io(self.model.graph.output)

    def get_providers(self) -> list[str]:
        return ["onnx.reference"]

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.evaluator.run(outputs, feeds)


_ORT_NAMES = {"FLOAT": "float", "FLOAT16": "float16", "DOUBLE": "double", "INT64": "int64", "INT32": "int32"}


def reference_backend(path: str | Path) -> OrtBackend:
    """The sampler's `eps(x, t, cond)` on the graph at `path`, executed by `onnx.reference`."""
    return OrtBackend(path, session=ReferenceSession(load_model(Path(path))))
