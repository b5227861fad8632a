"""Graph rewiring shared by the passes: hand a value's readers (and its graph-output slot) to a new value."""

from __future__ import annotations

import onnx_ir as ir


def redirect(g: ir.Graph, old: ir.Value, new: ir.Value, skip: ir.Node, old_name: str) -> None:
    """Every reader of `old` except `skip` (the first node of the inserted chain) reads `new` instead. If `old` is
    a graph output, `new` takes its slot, its name and its type, and `old` is renamed `old_name`, so the graph's
    interface is unchanged."""
    for use in list(old.uses()):
        if use.node is not skip:
            use.node.replace_input_with(use.idx, new)
    if old.is_graph_output():
        name = old.name
        for i, o in enumerate(g.outputs):
            if o is old:
                g.outputs[i] = new
        old.name = old_name
        new.name = name
        new.type = old.type
