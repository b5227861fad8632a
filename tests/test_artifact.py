"""The artifact folder: atomic writing, manifest, checked reading (denoq/compiler/artifact.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import denoq
import denoq.compiler.artifact as artifact_module
from denoq.compiler.artifact import (
    SCHEMA_VERSION,
    TIMINGS,
    Artifact,
    library_versions,
    split_timings,
)
from denoq.compiler.artifact_writer import ArtifactWriter, check_output_dir
from denoq.compiler.files import sha256_file
from denoq.errors import DenoqError


def write_artifact(out: Path, force: bool = False, payload: bytes = b"onnx bytes") -> Artifact:
    with ArtifactWriter(out, force) as w:
        w.write_bytes("model.qdq.onnx", payload)
        w.write_json("report.json", {"b": 1, "a": [1, 2]})
        w.path("pictures/grid.png").write_bytes(b"\x89PNG")
        return w.commit({"recipe": {"name": "w8a8", "values": {"seed": 0}}})


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DenoqError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip(tmp_path):
    out = tmp_path / "art"
    art = write_artifact(out)
    assert art.path == out
    assert leftovers(tmp_path) == []
    m = json.loads((out / "manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION == 1
    assert m["denoq_version"] == denoq.__version__
    assert "created" not in m
    assert m["recipe"] == {"name": "w8a8", "values": {"seed": 0}}
    assert set(m["versions"]) == {"torch", "onnx", "onnxruntime", "diffusers", "numpy", "tensorrt"}
    assert m["versions"]["numpy"] is not None
    assert list(m["files"]) == ["model.qdq.onnx", "pictures/grid.png", "report.json"]
    assert m["files"]["model.qdq.onnx"] == hashlib.sha256(b"onnx bytes").hexdigest()
    assert m["files"]["pictures/grid.png"] == hashlib.sha256(b"\x89PNG").hexdigest()
    # manifest: sorted keys, indent 2
    text = (out / "manifest.json").read_text()
    assert text == json.dumps(m, sort_keys=True, indent=2) + "\n"
    assert json.loads((out / "report.json").read_text()) == {"a": [1, 2], "b": 1}

    opened = Artifact.open(out)
    assert opened.manifest == m == art.manifest
    assert opened.file("model.qdq.onnx").read_bytes() == b"onnx bytes"
    assert opened.has("report.json") and not opened.has("engine.plan")
    assert "engine.plan" in error_of(opened.file, "engine.plan")


def test_reproducible(tmp_path):
    write_artifact(tmp_path / "a")
    write_artifact(tmp_path / "b")
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()


def test_library_versions_null_when_missing():
    v = library_versions()
    assert v["tensorrt"] is None or isinstance(v["tensorrt"], str)
    assert all(x is None or isinstance(x, str) for x in v.values())


def test_existing_output_refused_without_force(tmp_path):
    out = tmp_path / "art"
    write_artifact(out, payload=b"old")
    msg = error_of(check_output_dir, out, False)
    assert str(out) in msg and "--force" in msg
    with pytest.raises(DenoqError, match="--force"):
        write_artifact(out, payload=b"new")
    assert Artifact.open(out).file("model.qdq.onnx").read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_replaced_with_force(tmp_path):
    out = tmp_path / "art"
    write_artifact(out, payload=b"old")
    (out / "stale.txt").write_text("from the old artifact")
    check_output_dir(out, True)  # no error
    write_artifact(out, force=True, payload=b"new")
    art = Artifact.open(out)
    assert art.file("model.qdq.onnx").read_bytes() == b"new"
    assert not (out / "stale.txt").exists()
    assert leftovers(tmp_path) == []


def test_output_is_a_file(tmp_path):
    f = tmp_path / "art"
    f.write_text("x")
    for force in (False, True):
        msg = error_of(check_output_dir, f, force)
        assert "not a folder" in msg
    assert f.read_text() == "x"


def test_force_never_deletes_a_non_artifact_folder(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "precious.py").write_text("x")
    assert "not a denoq artifact" in error_of(check_output_dir, d, True)
    with pytest.raises(DenoqError):
        write_artifact(d, force=True)
    assert (d / "precious.py").read_text() == "x"
    # an empty folder may be replaced with --force
    e = tmp_path / "empty"
    e.mkdir()
    write_artifact(e, force=True)
    Artifact.open(e)


def test_output_parent_created(tmp_path):
    write_artifact(tmp_path / "runs" / "a" / "art")
    Artifact.open(tmp_path / "runs" / "a" / "art")


@pytest.mark.parametrize("existing", [False, True])
def test_exception_inside_writer_leaves_nothing(tmp_path, existing):
    out = tmp_path / "art"
    if existing:
        write_artifact(out, payload=b"old")
    with pytest.raises(RuntimeError, match="boom"), ArtifactWriter(out, force=True) as w:
        w.write_bytes("model.qdq.onnx", b"half")
        assert w.tmp_dir.parent == tmp_path and w.tmp_dir.name.startswith(".art.tmp-")
        assert not out.exists() or (out / "model.qdq.onnx").read_bytes() == b"old"
        raise RuntimeError("boom")
    assert leftovers(tmp_path) == []
    if existing:
        assert Artifact.open(out).file("model.qdq.onnx").read_bytes() == b"old"
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["art"] if existing else [])


def test_exception_in_commit_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(TypeError), ArtifactWriter(out) as w:
        w.write_bytes("a.bin", b"1")
        w.commit({"bad": object()})  # not JSON-serializable
    assert list(tmp_path.iterdir()) == []


def test_leaving_without_commit_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="commit"), ArtifactWriter(tmp_path / "art") as w:
        w.write_bytes("a.bin", b"1")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_reserved_names(tmp_path):
    with pytest.raises(ValueError), ArtifactWriter(tmp_path / "art") as w:
        w.write_bytes("manifest.json", b"{}")
    with pytest.raises(ValueError), ArtifactWriter(tmp_path / "art") as w:
        w.path("../escape.txt")
    with pytest.raises(ValueError), ArtifactWriter(tmp_path / "art") as w:
        w.commit({"files": {}})
    assert list(tmp_path.iterdir()) == []


def test_tampered_file_named(tmp_path):
    out = tmp_path / "art"
    write_artifact(out)
    (out / "pictures" / "grid.png").write_bytes(b"\x89PNG!")
    msg = error_of(Artifact.open, out)
    assert "grid.png" in msg and "sha256 mismatch" in msg and "denoq compile" in msg
    assert "modified or corrupted after compile" in msg
    Artifact.open(out, verify=False)  # reading without verification still works


def test_missing_file_named(tmp_path):
    out = tmp_path / "art"
    write_artifact(out)
    (out / "model.qdq.onnx").unlink()
    msg = error_of(Artifact.open, out)
    assert "model.qdq.onnx" in msg and "missing" in msg and "denoq compile" in msg


def rewrite_manifest(out: Path, **changes) -> None:
    m = json.loads((out / "manifest.json").read_text())
    m.update(changes)
    (out / "manifest.json").write_text(json.dumps(m))


def test_newer_schema(tmp_path):
    out = tmp_path / "art"
    write_artifact(out)
    rewrite_manifest(out, schema_version=SCHEMA_VERSION + 1)
    msg = error_of(Artifact.open, out)
    assert msg == f"artifact schema {SCHEMA_VERSION + 1} is newer than this denoq supports (≤1); upgrade denoq"


@pytest.mark.parametrize("version", [0, "1", None, True])
def test_older_or_invalid_schema(tmp_path, version):
    out = tmp_path / "art"
    write_artifact(out)
    rewrite_manifest(out, schema_version=version)
    msg = error_of(Artifact.open, out)
    assert "schema" in msg and "denoq compile" in msg


def test_not_an_artifact(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    assert error_of(Artifact.open, d) == f"{d} is not a denoq artifact (no manifest.json); run denoq compile first"
    msg = error_of(Artifact.open, tmp_path / "missing")
    assert "does not exist" in msg and "missing" in msg
    (tmp_path / "f").write_text("x")
    assert "not a folder" in error_of(Artifact.open, tmp_path / "f")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_unparsable_manifest(tmp_path, text):
    d = tmp_path / "art"
    d.mkdir()
    (d / "manifest.json").write_text(text)
    msg = error_of(Artifact.open, d)
    assert "manifest.json" in msg and "denoq compile" in msg


def test_manifest_file_names_cannot_escape(tmp_path):
    out = tmp_path / "art"
    write_artifact(out)
    rewrite_manifest(out, files={"../outside": "0" * 64})
    assert "invalid file name" in error_of(Artifact.open, out)


def test_add_files_keeps_hashes_valid(tmp_path):
    out = tmp_path / "art"
    write_artifact(out)
    art = Artifact.open(out)
    art.add_files({"report.json": b'{"fd_digits": 1.5}\n', "eval/grid.png": b"png"},
                  {"report": {"fd_digits": 1.5}})
    again = Artifact.open(out)  # verifies every hash
    assert again.manifest == art.manifest
    assert again.manifest["report"] == {"fd_digits": 1.5}
    assert again.manifest["recipe"] == {"name": "w8a8", "values": {"seed": 0}}
    assert again.files["report.json"] == sha256_file(out / "report.json")
    assert again.file("eval/grid.png").read_bytes() == b"png"
    assert set(again.files) == {"model.qdq.onnx", "pictures/grid.png", "report.json", "eval/grid.png"}
    assert (out / "report.json").read_bytes() == b'{"fd_digits": 1.5}\n'
    assert leftovers(out) == [] and leftovers(out / "eval") == []
    text = (out / "manifest.json").read_text()
    assert text == json.dumps(again.manifest, sort_keys=True, indent=2) + "\n"


def test_add_files_refuses_reserved(tmp_path):
    out = tmp_path / "art"
    art = write_artifact(out)
    with pytest.raises(ValueError):
        art.add_files({"manifest.json": b"{}"}, {})
    with pytest.raises(ValueError):
        art.add_files({}, {"files": {}})
    with pytest.raises(TypeError):
        art.add_files({"x.bin": b"1"}, {"bad": object()})
    assert not (out / "x.bin").exists()
    Artifact.open(out)


def test_sha256_file(tmp_path):
    f = tmp_path / "x"
    data = bytes(range(256)) * 5000  # larger than one read chunk
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()


def test_output_appearing_during_write_is_not_clobbered(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(DenoqError, match="--force"), ArtifactWriter(out) as w:
        w.write_bytes("a.bin", b"1")
        out.mkdir()  # someone else wrote it meanwhile
        (out / "theirs.txt").write_text("x")
        w.commit({})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_add_files_is_all_or_nothing_on_a_full_disk(tmp_path, monkeypatch):
    """The disk fills while the second of three files is staged: the artifact stays exactly as it was."""
    out = tmp_path / "art"
    write_artifact(out)
    art = Artifact.open(out)
    art.add_files({"layer_error.png": b"old picture"})
    before = _snapshot(out)
    real_stage, calls = artifact_module.stage, []

    def full_disk(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_stage(path, data)

    monkeypatch.setattr(artifact_module, "stage", full_disk)
    with pytest.raises(OSError):
        art.add_files({"layer_error.png": b"new picture", "report.json": b"{}", "report.html": b"<html>"},
                      {"eval_runs": [1]})
    assert calls[:2] == ["layer_error.png", "report.html"]
    assert _snapshot(out) == before and leftovers(out) == []
    Artifact.open(out).file("layer_error.png")  # its hash still matches


def test_a_missing_or_changed_report_never_blocks_the_compiled_model(tmp_path):
    out = tmp_path / "art"
    write_artifact(out).add_files({"report.json": b'{"fd": 1}', "eval.png": b"png"})
    (out / "report.json").unlink()
    (out / "eval.png").write_bytes(b"other")
    art = Artifact.open(out)  # the core files still verify
    assert art.file("model.qdq.onnx").read_bytes() == b"onnx bytes"
    assert art.stale() == ["eval.png", "report.json"]
    msg = error_of(art.file, "report.json")
    assert "missing" in msg and "rerun the denoq command" in msg
    assert "modified or corrupted" in error_of(art.file, "eval.png")
    (out / "model.qdq.onnx").write_bytes(b"tampered")
    assert "recompile" in error_of(Artifact.open, out)


def test_timings_are_split_off_so_same_inputs_give_the_same_manifest(tmp_path):
    manifest = {"recipe": {"seed": 0}, "calibration": {"inputs": 8, "seconds": 1.5, "weights": {"seconds": 0.2}},
                "passes": ["insert_qdq"], "pass_seconds": [0.01]}
    kept, timings = split_timings(manifest)
    assert kept == {"recipe": {"seed": 0}, "calibration": {"inputs": 8, "weights": {}}, "passes": ["insert_qdq"]}
    assert timings == {"calibration": {"seconds": 1.5, "weights": {"seconds": 0.2}}, "pass_seconds": [0.01]}
    texts = []
    for i, seconds in enumerate((1.5, 9.25)):
        with ArtifactWriter(tmp_path / f"a{i}") as w:
            w.write_bytes("model.qdq.onnx", b"graph")
            art = w.commit({**manifest, "calibration": {"inputs": 8, "seconds": seconds}})
        texts.append((art.path / "manifest.json").read_bytes())
        assert TIMINGS not in art.files and json.loads((art.path / TIMINGS).read_text())["calibration"] == {
            "seconds": seconds}
    assert texts[0] == texts[1]


def test_a_killed_writers_work_folder_is_removed_by_the_next_writer(tmp_path):
    """SIGKILL leaves `.NAME.tmp-PID-…`; the next writer into that parent removes it once PID is gone, and keeps
    the work folders of live processes."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = tmp_path / f".art.tmp-{dead.stdout.strip()}-abc123"
    live = tmp_path / f".other.tmp-{os.getpid()}-def456"
    for d in (stale, live):
        (d / "sub").mkdir(parents=True)
    write_artifact(tmp_path / "art")
    assert not stale.exists() and live.is_dir()
