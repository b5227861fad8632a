"""Passes: ONNX → ONNX rewrites, one job each (DESIGN.md, Contracts: Passes). No torch here.

A pass is a callable `ModelProto -> ModelProto` with a docstring naming the invariant it establishes and no
hidden state; `PassManager` runs a list of them, verifying the graph after each one in debug mode.
"""

from denoq.layermap import LAYER_MAP_KEY, LayerRef, read_layer_map
from denoq.passes.manager import PassManager, PassRecord
from denoq.passes.ptqd_head import AppendPtqdHead
from denoq.passes.qdq import InsertQDQ

__all__ = ["LAYER_MAP_KEY", "AppendPtqdHead", "InsertQDQ", "LayerRef", "PassManager", "PassRecord",
           "read_layer_map"]
