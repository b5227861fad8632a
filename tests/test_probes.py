"""Bad-input probes of the `denoq` CLI: each is refused with one line `error: <problem>; <fix>`, exit status 2, no
traceback and nothing written; the ones that could be found early are found before any work (the work is
replaced by `_not_reached`, so a late refusal fails the test instead of taking seconds)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import compile_refused

from denoq.compiler.artifact import Artifact
from denoq.compiler.cli import main
from denoq.compiler.recipe import load_recipe
from denoq.errors import DenoqError

FAST = ("calib.samples=2", "calib.steps=2")


def _not_reached(*args, **kwargs):
    raise AssertionError("the bad input should have been refused before this work started")


def refused(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a user error: exit 2 and exactly one line on stderr, starting with `error:` (after the
    progress bars' carriage returns, where sampling ran), no traceback. Returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line.split("\r")[-1] for line in err.split("\n") if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and err.endswith("\n") and "Traceback" not in err, err
    return lines[0]


def no_leftovers(parent: Path, name: str) -> None:
    """Neither `name` nor a hidden work file or folder of it (`.NAME.tmp-…`) is in `parent`."""
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}")], list(parent.iterdir())


@pytest.fixture
def art(tmp_path, tiny_artifact_trt) -> Path:
    """A private copy of the tiny trt artifact (probes may try to write into it)."""
    return Path(shutil.copytree(tiny_artifact_trt.path, tmp_path / "art"))


@pytest.fixture
def no_sampling(monkeypatch):
    """Sampling, evaluation and validation fail the test if they start. The modules are imported first, so that
    their own `from … import generate` bindings stay the real ones for the tests after this one."""
    import denoq.compiler.evaluate
    import denoq.compiler.validate  # noqa: F401

    monkeypatch.setattr("denoq.compiler.generate.generate", _not_reached)
    monkeypatch.setattr("denoq.compiler.evaluate.evaluate", _not_reached)
    monkeypatch.setattr("denoq.compiler.validate.validate", _not_reached)


@pytest.fixture
def read_only_fs(monkeypatch):
    """Every folder is read-only, as on a read-only mount (where even root cannot create files): creating a
    temporary folder fails with EROFS. A chmod'ed folder cannot show this: root writes into it anyway."""
    def refuse(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)


# -- compile: recipe files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, words", [(b"\xff\xfe\x00\x81binary\x00\n", "not UTF-8"),
                                           (b"calib.steps = = 5\n[unclosed\n", "not valid TOML")])
def test_config_file_that_is_not_toml(capsys, monkeypatch, tmp_path, tiny_pipeline, content, words):
    monkeypatch.setattr("denoq.compiler.pipeline.load_model", _not_reached)
    config = tmp_path / "recipe.toml"
    config.write_bytes(content)
    err = compile_refused(capsys, tiny_pipeline, tmp_path / "a", "--config", str(config))
    assert words in err and str(config) in err
    no_leftovers(tmp_path, "a")


# -- compile: --out that cannot be written, found before calibration ----------------------------------------------
def test_compile_out_under_a_file(capsys, monkeypatch, tmp_path, tiny_pipeline):
    monkeypatch.setattr("denoq.compiler.pipeline.load_model", _not_reached)
    blocker = tmp_path / "somefile"
    blocker.write_text("precious")
    err = compile_refused(capsys, tiny_pipeline, blocker / "art")
    assert "somefile" in err and "not a folder" in err and "--out" in err
    assert blocker.read_text() == "precious"


def test_compile_out_on_read_only_file_system(capsys, monkeypatch, tmp_path, tiny_pipeline, read_only_fs):
    monkeypatch.setattr("denoq.compiler.pipeline.load_model", _not_reached)
    err = compile_refused(capsys, tiny_pipeline, tmp_path / "deeper" / "art")
    assert "Read-only file system" in err and str(tmp_path) in err and "writable --out" in err
    assert not (tmp_path / "deeper").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (0o555) folder")
def test_compile_out_in_read_only_folder(capsys, monkeypatch, tmp_path, tiny_pipeline):
    monkeypatch.setattr("denoq.compiler.pipeline.load_model", _not_reached)
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    try:
        err = compile_refused(capsys, tiny_pipeline, ro / "art")
    finally:
        ro.chmod(0o755)
    assert "Permission denied" in err and "writable --out" in err
    assert list(ro.iterdir()) == []


# -- compile: recipes that would be silently wrong -------------------------------------------------------------
@pytest.mark.parametrize("sets, words", [
    (("trt.fp32_layers=conv_outt",), ("trt.fp32_layers", "conv_outt", "matches no")),
    (("layers.keep_fp=*",), ("layers.keep_fp", "nothing to quantize")),
    (("calib.steps=5", "calib.timesteps=50"), ("calib.timesteps=50", "calib.steps=5", "≤ 5")),
])
def test_recipe_refused_before_calibration(capsys, monkeypatch, tmp_path, tiny_pipeline, sets, words):
    monkeypatch.setattr("denoq.compiler.calibrate.calibration_set", _not_reached)
    err = compile_refused(capsys, tiny_pipeline, tmp_path / "a", sets=sets)
    assert all(w in err for w in words), err
    no_leftovers(tmp_path, "a")


def test_calib_timesteps_up_to_calib_steps_is_accepted():
    assert load_recipe("w8a8", ["calib.steps=5", "calib.timesteps=5"])["calib.timesteps"] == 5
    with pytest.raises(DenoqError, match=r"calib\.timesteps=6 .*calib\.steps=5"):
        load_recipe("w8a8", ["calib.timesteps=6", "calib.steps=5"])


# -- compile: an OSError while writing --------------------------------------------------------------------------
def test_compile_disk_full_while_writing(capsys, monkeypatch, tmp_path, tiny_pipeline):
    def full(model, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("denoq.compiler.graphs.save_model", full)
    err = compile_refused(capsys, tiny_pipeline, tmp_path / "a", "--quiet", sets=FAST)
    assert "model.qdq.onnx" in err and "No space left on device" in err and "free space" in err
    no_leftovers(tmp_path, "a")


# -- sample / eval / validate arguments ------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["sample", "{art}", "--n", "0", "--out", "{tmp}/g.png"], ("--n", "≥ 1")),
    (["sample", "{art}", "--n", "-1", "--out", "{tmp}/g.png"], ("--n", "≥ 1")),
    (["sample", "{art}", "--steps", "0", "--out", "{tmp}/g.png"], ("--steps", "≥ 1")),
    (["sample", "{art}", "--threads", "0", "--out", "{tmp}/g.png"], ("--threads", "≥ 1", "omit")),
    (["sample", "{art}", "--threads", "-3", "--out", "{tmp}/g.png"], ("--threads", "≥ 1")),
    (["sample", "{art}", "--eta", "nan", "--out", "{tmp}/g.png"], ("--eta", "finite", "≥ 0")),
    (["sample", "{art}", "--eta", "inf", "--out", "{tmp}/g.png"], ("--eta", "finite")),
    (["sample", "{art}", "--eta", "-0.5", "--out", "{tmp}/g.png"], ("--eta", "≥ 0")),
    (["sample", "{art}", "--eta", "x", "--out", "{tmp}/g.png"], ("--eta", "'x'")),
    (["eval", "{art}", "--n", "1"], ("--n", "≥ 2", "Fréchet")),
    (["eval", "{art}", "--n", "0"], ("--n", "≥ 2")),
    (["eval", "{art}", "--threads", "0"], ("--threads", "≥ 1")),
    (["eval", "{art}", "--steps", "0"], ("--steps", "≥ 1")),
    (["validate", "{art}", "--n", "0"], ("--n", "≥ 1")),
    (["validate", "{art}", "--steps", "0"], ("--steps", "≥ 1")),
])
def test_bad_counts_and_numbers(capsys, tmp_path, art, no_sampling, argv, words):
    before = sorted(p.name for p in art.iterdir())
    err = refused(capsys, [a.format(art=art, tmp=tmp_path) for a in argv])
    assert all(w in err for w in words), err
    assert not (tmp_path / "g.png").exists()
    assert sorted(p.name for p in art.iterdir()) == before


def test_argparse_errors_are_one_line(capsys, tmp_path):
    err = refused(capsys, ["compile", "digits"])
    assert "--out" in err and "denoq compile --help" in err


# -- sample: output paths --------------------------------------------------------------------------------------
def test_sample_out_is_a_folder(capsys, tmp_path, art, no_sampling):
    folder = tmp_path / "grids"
    folder.mkdir()
    err = refused(capsys, ["sample", str(art), "--out", str(folder), "--force"])
    assert "is a folder" in err and ".png" in err
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("option", ["--out", "--save-tensor"])
def test_sample_target_under_a_file(capsys, tmp_path, art, no_sampling, option):
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    paths = {"--out": tmp_path / "g.png", "--save-tensor": tmp_path / "x.npy", option: blocker / "t"}
    err = refused(capsys, ["sample", str(art), "--out", str(paths["--out"]), "--save-tensor",
                           str(paths["--save-tensor"])])
    assert "not a folder" in err and option in err
    assert blocker.read_text() == "x" and not (tmp_path / "g.png").exists() and not (tmp_path / "x.npy").exists()


def test_sample_target_on_read_only_file_system(capsys, tmp_path, art, no_sampling, read_only_fs):
    err = refused(capsys, ["sample", str(art), "--out", str(tmp_path / "g.png")])
    assert "Read-only file system" in err and "writable --out" in err


def test_eval_on_read_only_artifact(capsys, tmp_path, art, no_sampling, read_only_fs):
    err = refused(capsys, ["eval", str(art), "--n", "4"])
    assert "Read-only file system" in err and str(art) in err


# -- sample / eval: an OSError while writing --------------------------------------------------------------------
def _disk_full(path, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_sample_disk_full_while_writing(capsys, monkeypatch, tmp_path, art):
    monkeypatch.setattr("denoq.compiler.files.atomic_write", _disk_full)
    out = tmp_path / "g.png"
    err = refused(capsys, ["sample", str(art), "--n", "1", "--steps", "1", "--out", str(out)])
    assert str(out) in err and "No space left on device" in err and "free space" in err
    no_leftovers(tmp_path, "g.png")


def test_eval_disk_full_while_writing(capsys, monkeypatch, tmp_path, art):
    def full(self, files, *args, **kwargs):
        _disk_full(self.path / "report.json")

    monkeypatch.setattr(Artifact, "add_files", full)
    before = sorted(p.name for p in art.iterdir())
    err = refused(capsys, ["eval", str(art), "--n", "2", "--steps", "1", "--threads", "1"])
    assert "report.json" in err and "No space left on device" in err and "free space" in err
    assert sorted(p.name for p in art.iterdir()) == before


# -- a graph file replaced by garbage whose hash the manifest was edited to match ----------------------------------
@pytest.mark.parametrize("argv", [["sample", "--backend", "ort", "--steps", "2", "--n", "2", "--out", "{tmp}/g.png"],
                                  ["eval", "--steps", "2", "--n", "2"], ["validate", "--steps", "2", "--n", "2"]])
def test_garbage_graph_with_a_matching_hash(capsys, tmp_path, art, argv):
    import json

    from denoq.compiler.files import sha256_file

    (art / "model.qdq.onnx").write_bytes(b"\x08\x07garbage, not a protobuf \xff\xff\xff")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["model.qdq.onnx"] = sha256_file(art / "model.qdq.onnx")
    (art / "manifest.json").write_text(json.dumps(manifest))
    before = sorted(p.name for p in art.iterdir())
    err = refused(capsys, [argv[0], str(art), *(a.format(tmp=tmp_path) for a in argv[1:])])
    assert "model.qdq.onnx is not a readable ONNX model" in err and "recompile" in err
    assert sorted(p.name for p in art.iterdir()) == before and not (tmp_path / "g.png").exists()
