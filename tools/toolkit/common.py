"""What the bench and the study share: progress lines on stderr, markdown tables of columns, child runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: When this process imported the toolkit: the zero of `log`'s clock and of `elapsed`.
START = time.perf_counter()


def elapsed() -> float:
    """Seconds since START."""
    return time.perf_counter() - START


def log(msg: str, tag: str = "bench") -> None:
    """A progress line on stderr: `[TAG  seconds since START] msg`."""
    print(f"[{tag} {elapsed():7.1f}s] {msg}", file=sys.stderr, flush=True)


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub markdown table: the header, its `|---|` line, one line per row (no trailing newline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(v: float | None, spec: str = ".2f") -> str:
    """`v` formatted with `spec`; `–` for None."""
    return "–" if v is None else format(v, spec)


@dataclass(frozen=True)
class Column:
    """One column of a table: its header and the cell it shows for an item (a row's data)."""

    header: str
    cell: Callable[[Any], str]


def column_table(columns: Sequence[Column], items: Iterable[Any]) -> str:
    """`md_table` with one row per item, each cell computed by its column."""
    return md_table([c.header for c in columns], [[c.cell(item) for c in columns] for item in items])


def records_table(records: Sequence[dict[str, Any]]) -> str:
    """`md_table` of dict rows: one column per key in order of first appearance, `–` where a row has none."""
    header = list(dict.fromkeys(k for r in records for k in r))
    return md_table(header, [[str(r[k]) if k in r else "–" for k in header] for r in records])


def run_child(cmd: Sequence[str], ok: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Run a benchmark's child process: the JSON object on the last line of its stdout when it exits with one of
    the `ok` statuses, else {"error": its exit status and the last line of its stderr}."""
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if done.returncode in ok:
        return json.loads(done.stdout.strip().splitlines()[-1])
    tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return {"error": f"exit {done.returncode}: {tail[:200]}"}
