"""Weight quantization: the plan's integer weights read through DequantizeLinear (docs/architecture.md: Quantizer
semantics).

For each planned layer (found through the `denoq.layer_map` metadata, never by node order) the FP initializer
`<module>.weight` is replaced by the plan's integers (ONNX layout: transposed for `[in, out]` MatMul weights), a
float scale per output channel and zeros, read through `DequantizeLinear(axis=weight_axis)`. The DQ output keeps
the name `<module>.weight`, so the layer map still names the node's weight input. Integers are copied, never
re-rounded; they must lie in `qrange(weight_bits)`.

FP8 weights are `float8e4m3fn` per output channel. NVFP4 weights (opset 23) are `float4e2m1` in blocks of 16
whose scale is itself `DequantizeLinear(<module>.weight_scale_fp8, <module>.weight_global_scale)`: FP8 E4M3 block
scales times one float32 scale per tensor (two-level dequantization, as TensorRT's FP4 GEMMs read it); the model's
opset import is raised to 23 for them. Floating-point weights have no zero point input.

INT4 / blocked weights (opset 21): MatMul / Gemm weights of ≤ 4 bits are stored as ONNX `int4` (zero points `int4`
too), wider ones as int8; Conv weights always use the int8 container (4- and 3-bit values in int8). A plan with
`block_size` B > 0 gives `DequantizeLinear(axis=<input-channel axis>, block_size=B)`, that axis taken from the
layer map (0 for a transposed `[in, out]` MatMul weight, 1 for Gemm `[out, in]` and Conv `[out, in, kh, kw]`);
scale and zero point have the weight's shape with that axis divided by B (ONNX's blocked rule), so a conv's
`[out, in / B]` scales are repeated over kh, kw: exactly `LayerPlan.dequantized_weight`. A per-channel INT4 MatMul /
Gemm weight (a layer the group size does not divide) is written as one block spanning the whole row: the same
numbers, in the only form TensorRT accepts INT4 in. (`denoq.passes.binding` resolves these forms.)
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult, PostconditionError, PreconditionError

from denoq.formats import FP4_OPSET
from denoq.passes.binding import Binding, Layer
from denoq.passes.qdq_base import PlanPass, initializer, not_yet_applied

_INT_TYPES = (ir.DataType.INT8, ir.DataType.INT4)

class QuantizeWeights(PlanPass):
    """Pass: every planned layer reads its weight as `DequantizeLinear(plan integers, plan scales, zeros)`.

    Invariant established: input 1 of every planned layer is the output of `<module>/weight/DequantizeLinear`,
    named as the layer map's weight (`<module>.weight`), reading the integer initializer
    `<module>.weight_quantized` (the plan's integers in ONNX layout, int8 or int4), `<module>.weight_scale` and
    zero points; no FP weight of a planned layer remains. Requires every planned layer's weight to be its FP
    initializer (checked by the binding; a second run is refused).
    """

    name = "qdq_weights"

    def check(self, b: Binding, g: ir.Graph) -> None:
        for layer in b.layers:
            w = layer.node.inputs[1]
            if w is None or not w.is_initializer() or w.name != layer.ref.weight:
                raise PreconditionError(f"layer {layer.module}: input 1 is not its FP weight initializer "
                                        f"{layer.ref.weight!r} (quantized already?)")
        not_yet_applied(g, (f"{layer.module}.weight_quantized" for layer in b.layers), "quantized weights")

    def rewrite(self, b: Binding, g: ir.Graph) -> bool:
        for layer in b.layers:
            _quantize_weight(g, layer)
        return bool(b.layers)

    def call(self, model: ir.Model) -> PassResult:
        if any(layer.weight.qtype == ir.DataType.FLOAT4E2M1 for layer in self.bound(model).layers):
            model.opset_imports[""] = max(model.opset_imports.get("", 0), FP4_OPSET)
        return super().call(model)

    def ensures(self, model: ir.Model) -> None:
        g = model.graph
        for layer in self.bound(model).layers:
            w = layer.node.inputs[1]
            dq = None if w is None else w.producer()
            ints = None if dq is None else dq.inputs[0]
            if (dq is None or dq.op_type != "DequantizeLinear" or w is None or w.name != layer.ref.weight
                    or ints is None or not ints.is_initializer() or ints.const_value is None
                    or ints.const_value.dtype != layer.weight.qtype or layer.ref.weight in g.initializers):
                raise PostconditionError(f"layer {layer.module}: input 1 is not DequantizeLinear of its "
                                         f"{layer.weight.qtype} weight integers named {layer.ref.weight!r}")


def _quantize_weight(g: ir.Graph, layer: Layer) -> None:
    node, ref, w = layer.node, layer.ref, layer.weight
    fp = node.inputs[1]
    assert fp is not None
    del g.initializers[fp.name]
    prefix = ref.module + ".weight"
    wq = initializer(g, f"{prefix}_quantized", w.ints)
    inputs = [wq]
    if w.global_scale is None:
        inputs.append(initializer(g, f"{prefix}_scale", w.scale.astype(layer.ftype.numpy())))
    else:  # NVFP4: the FP8 block scales dequantized by the global scale
        s8 = initializer(g, f"{prefix}_scale_fp8", w.scale.astype(ml_dtypes.float8_e4m3fn))
        gs = initializer(g, f"{prefix}_global_scale", np.asarray(w.global_scale, dtype=layer.ftype.numpy()))
        scale_dq = ir.node("DequantizeLinear", [s8, gs], name=f"{ref.module}/weight_scale/DequantizeLinear",
                           outputs=[ir.val(f"{prefix}_scale", layer.ftype, ir.Shape(w.scale.shape))])
        g.insert_before(node, scale_dq)
        inputs.append(scale_dq.outputs[0])
    if w.qtype in _INT_TYPES:  # float8 / float4 zero points are 0 by default and TensorRT takes none
        inputs.append(initializer(g, f"{prefix}_zero_point", np.zeros(w.scale.shape, dtype=w.qtype.numpy())))
    attributes = {"axis": w.axis} if w.block_size == 0 else {"axis": w.axis, "block_size": w.block_size}
    dq = ir.node("DequantizeLinear", inputs, attributes=attributes,
                 name=f"{ref.module}/weight/DequantizeLinear",
                 outputs=[ir.val(f"{prefix}_dequantized", layer.ftype, ir.Shape(layer.weight_int.shape))])
    node.replace_input_with(1, dq.outputs[0])
    fp.name = f"{prefix}_float"  # detached from the graph; frees the name for the DQ output
    dq.outputs[0].name = ref.weight
    g.insert_before(node, dq)
