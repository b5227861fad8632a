"""The study and memory tools (tools/study.py with tools/toolkit/study, tools/accuquant_memory.py): their rows, the
study's commands and one tiny memory run."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"denoq_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study():
    return _load("study")


@pytest.fixture(scope="module")
def matrices(study):
    return sys.modules["toolkit.study.matrices"]  # imported by study.py


#: (row count, digest of the rows) per matrix, as the earlier tools/study.py (string if-chains) built them, with
#: the default options and with every matrix option set (`_MATRIX_OPTIONS`)
_EARLIER_ROWS = {
    "defaults/timegroups": (21, "84d1ba11f03f1013"), "defaults/weights": (24, "9dbe0e626aa1550f"),
    "defaults/ptqd": (18, "37d12963717d22d1"), "defaults/accuquant": (16, "2e83997bea849f11"),
    "custom/timegroups": (4, "b0998c52b31c0722"), "custom/weights": (12, "42ea19ba1b2d72cf"),
    "custom/ptqd": (18, "c6b42534f3cea037"), "custom/accuquant": (104, "50acbb34d8844d7f")}
_MATRIX_OPTIONS = {
    "defaults": [],
    "custom": ["--samplers", "ddim50:256,ddim50:256:1,ddpm1000:128", "--groups", "2,4", "--strategies", "srm",
               "--search-groups", "8", "--low-bits", "4", "--low-bit-groups", "2", "--pool", "20", "--k", "8",
               "--group-sizes", "0,64", "--obq-group-sizes", "", "--windows", "2,3,4", "--objectives",
               "end,every,outputs", "--gradients", "full,stop", "--iters", "7", "--perstep-iters", "5"]}


@pytest.mark.parametrize("key", sorted(_EARLIER_ROWS))
def test_matrix_table_builds_the_earlier_rows(study, matrices, key):
    """Each named matrix, parsed from the command line, gives exactly the rows (names, presets, --set keys, labels,
    series, x, main, samplers) the earlier script gave."""
    case, matrix = key.split("/")
    args = study.parser().parse_args(["run", "--matrix", matrix, "--out", "o", *_MATRIX_OPTIONS[case]])
    rows = matrices.MATRICES[matrix].rows(matrices.MatrixOptions.from_namespace(args))
    text = json.dumps([dataclasses.asdict(r) for r in rows], sort_keys=True)
    assert (len(rows), hashlib.sha256(text.encode()).hexdigest()[:16]) == _EARLIER_ROWS[key]


def test_commands_parse(study):
    """run, merge and resample parse their options; the earlier options-only form maps onto them."""
    p = study.parser()
    args = p.parse_args(["run", "--matrix", "weights", "--out", "o", "--group-sizes", "0,32", "--set", "a=1"])
    assert (args.command, args.group_sizes, args.set, args.samplers) == ("run", [0, 32], ["a=1"],
                                                                        ["ddim50:512", "ddpm1000:128"])
    args = p.parse_args(["merge", "a/study.json", "b/study.json", "--matrix", "accuquant", "--out", "o"])
    assert args.command == "merge" and args.studies == [Path("a/study.json"), Path("b/study.json")]
    assert args.model == "digits" and not hasattr(args, "jobs") and not hasattr(args, "windows")
    args = p.parse_args(["resample", "a/study.json", "--matrix", "ptqd", "--out", "o", "--seed", "7", "--jobs", "1"])
    assert (args.command, args.seed, args.jobs) == ("resample", 7, 1) and not hasattr(args, "model")
    for argv in (["merge", "--matrix", "ptqd", "--out", "o"], ["run", "--out", "o"], ["resample", "x", "--out", "o"],
                 ["run", "--matrix", "nope", "--out", "o"], ["--matrix", "ptqd"], []):
        with pytest.raises(SystemExit):
            p.parse_args(study.legacy_argv(argv))
    legacy = study.legacy_argv
    assert legacy(["--matrix", "ptqd", "--out", "o"]) == ["run", "--matrix", "ptqd", "--out", "o"]
    assert legacy(["--matrix", "ptqd", "--merge", "a", "b", "--out", "o"]) == ["merge", "a", "b", "--matrix", "ptqd",
                                                                              "--out", "o"]
    assert legacy(["--resample", "a", "--seed", "3"]) == ["resample", "a", "--seed", "3"]
    assert legacy(["merge", "a"]) == ["merge", "a"] and legacy(["--help"]) == ["--help"]


def test_ptqd_rows_calibrate_on_the_sampler_they_are_evaluated_with(matrices):
    rows = matrices.ptqd_rows(matrices.MatrixOptions(samplers=["ddim50:256", "ddim50:256:1", "ddpm1000:128"]))
    assert len(rows) == 2 * (2 * len(matrices.PTQD_VARIANTS) + 1)
    for r in rows:
        kind = "ddpm" if r.name.startswith("ddpm") else "ddim"
        assert f"calib.sampler={kind}" in r.sets
        assert all(s.startswith(kind) for s in r.samplers)
    bias = next(r for r in rows if r.name == "ddim50-w4a8-ptqd-1")
    assert "ptqd.correlation=false" in bias.sets and bias.samplers == ("ddim50:256", "ddim50:256:1")
    mixed = next(r for r in rows if r.name == "ddpm1000-mixed")
    assert "precision.mixed=w8a8" in mixed.sets and "ptqd.vsc=true" in mixed.sets


def test_accuquant_rows_cover_rtn_per_step_and_windows(matrices):
    args = matrices.MatrixOptions(samplers=["ddim50:64"], windows=[2, 4], iters=7, perstep_iters=0,
                                  objectives=["end", "every"], gradients=["full", "stop"])
    rows = matrices.accuquant_rows(args)
    assert [r.labels[-1][1] for r in rows] == ["rtn", "per-step", "window 2", "window 4", "window 2 every",
                                               "window 4 every", "window 2 stop", "window 4 stop",
                                               "window 2 every stop", "window 4 every stop"] * 2
    assert all("accuquant.iters=7" in r.sets for r in rows)
    assert "accuquant.window=4" in rows[3].sets and "weights.method=adaround" in rows[3].sets
    assert "accuquant.objective=end" in rows[3].sets and "accuquant.objective=every" in rows[5].sets
    assert "accuquant.gradient=full" in rows[3].sets and "accuquant.gradient=stop" in rows[7].sets
    assert "weights.method=rtn" in rows[0].sets
    args.perstep_iters = 3
    tuned = [r for r in matrices.accuquant_rows(args) if "accuquant.perstep_iters=3" in r.sets]
    assert [r.labels[-1][1] for r in tuned] == ["per-step then window 2", "per-step then window 4",
                                                "per-step then window 2 stop", "per-step then window 4 stop"] * 2


def _study_json(folder: Path, seed: int, rows: list[tuple[str, float]]) -> Path:
    """A study.json as `study.py` writes it, with drift curves, for rows (name, FD to FP)."""
    folder.mkdir()
    quality = {"fd_digits": 80.0, "fd_ratio": 1.0, "psnr_vs_fp": 30.0}
    report = {"fp": {"ddim50:8": {"fd_digits": 80.0}}, "seconds": 1.0,
              "settings": {"matrix": "accuquant", "model": "digits", "samplers": ["ddim50:8"], "seed": seed},
              "rows": [{"name": name, "series": f"W4A8 {name}", "labels": [["method", name]], "calib_seconds": 1.0,
                        "accuquant": None, "quality": {"ddim50:8": {**quality, "fd_to_fp": fd}},
                        "drift": {"ddim50:8": {"t": [981, 1], "value": [0.01, fd / 100]}}} for name, fd in rows]}
    (folder / "study.json").write_text(json.dumps(report))
    return folder / "study.json"


def test_merge_puts_earlier_studies_in_one_table_and_plot(study, tmp_path, capsys):
    a = _study_json(tmp_path / "seed0", 0, [("rtn", 20.5), ("per-step", 5.4)])
    b = _study_json(tmp_path / "outputs0", 0, [("window2outputs", 5.46)])
    argv = ["--matrix", "accuquant", "--samplers", "ddim50:8", "--out", str(tmp_path / "m")]
    assert study.main(["merge", str(a), str(b), *argv, "--only", "seed0/per-step|outputs0"]) == 0
    table = capsys.readouterr().out
    assert "| seed0 | per-step | 80.00 (×1.000) · 5.40 · 30.00 dB | — | 1.0 |" in table
    assert "| outputs0 | window2outputs | 80.00 (×1.000) · 5.46 · 30.00 dB |" in table and "rtn" not in table
    merged = json.loads((tmp_path / "m" / "study.json").read_text())
    assert [r["series"] for r in merged["rows"]] == ["seed0: W4A8 per-step", "outputs0: W4A8 window2outputs"]
    assert (tmp_path / "m" / "study.png").read_bytes()[:4] == b"\x89PNG"
    other = _study_json(tmp_path / "seed1", 1, [("per-step", 5.45)])
    with pytest.raises(SystemExit, match=r"measured with .* --seed 1; merge only studies run with .* --seed 0"):
        study.main(["merge", str(a), str(other), *argv])
    with pytest.raises(SystemExit, match=r"no such study\.json"):
        study.main([*argv, "--merge", str(tmp_path / "nowhere" / "study.json")])  # the earlier form
    assert study.main([*argv, "--merge", str(a), "--only", "rtn"]) == 0
    assert "| seed0 | rtn |" in capsys.readouterr().out


def test_resample_measures_earlier_artifacts_on_new_noise_against_one_fp_run(study, tiny_artifact_trt, tmp_path,
                                                                           capsys):
    import shutil

    from denoq.compiler.artifact import Artifact
    from denoq.compiler.generate import generate
    from denoq.metrics import fd_between, psnr

    paths = []
    for folder in ("seedA", "seedB"):  # the same artifact as the per-step row of two studies
        path = _study_json(tmp_path / folder, 0, [("per-step", 5.4), ("rtn", 20.5)])
        shutil.copytree(tiny_artifact_trt.path, tmp_path / folder / "artifacts" / "per-step")
        paths.append(path)
    argv = ["--matrix", "accuquant", "--samplers", "ddim4:6", "--seed", "3", "--jobs", "1",
            "--out", str(tmp_path / "r")]
    assert study.main(["resample", *map(str, paths), *argv, "--only", "per-step"]) == 0
    rows = json.loads((tmp_path / "r" / "study.json").read_text())["rows"]
    assert [r["series"] for r in rows] == ["seedA: W4A8 per-step", "seedB: W4A8 per-step"]
    art = Artifact.open(tiny_artifact_trt.path)
    kw = dict(sampler="ddim", steps=4, eta=0.0, seed=3, n=6, threads=1)
    x_q, x_fp = generate(art, "ort", **kw), generate(art, "ort-fp", **kw)
    for r in rows:  # measured again on the new noise, not copied from the studies (5.4, 30 dB)
        q = r["quality"]["ddim4:6"]
        assert q["fd_to_fp"] == pytest.approx(fd_between(x_q, x_fp), rel=1e-6)
        assert q["psnr_vs_fp"] == pytest.approx(psnr(x_q, x_fp), rel=1e-6) and q["psnr_vs_fp"] != 30.0
        assert r["samplers"] == ["ddim4:6"] and len(r["drift"]["ddim4:6"]["t"]) == 4
    captured = capsys.readouterr()
    assert "| seedA | per-step |" in captured.out
    assert "sampling (graph, sampler) pairs: 100%" in captured.err and "3/3" in captured.err  # FP + two rows
    with pytest.raises(SystemExit, match=r"the artifact .*rtn of row seedA/rtn is gone"):
        study.main(["resample", str(paths[0]), *argv])
    with pytest.raises(SystemExit, match="give one of them"):
        study.main([*argv, "--resample", str(paths[0]), "--merge", str(paths[1])])


def test_gpu_check_says_what_is_missing(tmp_path, capsys):
    import torch

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: the check itself runs (python tools/gpu_check.py)")
    assert _load("gpu_check").main(["--out", str(tmp_path / "g"), "--models", "digits"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and ("tensorrt" in err or "polygraphy" in err or "GPU" in err)
    assert not (tmp_path / "g").exists()  # nothing written


@pytest.mark.slow
def test_memory_tool_runs_each_variant_in_its_own_process(tiny_pipeline, tmp_path, capsys):
    tool = _load("accuquant_memory")
    out = tmp_path / "mem.json"
    assert tool.main(["--model", str(tiny_pipeline), "--windows", "1,2", "--batch", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["n"]) for r in rows] == [("recompute", 1), ("recompute", 2), ("naive", 1),
                                                     ("naive", 2)]
    assert all(r["peak_mb"] >= 0 and r["seconds"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "| recompute |" in printed and "recompute n = 2 / n = 1" in printed


def test_formats_rows_are_valid_recipes_and_plot_against_bops(study, matrices):
    from denoq.compiler.recipe import load_recipe

    rows = matrices.MATRICES["formats"].rows(matrices.MatrixOptions())
    assert len(rows) == len(matrices.FORMAT_ROWS) and len({r.name for r in rows}) == len(rows)
    for row in rows:
        load_recipe(row.preset, row.sets)
    assert matrices.MATRICES["formats"].x_of({"bops_per_image": 3e9}) == 3.0
