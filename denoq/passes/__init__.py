"""Passes: ONNX → ONNX rewrites on onnx-ir's pass infrastructure, one job each (docs/architecture.md, Contracts:
Passes). No torch here.

A pass is an `onnx_ir.passes` pass (`denoq.passes.infra`) with a docstring naming the invariant it establishes,
checked in its `requires` / `ensures`; `PassManager` runs a pipeline of them on one `ir.Model`, converting from and
to protobuf once, recording each pass and verifying the graph after each one in debug mode.
"""

from denoq.layermap import LAYER_MAP_KEY, LayerRef, read_layer_map
from denoq.passes.activations import QuantizeInputs, QuantizeOutputs
from denoq.passes.attention import QuantizeAttention
from denoq.passes.igq import QuantizeInputGroups
from denoq.passes.manager import PassManager, PassRecord
from denoq.passes.ptqd_head import AppendPtqdHead
from denoq.passes.qdq import InsertQDQ, qdq_passes
from denoq.passes.selector import InsertTimestepSelectors
from denoq.passes.weights import QuantizeWeights

__all__ = ["LAYER_MAP_KEY", "AppendPtqdHead", "InsertQDQ", "InsertTimestepSelectors", "LayerRef", "PassManager",
           "PassRecord", "QuantizeAttention", "QuantizeInputGroups", "QuantizeInputs", "QuantizeOutputs",
           "QuantizeWeights", "qdq_passes", "read_layer_map"]
