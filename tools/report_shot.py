"""Screenshots of a report.html (or any self-contained page) in headless Chromium, and a layout check.

    python tools/report_shot.py ART/report.html --out /tmp/report.png [--width 1000]

Needs Chromium (Debian: `apt-get install -y chromium`, at /usr/bin/chromium; or `chromium` / `google-chrome` on
PATH). First it measures the page at the given width: a copy of it with a small measuring script appended is loaded
with `--dump-dom`, and the script writes the page's height, its scroll width and every element whose right edge
lies beyond the viewport or whose content is wider than its box into the dumped DOM (the report itself has no
script). Then it takes the screenshot at that width and height; a page taller than `--max-height` is taken in
several shots (OUT-1.png, OUT-2.png, …), each a copy of the page shifted up. Prints the measurement as JSON; exit
status 1 when something overflows the width.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--force-device-scale-factor=1")
MEASURE_ID = "denoq-report-shot-measure"
# Appended to the measured copy only: page size and the elements sticking out of the viewport, as JSON in a <pre>.
MEASURE_SCRIPT = """<script>
window.addEventListener("load", function () {
  var w = document.documentElement.clientWidth, over = [];
  document.querySelectorAll("body *").forEach(function (el) {
    var r = el.getBoundingClientRect(), spill = el.scrollWidth - el.clientWidth;
    if (r.width > 0 && (r.right > w + 1 || r.left < -1 || (el.clientWidth > 0 && spill > 1)))
      over.push(el.tagName.toLowerCase() + (el.className ? "." + el.className : "") + " right=" + Math.round(r.right)
                + (spill > 1 ? " content " + spill + "px wider" : ""));
  });
  var out = {viewport: w, scroll_width: document.documentElement.scrollWidth,
             height: Math.ceil(document.documentElement.scrollHeight), overflow: over.slice(0, 20),
             overflow_count: over.length};
  var pre = document.createElement("pre"); pre.id = "%s"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>""" % MEASURE_ID  # noqa: UP031 (braces of the script)


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable: /usr/bin/chromium, else the first of CHROMIUM_NAMES on PATH."""
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(chromium: str, args: list[str], width: int, height: int, timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="report-shot-profile-") as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _copy_with(page: Path, extra: str, folder: Path, name: str) -> Path:
    """A copy of `page` in `folder` with `extra` inserted before </body> (at the end when there is none)."""
    text = page.read_text(encoding="utf-8")
    i = text.rfind("</body>")
    text = text + extra if i < 0 else text[:i] + extra + text[i:]
    out = folder / name
    out.write_text(text, encoding="utf-8")
    return out


def measure(page: Path, width: int = 1000, chromium: str | None = None, timeout: float = 120) -> dict:
    """The page laid out `width` pixels wide: `viewport`, `scroll_width`, `height` and `overflow` (up to 20
    elements whose box lies outside the viewport, `overflow_count` in all)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="report-shot-") as tmp:
        copy = _copy_with(Path(page), MEASURE_SCRIPT, Path(tmp), "measure.html")
        res = _run(chromium, ["--dump-dom", copy.as_uri()], width, 800, timeout)
    found = re.search(rf'<pre id="{MEASURE_ID}">(.*?)</pre>', res.stdout, re.S)
    if found is None:
        raise RuntimeError(f"chromium did not lay out {page} (exit {res.returncode}): {res.stderr[-2000:]}")
    return json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))


def screenshot(page: Path, out: Path, width: int = 1000, height: int | None = None, max_height: int = 8000,
               chromium: str | None = None, timeout: float = 120) -> list[Path]:
    """PNG screenshots of `page` at `width`: one of the page's full height (measured when `height` is None), or
    several of at most `max_height` pixels each (OUT-1.png, …). Returns their paths."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium found: apt-get install -y chromium")
    page, out = Path(page).resolve(), Path(out)
    height = height or measure(page, width, chromium, timeout)["height"]
    n = max(1, -(-height // max_height))
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="report-shot-") as tmp:
        for i, path in enumerate(paths):
            h = min(max_height, height - i * max_height)
            shifted = page if i == 0 else _copy_with(
                page, f"<style>body{{position:relative;top:-{i * max_height}px}}</style>", Path(tmp), f"{i}.html")
            res = _run(chromium, [f"--screenshot={path.resolve()}", shifted.as_uri()], width, h, timeout)
            if not path.is_file():
                raise RuntimeError(f"chromium wrote no screenshot {path} (exit {res.returncode}): {res.stderr[-2000:]}")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", type=Path, help="the HTML page, e.g. ART/report.html")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--width", type=int, default=1000, help="viewport width in pixels (default 1000)")
    ap.add_argument("--max-height", type=int, default=8000, help="the tallest single shot (default 8000)")
    args = ap.parse_args(argv)
    if not args.page.is_file():
        print(f"report_shot: no such page {args.page}", file=sys.stderr)
        return 2
    try:
        info = measure(args.page, args.width)
        info["shots"] = [str(p) for p in screenshot(args.page, args.out, args.width, info["height"],
                                                    args.max_height)]
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"report_shot: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 1 if info["overflow_count"] or info["scroll_width"] > info["viewport"] else 0


if __name__ == "__main__":
    sys.exit(main())
