"""ONNX graphs of any size: one file below protobuf's 2 GB limit, weights in external data above it.

A protobuf message cannot be serialized beyond 2 GB, and a Stable-Diffusion-size UNet holds 3.4 GB of FP32
weights. Such a graph is written as `NAME.onnx` + `NAME.onnx.data` (ONNX's external data, one file, next to the
graph; ONNX Runtime, `onnx.load` and TensorRT's parser read it from there), and the checker and shape inference,
which serialize the model, run on a temporary copy on disk instead of in memory. Shared by export, passes and
the compiler, so it lives at the bottom layer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
from onnx.external_data_helper import load_external_data_for_model

from denoq.errors import DenoqError

#: Graphs whose initializer bytes exceed this are written with external data (2 GB less room for the graph).
EXTERNAL_ABOVE = 2**31 - 2**24


def load_model(path: Path, load_external_data: bool = True) -> onnx.ModelProto:
    """`onnx.load` that turns an unreadable file (truncated, not ONNX, protobuf DecodeError) into one DenoqError."""
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # google.protobuf's DecodeError, OSError, onnx's own errors: all mean the same here
        raise DenoqError(f"{path} is not a readable ONNX model ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); recompile the artifact with denoq compile") from None


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers' data held in the proto."""
    return sum(t.ByteSize() for t in model.graph.initializer)


def is_large(model: onnx.ModelProto) -> bool:
    return weight_bytes(model) > EXTERNAL_ABOVE


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path`: one file, or with its tensors in `path.name + ".data"` beside it when large. The
    in-memory `model` keeps its tensors either way."""
    path = Path(path)
    if not is_large(model):
        onnx.save(model, str(path))
        return
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    load_external_data_for_model(model, str(path.parent))  # saving moved the tensors out of `model`


def check_and_infer(model: onnx.ModelProto, *, check: bool = False, strict: bool = True, check_type: bool = True,
                    data_prop: bool = False) -> onnx.ModelProto:
    """`onnx.checker.check_model(full_check=True)` when `check`, then shape inference; returns the inferred model
    (value_info filled). A large model goes through a temporary copy on disk (the inferred model then carries
    external-data references only: its value_info is what callers read)."""
    if not is_large(model):
        if check:
            onnx.checker.check_model(model, full_check=True)
        return onnx.shape_inference.infer_shapes(model, check_type=check_type, strict_mode=strict, data_prop=data_prop)
    with tempfile.TemporaryDirectory(prefix="denoq-onnx-") as tmp:
        path, out = Path(tmp) / "model.onnx", Path(tmp) / "inferred.onnx"
        save_model(model, path)
        if check:
            onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(out), check_type=check_type, strict_mode=strict,
                                               data_prop=data_prop)
        return onnx.load(str(out), load_external_data=False)
