"""Dynamic block quantizers of activations in the graph: SVDQuant's INT4 W4A4 and NVFP4 (docs/architecture.md:
Quantizer semantics; the simulation is `denoq.calibrators.quantizer.fake_quant_blocks`).

Every `B` consecutive channels of one instance (a token's features: the last axis of a MatMul / Gemm input; a
pixel's channels: axis 1 of a Conv input) share a scale computed at run time from their own amax:

- `int` (ONNX Runtime; TensorRT has no 4-bit activations), standard ops:
  `Reshape → Abs → ReduceMax → Max(floor) → Div(qmax)` gives the block scales s, then `QuantizeLinear(x, s,
  axis, block_size=B, output_dtype=int4) → DequantizeLinear(·, s)` (opset 21 blocked Q/DQ with a computed scale).
  A Conv input is read as `[N, C, H·W]` (Reshape) so that its scales are `[N, C / B, H·W]`, and reshaped back.
- `fp4` (NVFP4, TensorRT's FP4 GEMMs), the form Model Optimizer exports and TensorRT imports:
  `trt::TRT_FP4DynamicQuantize(x, g; axis=-1, block_size=16, scale_type=FLOAT8E4M3FN)` → (float4e2m1 values, FP8
  block scales), `DequantizeLinear(block scales, g)`, `DequantizeLinear(values, ·, axis=-1, block_size=16)`;
  token layers only (TensorRT's FP4 path is GEMM-only). `denoq.engines.reference` runs the custom op in
  `onnx.reference`.

Names: `<module>/<role>/<Op>` nodes, `<module>.<role>_…` values, as every Q/DQ pass.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from denoq.errors import DenoqError
from denoq.formats import BLOCK_AMAX_FLOOR, FP4_OPSET
from denoq.passes.plan_checks import Act
from denoq.passes.qdq_base import initializer

TRT_DOMAIN = "trt"
FP4_QUANTIZE = "TRT_FP4DynamicQuantize"


def block_qdq(g: ir.Graph, x: ir.Value, a: Act, module: str, role: str, ftype: ir.DataType, conv: bool
              ) -> list[ir.Node]:
    """The nodes of `a`'s dynamic block quantizer reading `x` (module docstring); the last node's output is the
    dequantized value."""
    if x.shape is None:
        raise DenoqError(f"layer {module}: its {role} activation has no shape in the graph; re-export the model "
                         "with denoq.export (dynamic block quantizers need its rank and channels)")
    rank = len(x.shape)
    prefix, name = f"{module}.{role}", f"{module}/{role}"
    out = ir.val(f"{prefix}_dequantized", ftype, x.shape)
    if a.format == "fp4":
        gs = initializer(g, f"{prefix}_global_scale", np.asarray(a.scale, dtype=ftype.numpy()))
        quant = ir.node(FP4_QUANTIZE, [x, gs], domain=TRT_DOMAIN, name=f"{name}/{FP4_QUANTIZE}",
                        attributes={"axis": -1, "block_size": a.block_size,
                                    "scale_type": int(ir.DataType.FLOAT8E4M3FN)},
                        outputs=[ir.val(f"{prefix}_quantized", ir.DataType.FLOAT4E2M1, x.shape),
                                 ir.val(f"{prefix}_block_scale_fp8", ir.DataType.FLOAT8E4M3FN)])
        scale = ir.node("DequantizeLinear", [quant.outputs[1], gs], name=f"{name}/block_scale/DequantizeLinear",
                        outputs=[ir.val(f"{prefix}_block_scale", ftype)])
        dq = ir.node("DequantizeLinear", [quant.outputs[0], scale.outputs[0]], name=f"{name}/DequantizeLinear",
                     attributes={"axis": -1, "block_size": a.block_size}, outputs=[out])
        return [quant, scale, dq]
    channels = x.shape[1 if conv else rank - 1]
    if not isinstance(channels, int) or channels % a.block_size:
        raise DenoqError(f"layer {module}: its {channels} input channels are not a multiple of the activation block "
                         f"size {a.block_size}; recalibrate (the plan and the graph come from different models)")
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], suffix: str, dtype: ir.DataType = ftype, **attributes: object
            ) -> ir.Value:
        nodes.append(ir.node(op, inputs, attributes=attributes, name=f"{name}/{suffix}",
                             outputs=[ir.val(f"{prefix}_{suffix.lower()}", dtype)]))
        return nodes[-1].outputs[0]

    blocks_shape = [0, channels // a.block_size, a.block_size, -1] if conv else \
        [0] * (rank - 1) + [channels // a.block_size, a.block_size]
    blocks = add("Reshape", [x, initializer(g, f"{prefix}_blocks_shape", np.asarray(blocks_shape, np.int64))], "Blocks")
    amax = add("ReduceMax", [add("Abs", [blocks], "Abs"),
                             initializer(g, f"{prefix}_block_axis", np.asarray([2 if conv else rank], np.int64))],
               "Amax", keepdims=0)
    floor = initializer(g, f"{prefix}_amax_floor", np.asarray(BLOCK_AMAX_FLOOR, dtype=ftype.numpy()))
    qmax = initializer(g, f"{prefix}_qmax", np.asarray(a.qmax, dtype=ftype.numpy()))
    scale = add("Div", [add("Max", [amax, floor], "Floor"), qmax], "Scale")
    flat = add("Reshape", [x, initializer(g, f"{prefix}_flat_shape", np.asarray([0, channels, -1], np.int64))],
               "Flat") if conv else x
    axis = 1 if conv else rank - 1
    q = add("QuantizeLinear", [flat, scale], "QuantizeLinear", a.qtype, axis=axis, block_size=a.block_size,
            output_dtype=int(a.qtype))
    if not conv:
        nodes.append(ir.node("DequantizeLinear", [q, scale], attributes={"axis": axis, "block_size": a.block_size},
                             name=f"{name}/DequantizeLinear", outputs=[out]))
        return nodes
    dq = add("DequantizeLinear", [q, scale], "DequantizeLinear", axis=axis, block_size=a.block_size)
    shape = add("Shape", [x], "Shape", ir.DataType.INT64)
    nodes.append(ir.node("Reshape", [dq, shape], name=f"{name}/Unflat", outputs=[out]))
    return nodes


def is_block_qdq(x: ir.Value | None, a: Act) -> bool:
    """True when `x` is the output of a dynamic block quantizer of `a`'s block size and type (`block_qdq`)."""
    node = None if x is None else x.producer()
    if node is not None and node.op_type == "Reshape" and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    if node is None or node.op_type != "DequantizeLinear" or node.inputs[0] is None:
        return False
    q = node.inputs[0].producer()
    return (node.attributes.get_int("block_size", 0) == a.block_size and q is not None
            and q.op_type in ("QuantizeLinear", FP4_QUANTIZE) and node.inputs[0].dtype == a.qtype)


def require_opsets(model: ir.Model, acts: list[Act]) -> None:
    """Raise the model's opset imports to what its block quantizers need: ONNX 23 and the `trt` domain for NVFP4."""
    if any(a.format == "fp4" for a in acts):
        model.opset_imports[""] = max(model.opset_imports.get("", 0), FP4_OPSET)
        model.opset_imports[TRT_DOMAIN] = 1
