"""Write a folder that ships inside the package: all at once (temporary folder, then a rename), readable by all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def ship_folder(out: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary folder beside `out`, which then replaces `out`; nothing half-written is left.

    `mkdtemp` and some writers create private files; shipped files must be readable by every user of the install.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
