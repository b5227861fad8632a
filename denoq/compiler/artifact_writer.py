"""Writing an artifact folder atomically (`ArtifactWriter`), and the check of an output path before any work
(`check_output_dir`). The folder's layout and manifest are described in `denoq.compiler.artifact`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from denoq import __version__ as DENOQ_VERSION
from denoq.compiler.artifact import (
    MANIFEST,
    RESERVED_KEYS,
    SCHEMA_VERSION,
    TIMINGS,
    Artifact,
    check_name,
    dump_json,
    library_versions,
    split_timings,
)
from denoq.compiler.files import check_writable, readable, remove_stale_work_dirs, sha256_file
from denoq.errors import DenoqError


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an output path that exists unless `force`, or that cannot be written; callers run this before any
    work.

    Raises DenoqError when `out` exists and `force` is false, when `out` is a file (never replaced), and, even with
    `force`, when `out` is a non-empty folder that is not a denoq artifact (no manifest.json): --force replaces
    artifacts, it does not delete arbitrary folders; and when the folder `out` would be created in is not a
    writable folder (`check_writable`).
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise DenoqError(f"output path {out} exists and is not a folder; choose another --out")
        if not force:
            raise DenoqError(f"output folder {out} exists; pass --force to replace it or choose another --out")
        if not (out / MANIFEST).is_file() and any(out.iterdir()):
            raise DenoqError(f"output folder {out} exists and is not a denoq artifact (no {MANIFEST}); refusing to "
                             "replace it even with --force; delete it yourself or choose another --out")
    check_writable(out)


class ArtifactWriter:
    """Writes an artifact folder atomically. Use as a context manager and call `commit` last:

        with ArtifactWriter(out, force) as w:
            w.write_json("report.json", {...})
            plan.save(w.path("plan.safetensors"))
            w.commit({"recipe": recipe.to_dict(), "plan": ...})

    Files go to a hidden temporary folder beside `out` (`.NAME.tmp-XXXX`, same parent so the final rename is
    atomic). `commit` hashes every file, writes manifest.json last and renames the folder into place; with
    `force` an existing artifact is first renamed aside, then deleted once the new one is in place. An exception
    inside the `with` removes the temporary folder and leaves `out` untouched. Leaving the `with` without an
    exception and without `commit` is a programming error (RuntimeError); nothing is written then either.
    """

    def __init__(self, out: Path, force: bool = False) -> None:
        self.out = Path(out)
        self.force = force
        self._tmp: Path | None = None
        self._committed = False

    def __enter__(self) -> ArtifactWriter:
        check_output_dir(self.out, self.force)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_work_dirs(self.out.parent)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if exc_type is None and not self._committed:
            raise RuntimeError("ArtifactWriter left without commit(); nothing was written")

    @property
    def tmp_dir(self) -> Path:
        """The temporary folder files are written to before commit."""
        if self._tmp is None:
            raise RuntimeError("ArtifactWriter is not open (use it as a context manager, before commit())")
        return self._tmp

    def path(self, name: str) -> Path:
        """Where to write the artifact file `name` (a relative path; its parent folders are created)."""
        p = self.tmp_dir / check_name(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write `data` as the artifact file `name`; returns its (temporary) path."""
        p = self.path(name)
        p.write_bytes(data)
        return p

    def write_json(self, name: str, obj: Any) -> Path:
        """Write `obj` as JSON (sorted keys, indent 2) to the artifact file `name`; returns its (temporary) path."""
        return self.write_bytes(name, dump_json(obj))

    def commit(self, manifest: Mapping[str, Any]) -> Artifact:
        """Hash every file, write manifest.json (`manifest` plus the reserved keys) and move the folder into place.

        `manifest` must be JSON-serializable and may not set RESERVED_KEYS; its timing keys go to timings.json
        (`split_timings`). Returns the committed Artifact.
        """
        tmp = self.tmp_dir
        clash = sorted(set(manifest) & set(RESERVED_KEYS))
        if clash:
            raise ValueError(f"manifest keys {clash} are set by commit() itself")
        manifest, timings = split_timings(manifest)
        files = {}
        for p in sorted(tmp.rglob("*"), key=lambda q: q.relative_to(tmp).as_posix()):
            if p.is_symlink() or (not p.is_file() and not p.is_dir()):
                raise ValueError(f"artifact file {p.relative_to(tmp)} is not a plain file")
            if p.is_file() and p.name != TIMINGS:  # the one file that differs between runs (a mixed one's members')
                files[p.relative_to(tmp).as_posix()] = sha256_file(p)
        if MANIFEST in files:
            raise ValueError(f"{MANIFEST} is written by commit() itself")
        if timings is not None:
            self.write_json(TIMINGS, timings)
        full = {**manifest, "schema_version": SCHEMA_VERSION, "denoq_version": DENOQ_VERSION,
                "versions": library_versions(), "files": files, "derived": []}
        data = dump_json(full)  # serialize before touching anything, so a bad manifest fails early
        with (tmp / MANIFEST).open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        readable(tmp)
        self._move_into_place(tmp)
        self._tmp = None
        self._committed = True
        return Artifact(self.out, json.loads(data))

    def _move_into_place(self, tmp: Path) -> None:
        out = self.out
        check_output_dir(out, self.force)  # again: something may have appeared while we worked
        if not out.exists():
            os.rename(tmp, out)
            return
        aside = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, aside)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(aside, out)
            raise
        shutil.rmtree(aside, ignore_errors=True)
