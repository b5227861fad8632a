"""The compile's parity gate (denoq.compiler.parity) and an interrupted compile (SIGTERM).

A Q/DQ graph that computes something else than the simulation (here: one layer's weight scale ×10 after the
passes, as a pass bug or a wrong integer kernel would) fails the compile with one line naming that layer, unless
--allow-parity-failure, which the manifest records.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import denoq.compiler.graphs as graphs
import denoq.compiler.pipeline as pipeline
from denoq.compiler.cli import main

LAYER = "down_blocks.0.resnets.0.conv1"
SETS = ["--set", "calib.samples=4", "--set", "calib.steps=4"]


def _corrupting_save(real_save):
    """`save_model` that multiplies LAYER's weight scale by 10 in the Q/DQ graph (found through the layer map)."""

    def save(model: onnx.ModelProto, path):
        if path.name == "model.qdq.onnx":
            lmap = json.loads(next(p.value for p in model.metadata_props if p.key == "denoq.layer_map"))
            producer = {o: n for n in model.graph.node for o in n.output}
            node = next(n for n in model.graph.node if n.name == lmap[LAYER]["node"])
            scale_name = producer[node.input[1]].input[1]
            init = next(i for i in model.graph.initializer if i.name == scale_name)
            init.CopyFrom(numpy_helper.from_array(10 * numpy_helper.to_array(init), scale_name))
        return real_save(model, path)

    return save


@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_a_graph_that_disagrees_fails_the_compile_naming_the_layer(tiny_pipeline, tmp_path, capsys, monkeypatch,
                                                                   target):
    monkeypatch.setattr(graphs, "save_model", _corrupting_save(graphs.save_model))
    out = tmp_path / "art"
    assert main(["compile", str(tiny_pipeline), "--out", str(out), "--quiet", *SETS, "--set", f"target={target}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"starts at layer {LAYER}" in err and "--allow-parity-failure" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    assert main(["compile", str(tiny_pipeline), "--out", str(out), "--quiet", *SETS, "--set", f"target={target}",
                 "--allow-parity-failure"]) == 0
    gate = json.loads((out / "manifest.json").read_text())["parity_gate"]
    assert gate["passed"] is False and gate["allowed_failure"] is True and gate["first_layer"] == LAYER
    assert gate["ratio"] > gate["bound"]


def test_a_faithful_graph_passes_the_gate(tiny_artifact_trt, tiny_artifact_ort):
    for art in (tiny_artifact_trt, tiny_artifact_ort):
        gate = art.manifest["parity_gate"]
        assert gate["passed"] and 0 < gate["ratio"] <= gate["bound"] and "first_layer" not in gate
        assert art.manifest["cpu"]["isa"]


def test_sigterm_during_compile_leaves_nothing(tiny_pipeline, tmp_path, capsys, monkeypatch):
    """SIGTERM while the artifact is being written: exit 143, one error line, no temporary folder left."""
    real_export = pipeline.export_fp

    def export_then_terminated(*args, **kwargs):
        result = real_export(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        np.zeros(1).sum()  # the handler runs at the next bytecode
        return result

    monkeypatch.setattr(pipeline, "export_fp", export_then_terminated)
    out = tmp_path / "art"
    assert main(["compile", str(tiny_pipeline), "--out", str(out), "--quiet", *SETS]) == 143
    err = capsys.readouterr().err
    assert err == "error: terminated (SIGTERM); nothing was written\n"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
