"""tools/bench.py and its parts (tools/toolkit/bench, tools/gptq_bench.py): the small pieces (fast) and one tiny
end-to-end run (slow)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from denoq.calibrators.calibset import CalibrationSet

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def bench():
    """tools/bench.py as the module `bench`, tools/ on the import path as when it runs as a script."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module("bench")


@pytest.fixture(scope="module")
def kit(bench):
    """The bench's parts (tools/toolkit), by short name."""
    names = {"common": "toolkit.common", "peer": "toolkit.bench.peer", "tables": "toolkit.bench.tables",
             "timing": "toolkit.bench.timing", "variants": "toolkit.bench.variants"}
    return {short: importlib.import_module(name) for short, name in names.items()}


def test_md_table(kit):
    text = kit["common"].md_table(["a", "b"], [["1", "2"], ["3", "4"]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]


def test_trajectory_reader_feeds_every_input_once_and_rewinds(kit):
    calib = CalibrationSet([torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)], [900, 100])
    reader = kit["peer"].TrajectoryReader(calib, batch_size=3)
    feeds = list(iter(reader.get_next, None))
    assert [f["sample"].shape[0] for f in feeds] == [3, 2, 3, 2]
    assert all(f["sample"].dtype == np.float32 and f["timestep"].dtype == np.float32 for f in feeds)
    assert [int(f["timestep"][0]) for f in feeds] == [900, 900, 100, 100]
    assert set(feeds[0]) == {"sample", "timestep"}
    reader.rewind()
    assert reader.get_next()["sample"].shape == (3, 1, 4, 4)


def test_timestep_path_nodes_stop_at_the_first_layer(kit):
    nodes = [helper.make_node("Mul", ["timestep", "freq"], ["tf"], name="mul"),
             helper.make_node("Sin", ["tf"], ["s"], name="sin"),
             helper.make_node("Gemm", ["s", "w"], ["emb"], name="linear_1"),
             helper.make_node("Sigmoid", ["emb"], ["act"], name="after_linear"),
             helper.make_node("Conv", ["sample", "k"], ["out_sample"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1]),
                                           helper.make_tensor_value_info("sample", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, None)])
    assert kit["peer"].timestep_path_nodes(helper.make_model(graph)) == ["mul", "sin"]


def test_parse_args(bench):
    args = bench.parse_args([])
    assert args.models == ["digits", "big"] and args.batches == [1, 8] and args.n == 512 and args.groups == 4
    assert bench.parse_args(["--groups", "1"]).groups == 1
    assert bench.parse_args(["--models", "digits", "--batches", "8"]).batches == [8]
    with pytest.raises(SystemExit):
        bench.parse_args(["--reuse"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--groups", "0"])


def test_overheads_are_within_round_ratios(kit):
    out = kit["timing"].overheads([10.0, 20.0, 10.0], [11.0, 20.0, 9.0])
    assert out == pytest.approx({"overhead": 1.0, "overhead_min": 0.9, "overhead_max": 1.1})
    assert kit["timing"].speedups([10.0, 20.0], [5.0, 20.0]) == {"speedup": 1.5, "speedup_min": 1.0, "speedup_max": 2.0}
    label = kit["variants"].variant_label
    assert label("trt-sel", 4) == "denoq trt G=4" and label("ort-cpu") == "denoq ort-cpu"


def test_variants_table_is_the_earlier_set(kit):
    """The variants as data: the same keys, labels, sessions and bases as the earlier dicts of tools/bench.py."""
    v = kit["variants"]
    assert v.CORE == ("fp32", "trt", "ort-cpu", "ort-cpu-raw", "ort-cpu-w7", "peer", "peer-t")
    assert [v.variant_label(k) for k in v.CORE] == [
        "FP32", "denoq trt", "denoq ort-cpu", "denoq ort-cpu, ORT's default kernels", "denoq ort-cpu, 7-bit weights",
        "ORT quantize_static", "ORT quantize_static, t-emb. + keep_fp FP"]
    assert v.SELECTORS == ("trt-sel", "ort-cpu-sel") and v.HEADS == ("trt-head",)
    assert {k: v.base_of(k) for k in [*v.SELECTORS, *v.HEADS]} == {"trt-sel": "trt", "ort-cpu-sel": "ort-cpu",
                                                                   "trt-head": "trt"}
    assert [x.key for x in v.VARIANTS if x.default_kernels] == ["ort-cpu-raw", "peer", "peer-t"]
    assert [(x.key, x.preset, x.sets) for x in v.of_kind("compile")] == [
        ("trt", "w8a8", ()), ("ort-cpu", "w8a8-ort", ()), ("ort-cpu-w7", "w8a8-ort", ("weights.bits=7",))]
    assert v.label_quality("fp32") == "FP32 (ORT)" and v.label_quality(v.TORCH_FP) == "FP (PyTorch)"


def _fusion(fraction):
    return {"layers": 4, "fused": int(4 * fraction), "fraction_fused": fraction, "integer_ops": {"QLinearConv": 1},
            "float_ops": {}, "quantize_nodes": 2, "dequantize_nodes": 3}


def _table(kit, name, report, **settings):
    """A table's markdown lines without its heading and note."""
    tables = kit["tables"]
    text = tables.render_table(getattr(tables, name), report, tables.Settings(**settings))
    return text.split("\n\n")[1].splitlines()


def test_selector_and_fusion_tables(kit):
    v = kit["variants"]
    per = {k: {"median_ms": 2.0, "speedup": 1.0, "speedup_min": 0.9, "speedup_max": 1.1}
           for k in [*v.CORE, *v.SELECTORS]}
    for k in v.SELECTORS:
        per[k].update(median_ms=2.1, overhead=1.05, overhead_min=1.01, overhead_max=1.2)
    report = {"models": {"m": {"info": {"selector_layers_trt-sel": 3, "selector_layers_ort-cpu-sel": 3},
                               "latency": {"batch1": per, "batch8": per},
                               "fusion": {k: _fusion(0.5) for k in [*v.CORE, *v.SELECTORS] if k != "fp32"}}}}
    lines = _table(kit, "SELECTOR", report, groups=4)
    assert lines[0] == ("| model | batch | profile | selector layers | G=1 ms | G=4 ms | G=4 / G=1 (range) | "
                        "fused G=1 | fused G=4 |")
    assert len(lines) == 2 + 2 * 2 and all(line.count("|") == 10 for line in lines)
    assert lines[2] == "| m | 1 | denoq trt | 3 | 2.00 | 2.10 | 1.050 (1.010–1.200) | 50% | 50% |"
    fusion = _table(kit, "FUSION", report, groups=4)
    assert len(fusion) == 2 + len(v.CORE) - 1 + len(v.SELECTORS)
    assert any("| denoq ort-cpu G=4 |" in line for line in fusion)
    latency = _table(kit, "LATENCY", report, groups=4)
    assert all(line.count("|") == 2 + len(v.CORE) + 1 for line in latency) and "G=4" not in latency[0]
    assert latency[2] == "| m | 1 | 2.00 | " + " | ".join(["2.00 (1.00×, 0.90–1.10)"] * 6) + " |"
    assert kit["tables"].render_table(kit["tables"].HEAD, report, kit["tables"].Settings()) is None  # no head rows


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


def test_gptq_timing_table(bench, tmp_path, capsys):
    """The GPTQ / OBQ timing section: one entry per width, OBQ only up to its limit, slopes from ≥ 2 widths, and
    the markdown table names both (times themselves are not asserted: speed lives in the benchmark); the same
    timing runs alone as tools/gptq_bench.py."""
    gptq_bench = sys.modules["gptq_bench"]  # imported by bench.py
    r = gptq_bench.bench_gptq([32, 64, 96], rows=16, obq_max_cols=64, seed=0)
    assert [e["cols"] for e in r["layers"]] == [32, 64, 96]
    assert all(e["gptq_s"] > 0 for e in r["layers"]) and "obq_s" not in r["layers"][-1]
    assert np.isfinite(r["gptq_slope"]) and np.isfinite(r["obq_slope"])
    table = gptq_bench.gptq_table(r)
    assert "| 96 |" in table and table.count("\n|") == 5 and "log-log slope" in table
    assert bench.parse_args(["--gptq-cols", ""]).gptq_cols == []
    assert bench.parse_args(["--gptq-cols", "8,16", "--gptq-rows", "4"]).gptq_cols == [8, 16]
    out = tmp_path / "gptq.json"
    assert gptq_bench.main(["--cols", "32,48", "--rows", "8", "--obq-max-cols", "32", "--json", str(out)]) == 0
    assert "| 48 |" in capsys.readouterr().out
    assert [e["cols"] for e in json.loads(out.read_text())["layers"]] == [32, 48]
