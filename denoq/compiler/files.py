"""The file-system side of writing outputs: sha256, atomic writes, writable-place checks and the work folders an
interrupted writer leaves (used by `denoq.compiler.artifact` and the CLI's output files)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from denoq.errors import DenoqError

#: Hidden work folders of ArtifactWriter: `.NAME.tmp-PID-XXXX` (being written) and `.NAME.old-PID-XXXX` (replaced).
WORK_DIR = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-[^.]+$")
_CHUNK = 1 << 20
log = logging.getLogger(__name__)


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the permissions a plain `open`/`mkdir` would: mkstemp and
    mkdtemp make private files, but an artifact is read by other users too (a deployment step, a server)."""
    mask = _umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def stage(path: Path, data: bytes) -> Path:
    """Write `data` to a hidden temporary file beside `path` (flushed to disk) and return it; nothing is left
    behind when that fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        readable(Path(tmp))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and os.replace (readers never see a
    partial file)."""
    os.replace(stage(path, data), path)


def remove_stale_work_dirs(parent: Path) -> list[Path]:
    """Remove the work folders an ArtifactWriter left in `parent` when its process was killed (SIGKILL, power
    loss); the folders of live processes stay. Returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for p in sorted(parent.iterdir()):
            match = WORK_DIR.match(p.name)
            if match is None or not p.is_dir() or p.is_symlink() or _alive(int(match.group(1))):
                continue
            shutil.rmtree(p, ignore_errors=True)
            log.warning("removed %s, left by an interrupted denoq run (process %s is gone)", p, match.group(1))
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def check_writable(path: Path, fix: str = "choose a writable --out") -> None:
    """Refuse a path that cannot be written, before any work: its nearest existing ancestor must be a folder that
    takes new entries. Tried for real (a temporary folder is made there and removed), because `os.access` says yes
    to root even on a read-only file system.

    Raises DenoqError naming `path`, that ancestor and the OS error, then `fix`, when the ancestor is not a folder
    (e.g. `--out somefile/art`) or creating in it fails (EACCES, EROFS, ENOSPC, …).
    """
    path = Path(path).absolute()
    folder = path.parent
    while not (folder.exists() or folder.is_symlink()) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise DenoqError(f"cannot write {path}: {folder} is not a folder; {fix}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".denoq-write-check-", dir=folder))
    except OSError as exc:
        raise DenoqError(f"cannot write {path}: creating a file in {folder} fails ({exc.strerror or exc}); "
                         f"{fix}") from None
