"""Small pieces of HTML for the report page: numbers formatted for people (significant digits, SI prefixes, "—"
for a missing, nan or infinite value), escaped text, table rows and verdicts."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from typing import Any

DASH = "—"
SI_PREFIXES = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def finite(v: Any) -> float | None:
    """`v` as a finite float; None for None, nan, ±inf (also their JSON spellings "nan", "inf") and non-numbers."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None
    if not isinstance(v, int | float):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def num(v: Any, digits: int = 4) -> str:
    """A number with `digits` significant digits (large ones whole and thousands-separated, those below 1e-4 in
    e-notation); "—" for a
    missing, nan or infinite value."""
    f = finite(v)
    if f is None:
        return DASH
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    a = abs(f)
    if a == 0:
        return "0"
    if a >= 10 ** digits:
        return f"{f:,.0f}"
    if a < 1e-4:
        return f"{f:.{max(digits - 2, 1)}e}"
    return f"{f:.{digits}g}"


def si(v: Any, unit: str = "") -> str:
    """`v` with an SI prefix: 212126924800 → "212.1 G" (+ unit); "—" for a missing, nan or infinite value."""
    f = finite(v)
    if f is None:
        return DASH
    for scale, prefix in SI_PREFIXES:
        if abs(f) >= scale:
            return f"{f / scale:.1f} {prefix}{unit}"
    return f"{f:.4g} {unit}".rstrip()


def pct(v: Any) -> str:
    f = finite(v)
    return DASH if f is None else f"{100 * f:.1f}"


def esc(v: Any) -> str:
    return html.escape(str(v))


def row(cells: Iterable[str], cls: str = "") -> str:
    return f"<tr{f' class={cls!r}' if cls else ''}>" + "".join(cells) + "</tr>"


def td(text: str, cls: str = "") -> str:
    """A cell of already escaped or formatted `text`."""
    return f"<td class='{cls}'>{text}</td>" if cls else f"<td>{text}</td>"


def table(head: Iterable[tuple[str, str]], rows: Iterable[str], cls: str = "") -> str:
    """A table with header cells `(text, class)` and prepared `<tr>` rows."""
    ths = "".join(f"<th class='{c}'>{esc(h)}</th>" if c else f"<th>{esc(h)}</th>" for h, c in head)
    return f"<table{f' class={cls!r}' if cls else ''}><tr>{ths}</tr>{''.join(rows)}</table>"


def kv(rows: Iterable[tuple[str, str]]) -> str:
    """A two-column table of (label, prepared value)."""
    return "<table class='kv'>" + "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def verdict(ok: bool, yes: str = "passed", no: str = "FAILED") -> str:
    return f"<span class='ok'>✓ {yes}</span>" if ok else f"<span class='bad'>✗ {no}</span>"
