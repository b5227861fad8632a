"""tools/bench.py: its small pieces (fast) and one tiny end-to-end run (slow)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from denoq.calibrators.calibset import CalibrationSet

BENCH_PATH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("denoq_tools_bench", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_md_table(bench):
    text = bench.md_table(["a", "b"], [["1", "2"], ["3", "4"]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]


def test_trajectory_reader_feeds_every_input_once_and_rewinds(bench):
    calib = CalibrationSet([torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)], [900, 100])
    reader = bench.TrajectoryReader(calib, batch_size=3)
    feeds = list(iter(reader.get_next, None))
    assert [f["sample"].shape[0] for f in feeds] == [3, 2, 3, 2]
    assert all(f["sample"].dtype == np.float32 and f["timestep"].dtype == np.int64 for f in feeds)
    assert [int(f["timestep"][0]) for f in feeds] == [900, 900, 100, 100]
    assert set(feeds[0]) == {"sample", "timestep"}
    reader.rewind()
    assert reader.get_next()["sample"].shape == (3, 1, 4, 4)


def test_timestep_path_nodes_stop_at_the_first_layer(bench):
    nodes = [helper.make_node("Mul", ["timestep", "freq"], ["tf"], name="mul"),
             helper.make_node("Sin", ["tf"], ["s"], name="sin"),
             helper.make_node("Gemm", ["s", "w"], ["emb"], name="linear_1"),
             helper.make_node("Sigmoid", ["emb"], ["act"], name="after_linear"),
             helper.make_node("Conv", ["sample", "k"], ["out_sample"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1]),
                                           helper.make_tensor_value_info("sample", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, None)])
    assert bench.timestep_path_nodes(helper.make_model(graph)) == ["mul", "sin"]


def test_parse_args(bench):
    args = bench.parse_args([])
    assert args.models == ["digits", "big"] and args.batches == [1, 8] and args.n == 512
    assert bench.parse_args(["--models", "digits", "--batches", "8"]).batches == [8]
    with pytest.raises(SystemExit):
        bench.parse_args(["--reuse"])


@pytest.mark.slow
def test_tiny_end_to_end(bench, tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--models", str(tiny_pipeline), "--quality-model", str(tiny_pipeline), "--batches", "1",
                "--rounds", "1", "--iters", "2", "--n", "8", "--steps", "2", "--set", "calib.samples=2",
                "--set", "calib.steps=2", "--json", str(out)])
    report = json.loads(out.read_text())
    model = report["models"][tiny_pipeline.name]
    assert set(model["latency"]["batch1"]) == {"fp32", "trt", "ort-cpu", "peer", "peer-t"}
    assert set(model["fusion"]) == {"trt", "ort-cpu", "peer", "peer-t"}
    assert set(report["quality"]["rows"]) == {"torch-fp", "fp32", "trt", "ort-cpu", "peer", "peer-t"}
    assert model["info"]["peer"]["sin_input_scale"] is not None
    assert model["info"]["peer-t"]["sin_input_scale"] is None
    printed = capsys.readouterr().out
    assert "## Latency per model call" in printed and "ORT quantize_static" in printed
