"""tools/bench.py: its small pieces (fast) and one tiny end-to-end run (slow)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx
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
    assert args.models == ["digits", "big"] and args.batches == [1, 8] and args.n == 512 and args.groups == 4
    assert bench.parse_args(["--groups", "1"]).groups == 1
    assert bench.parse_args(["--models", "digits", "--batches", "8"]).batches == [8]
    with pytest.raises(SystemExit):
        bench.parse_args(["--reuse"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--groups", "0"])


def test_overheads_are_within_round_ratios(bench):
    out = bench.overheads([10.0, 20.0, 10.0], [11.0, 20.0, 9.0])
    assert out == pytest.approx({"overhead": 1.0, "overhead_min": 0.9, "overhead_max": 1.1})
    assert bench.variant_label("trt-sel", 4) == "denoq trt G=4" and bench.variant_label("ort-cpu") == "denoq ort-cpu"


def _fusion(fraction):
    return {"layers": 4, "fused": int(4 * fraction), "fraction_fused": fraction, "integer_ops": {"QLinearConv": 1},
            "float_ops": {}, "quantize_nodes": 2, "dequantize_nodes": 3}


def test_selector_and_fusion_tables(bench):
    per = {k: {"median_ms": 2.0, "speedup": 1.0, "speedup_min": 0.9, "speedup_max": 1.1}
           for k in [*bench.VARIANTS, *bench.SELECTORS]}
    for k in bench.SELECTORS:
        per[k].update(median_ms=2.1, overhead=1.05, overhead_min=1.01, overhead_max=1.2)
    results = {"m": {"info": {"selector_layers_trt-sel": 3, "selector_layers_ort-cpu-sel": 3},
                     "latency": {"batch1": per, "batch8": per},
                     "fusion": {k: _fusion(0.5) for k in [*bench.VARIANTS, *bench.SELECTORS] if k != "fp32"}}}
    lines = bench.selector_table(results, 4).split("\n\n")[0].splitlines()
    assert lines[0] == ("| model | batch | profile | selector layers | G=1 ms | G=4 ms | G=4 / G=1 (range) | "
                        "fused G=1 | fused G=4 |")
    assert len(lines) == 2 + 2 * 2 and all(line.count("|") == 10 for line in lines)
    assert lines[2] == "| m | 1 | denoq trt | 3 | 2.00 | 2.10 | 1.050 (1.010–1.200) | 50% | 50% |"
    fusion = bench.fusion_table(results, 4).splitlines()
    assert len(fusion) == 2 + len(bench.VARIANTS) - 1 + len(bench.SELECTORS)
    assert any("| denoq ort-cpu G=4 |" in line for line in fusion)
    latency = bench.latency_table(results, 2, 7).split("\n\n")[0].splitlines()
    assert all(line.count("|") == 2 + len(bench.VARIANTS) + 1 for line in latency) and "G=4" not in latency[0]


@pytest.mark.slow
def test_tiny_end_to_end(bench, tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--models", str(tiny_pipeline), "--quality-model", str(tiny_pipeline), "--batches", "1",
                "--rounds", "1", "--iters", "2", "--n", "8", "--steps", "2", "--set", "calib.samples=2",
                "--set", "calib.steps=2", "--groups", "2", "--json", str(out), "--out-dir", str(tmp_path / "work")])
    report = json.loads(out.read_text())
    model = report["models"][tiny_pipeline.name]
    assert set(model["latency"]["batch1"]) == {"fp32", "trt", "ort-cpu", "ort-cpu-raw", "ort-cpu-w7", "peer", "peer-t",
                                               "trt-sel", "ort-cpu-sel", "trt-head"}
    assert set(model["fusion"]) == {"trt", "ort-cpu", "ort-cpu-w7", "peer", "peer-t", "trt-sel", "ort-cpu-sel",
                                    "trt-head"}
    assert model["info"]["recipe_trt"]["weights.bits"] == 8
    assert onnx.load(model["paths"]["ort-cpu-w7"]) is not None and report["environment"]["cpu"]["isa"]
    assert model["latency"]["batch1"]["trt-sel"]["overhead"] > 0
    assert model["latency"]["batch1"]["trt-head"]["overhead"] > 0
    head = onnx.load(model["paths"]["trt-head"])
    assert [n.op_type for n in head.graph.node if n.output[0] == "out_sample"] == ["Mul"]
    assert set(report["quality"]["rows"]) == {"torch-fp", "fp32", "trt", "ort-cpu", "ort-cpu-raw", "ort-cpu-w7", "peer",
                                              "peer-t"}
    assert model["info"]["peer"]["sin_input_scale"] is not None
    assert model["info"]["peer-t"]["sin_input_scale"] is None
    printed = capsys.readouterr().out
    assert "## Latency per model call" in printed and "ORT quantize_static" in printed
    assert "instruction set seen by ONNX Runtime" in printed and "7-bit weights" in printed
    assert "## Timestep selector overhead" in printed and "denoq ort-cpu G=2" in printed
    assert "## PTQD head overhead" in printed and "denoq trt + PTQD head" in printed


def test_gptq_timing_table(bench):
    """The GPTQ / OBQ timing section: one entry per width, OBQ only up to its limit, slopes from ≥ 2 widths, and
    the markdown table names both (times themselves are not asserted: speed lives in the benchmark)."""
    r = bench.bench_gptq([32, 64, 96], rows=16, obq_max_cols=64, seed=0)
    assert [e["cols"] for e in r["layers"]] == [32, 64, 96]
    assert all(e["gptq_s"] > 0 for e in r["layers"]) and "obq_s" not in r["layers"][-1]
    assert np.isfinite(r["gptq_slope"]) and np.isfinite(r["obq_slope"])
    table = bench.gptq_table(r)
    assert "| 96 |" in table and table.count("\n|") == 5 and "log-log slope" in table
    assert bench.parse_args(["--gptq-cols", ""]).gptq_cols == []
