"""The artifact folder: its manifest, atomic writing and checked reading (docs/architecture.md, Artifact folder).

An artifact is a folder whose `manifest.json` holds

- `schema_version` (this module's SCHEMA_VERSION when written), `denoq_version`, and `versions`: the versions of
  torch, onnx, onnxruntime, diffusers, numpy and tensorrt (null when not installed);
- `files`: `{relative posix path: sha256 hex}` for every file of the folder except manifest.json and timings.json;
- `derived`: the names among `files` that are derived outputs, not the compiled model: what `denoq eval`,
  `validate` and `build` add (reports, pictures, the engine);
- whatever sections the writer adds (the recipe, the plan, …).

The same inputs and seed give the same artifact byte for byte, except `timings.json` (unlisted, unhashed): every
`seconds`, `*_seconds` or `*_peak_mb` (peak memory) key of the manifest the writer hands over goes there instead
(`split_timings`), and no timestamp is stored.

Writing (`denoq.compiler.artifact_writer.ArtifactWriter`) happens in a hidden temporary folder beside the output
(`.NAME.tmp-PID-XXXX`), which is renamed into place only when `commit` has written every file and the manifest
last; an exception leaves the output untouched and no temporary folder behind; a folder left by a process that was
killed is removed by the next writer into the same parent. Reading (`Artifact.open`) checks the schema version
and, unless told not to, the hash of every core file (graphs, plan), and says in one line what does not match and
what to do. A derived file is checked only when it is used (`file`): a missing or changed report never stops sampling.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from denoq.compiler.files import (
    sha256_file,
    stage,
)
from denoq.errors import DenoqError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TIMINGS = "timings.json"
#: Manifest keys the artifact code owns; callers may not set them.
RESERVED_KEYS = ("schema_version", "denoq_version", "versions", "files", "derived")
#: Library → (module name, distribution names to ask importlib.metadata), recorded in `versions`.
_LIBRARIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "torch": ("torch", ("torch",)),
    "onnx": ("onnx", ("onnx",)),
    "onnxruntime": ("onnxruntime", ("onnxruntime", "onnxruntime-gpu")),
    "diffusers": ("diffusers", ("diffusers",)),
    "numpy": ("numpy", ("numpy",)),
    "tensorrt": ("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-cu13")),
}


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries an artifact depends on; None for one that is not installed.

    A library already imported reports its `__version__`; otherwise the installed distribution's version is read
    from its metadata (no import, so this is fast).
    """
    versions: dict[str, str | None] = {}
    for lib, (module, dists) in _LIBRARIES.items():
        version = getattr(sys.modules.get(module), "__version__", None)
        for dist in dists:
            if version is not None:
                break
            with contextlib.suppress(metadata.PackageNotFoundError):
                version = metadata.version(dist)
        versions[lib] = None if version is None else str(version)
    return versions


def dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode()


def check_name(name: str) -> str:
    """A file name inside an artifact: relative, no `..`, not the manifest. Returns its posix form."""
    p = PurePosixPath(str(name).replace(os.sep, "/"))
    if not str(name) or p.is_absolute() or ".." in p.parts or str(p) in ("", "."):
        raise ValueError(f"artifact file name {name!r} must be a relative path inside the artifact")
    if str(p) == MANIFEST:
        raise ValueError(f"{MANIFEST} is written by the artifact code itself; pass its content to commit()")
    return str(p)


def split_timings(obj: Any) -> tuple[Any, Any]:
    """`obj` without its measurement keys (`seconds`, `*_seconds`, `*_peak_mb`, at any depth), and those keys in
    the same tree (None when there are none): what varies between two runs of the same compile."""
    if isinstance(obj, Mapping):
        kept, timed = {}, {}
        for key, value in obj.items():
            if key == "seconds" or str(key).endswith(("_seconds", "_peak_mb")):
                timed[key] = value
                continue
            kept[key], sub = split_timings(value)
            if sub is not None:
                timed[key] = sub
        return kept, timed or None
    if isinstance(obj, list):
        pairs = [split_timings(v) for v in obj]
        subs = [sub for _, sub in pairs]
        return [v for v, _ in pairs], subs if any(sub is not None for sub in subs) else None
    return obj, None


class Artifact:
    """A compiled artifact folder, checked on open. `path`, `manifest` (the parsed manifest.json), `file(name)`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: Path, verify: bool = True) -> Artifact:
        """Read an artifact folder, checking its manifest and schema version and, if `verify`, every file's hash.

        Raises DenoqError, naming the folder or file and the fix, when the folder is missing, has no or an
        unreadable manifest, has a schema version this denoq does not read, or a listed file is missing or
        differs from its recorded sha256.
        """
        path = Path(path)
        if not path.exists():
            raise DenoqError(f"artifact folder {path} does not exist; run denoq compile --out {path} first")
        if not path.is_dir():
            raise DenoqError(f"{path} is not a folder; pass the artifact folder denoq compile wrote")
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise DenoqError(f"{path} is not a denoq artifact (no {MANIFEST}); run denoq compile first")
        try:
            manifest = json.loads(mpath.read_bytes())
        except (ValueError, OSError) as exc:
            raise DenoqError(f"{mpath} cannot be read ({type(exc).__name__}: {exc}); "
                             "recompile with denoq compile") from None
        if not isinstance(manifest, dict):
            raise DenoqError(f"{mpath} is not a JSON object; recompile with denoq compile")
        version = manifest.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise DenoqError(f"{mpath} has no valid schema_version (got {version!r}); it was not written by "
                             "denoq compile; recompile with denoq compile")
        if version > SCHEMA_VERSION:
            raise DenoqError(f"artifact schema {version} is newer than this denoq supports (≤{SCHEMA_VERSION}); "
                             "upgrade denoq")
        if version < SCHEMA_VERSION:
            raise DenoqError(f"artifact schema {version} is older than this denoq supports ({SCHEMA_VERSION}); "
                             "recompile with denoq compile")
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise DenoqError(f"{mpath} has no valid 'files' table; recompile with denoq compile")
        for name in files:
            try:
                check_name(name)
            except ValueError:
                raise DenoqError(f"{mpath} lists an invalid file name {name!r}; recompile with denoq compile") \
                    from None
        art = cls(path, manifest)
        if verify:
            art.verify()
        return art

    @property
    def files(self) -> dict[str, str]:
        """`{relative path: sha256}` of every file the manifest lists."""
        return self.manifest["files"]

    @property
    def timings(self) -> dict[str, Any]:
        """timings.json: the manifest's timing keys (`split_timings`) as the compile wrote them; {} without it."""
        p = self.path / TIMINGS
        try:
            return json.loads(p.read_bytes()) if p.is_file() else {}
        except (ValueError, OSError):
            return {}

    @property
    def derived(self) -> frozenset[str]:
        """Names of the derived files (timings, reports, pictures, the engine): checked only when used."""
        return frozenset(self.manifest.get("derived", ()))

    def verify(self) -> None:
        """Check every core file (not the derived ones) exists and matches its sha256; DenoqError naming the first
        that does not."""
        for name in sorted(set(self.files) - self.derived):
            self._check(name)

    def _check(self, name: str) -> None:
        p = self.path / name
        derived = name in self.derived
        when, fix = (("it was written", "rerun the denoq command that wrote it (eval, validate, build)") if derived
                     else ("compile", "recompile with denoq compile"))
        if not p.is_file():
            raise DenoqError(f"artifact file {p} is missing (listed in {MANIFEST}); {fix}")
        if sha256_file(p) != self.files[name]:
            raise DenoqError(f"artifact file {p} was modified or corrupted after {when} (sha256 mismatch); {fix}")

    def stale(self) -> list[str]:
        """The derived files that are missing or no longer match their recorded hash."""
        return [name for name in sorted(self.derived & set(self.files))
                if not (self.path / name).is_file() or sha256_file(self.path / name) != self.files[name]]

    def has(self, name: str) -> bool:
        """True when the manifest lists the file `name`."""
        return name in self.files

    def file(self, name: str) -> Path:
        """The path of the listed artifact file `name`, a derived one checked against its hash first; DenoqError
        when the artifact has no such file or a derived one is missing or changed."""
        if name not in self.files:
            raise DenoqError(f"artifact {self.path} has no file {name!r} (it has: {', '.join(sorted(self.files))}); "
                             "recompile with denoq compile")
        if name in self.derived:
            self._check(name)
        return self.path / name

    def add_files(self, files: Mapping[str, bytes], manifest_updates: Mapping[str, Any] | None = None) -> None:
        """Add or replace derived files of this artifact (e.g. `denoq eval`'s report.json; a name written here is
        derived from then on) and update the manifest, all or nothing.

        Every file and the new manifest (hashes merged into `files`, names into `derived`, `manifest_updates`
        merged shallowly: top-level keys replaced, RESERVED_KEYS refused) are first written to hidden temporary
        files and flushed; a failure there (a full disk) removes them and leaves the artifact as it was. Only then
        are they renamed into place, the manifest last. A process killed during those renames can leave a derived
        file the manifest does not describe yet: `stale` lists it, and it never blocks the core files.
        """
        updates = dict(manifest_updates or {})
        clash = sorted(set(updates) & set(RESERVED_KEYS))
        if clash:
            raise ValueError(f"manifest keys {clash} are managed by the artifact code")
        names = {check_name(name): bytes(data) for name, data in files.items()}
        manifest = {**self.manifest, **updates, "files": dict(self.files),
                    "derived": sorted(self.derived | set(names))}
        dump_json(manifest)  # fail on unserializable updates before writing anything
        staged: list[tuple[Path, Path]] = []
        try:
            for name, data in sorted(names.items()):
                staged.append((stage(self.path / name, data), self.path / name))
                manifest["files"][name] = hashlib.sha256(data).hexdigest()
            new_manifest = dump_json(manifest)
            staged.append((stage(self.path / MANIFEST, new_manifest), self.path / MANIFEST))
        except BaseException:
            for tmp, _ in staged:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        for tmp, target in staged:
            os.replace(tmp, target)
        self.manifest = json.loads(new_manifest)
