"""The same model, recipe and seed give the same artifact byte for byte, timings.json (not hashed) aside; and a
derived file that goes missing never stops the compiled model from sampling."""

from __future__ import annotations

import json
import shutil

from denoq.compiler.artifact import TIMINGS
from denoq.compiler.cli import main


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_compiles_with_one_seed_are_byte_identical(tiny_pipeline, tmp_path):
    for name in ("a", "b"):
        assert main(["compile", str(tiny_pipeline), "--out", str(tmp_path / name), "--quiet", "--set",
                     "calib.samples=4", "--set", "calib.steps=4", "--set", "seed=3"]) == 0
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert set(a) == set(b) and TIMINGS in a
    differ = sorted(name for name in a if a[name] != b[name])
    assert differ in ([], [TIMINGS]), differ
    manifest = json.loads(a["manifest.json"])
    assert TIMINGS not in manifest["files"] and "seconds" not in json.dumps(manifest["calibration"])
    assert json.loads(a[TIMINGS])["calibration"]["seconds"] > 0


def test_sample_runs_after_a_report_is_deleted_or_changed(tiny_artifact_trt, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact_trt.path, art)
    assert main(["eval", str(art), "--n", "4", "--steps", "2", "--threads", "1"]) == 0
    (art / "report.json").unlink()
    (art / "layer_error.png").write_bytes(b"not the picture eval wrote")
    assert main(["sample", str(art), "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["inspect", str(art)]) == 0
    out = capsys.readouterr().out
    assert "report.json" in out and "missing or changed since written" in out
