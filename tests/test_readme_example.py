"""The README's Python example runs as written, on a tiny pipeline folder in place of `my-pipeline`."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tiny_pipeline, tmp_path, monkeypatch):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "denoq.quantize(" in b]
    assert len(blocks) == 1 and "denoq.load(" in blocks[0]
    code = blocks[0].replace('"my-pipeline"', repr(str(tiny_pipeline)))
    monkeypatch.chdir(tmp_path)  # the example writes its artifact to ./art
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert (tmp_path / "art" / "manifest.json").is_file()
    assert len(scope["images"]) == 4 and type(scope["pipe"].unet).__name__ == "QuantizedDenoiser"
