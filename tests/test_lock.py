"""constraints.txt locks the whole tested dependency set: every distribution denoq (with its dev extra) pulls in,
transitively, is pinned there, and the environment the tests run in has exactly the pinned version."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

LOCK = Path(__file__).resolve().parents[1] / "constraints.txt"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[_canonical(name)] = version
    return pins


def _installed_closure(extras: set[str]) -> dict[str, str]:
    """Every installed distribution denoq's requirements (with `extras`) reach, with its version."""
    seen: dict[str, str] = {}
    todo = [(Requirement(r), extras) for r in metadata.requires("denoq") or []]
    while todo:
        req, wanted = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in wanted | {""}):
            continue
        name = _canonical(req.name)
        if name in seen:
            continue
        dist = metadata.distribution(req.name)
        seen[name] = dist.version
        todo += [(Requirement(r), set(req.extras)) for r in dist.requires or []]
    return seen


def test_every_dependency_is_pinned_and_installed_as_pinned():
    pins = _pins()
    installed = _installed_closure({"dev"})
    assert {"torch", "onnxruntime", "onnx", "onnx-ir", "diffusers", "numpy", "polygraphy"} <= set(installed)
    missing = sorted(set(installed) - set(pins))
    assert not missing, f"not in constraints.txt (run make lock): {missing}"
    differ = {n: (v, pins[n]) for n, v in installed.items() if v.split("+")[0] != pins[n]}
    assert not differ, f"installed ≠ locked (installed, locked): {differ}"
