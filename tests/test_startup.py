"""Start-up: `denoq --help`, `recipes` and `inspect` import none of the heavy libraries (torch, diffusers,
onnxruntime, onnx), so they answer in well under a second (timed by farm-bench / hyperfine, not here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "onnxruntime", "onnx", "scipy", "sklearn", "matplotlib")
CHILD = f"HEAVY = {HEAVY!r}" + """
import contextlib, io, json, sys
from denoq.compiler.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        status = main(sys.argv[1:])
    except SystemExit as exc:
        status = exc.code
print(json.dumps({"status": status, "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
"""


def _imports(*argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["recipes"], ["compile", "--help"], ["sample", "--help"]])
def test_light_commands_import_no_heavy_library(argv):
    assert _imports(*argv) == {"status": 0, "heavy": []}


def test_inspect_imports_no_heavy_library(tiny_artifact_trt):
    assert _imports("inspect", str(tiny_artifact_trt.path)) == {"status": 0, "heavy": []}
    assert _imports("inspect", str(tiny_artifact_trt.path), "--layers")["heavy"] == []
