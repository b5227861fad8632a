"""The documentation: docs/recipes.md is what tools/recipes_doc.py renders from the recipe definitions, and every
relative link of README.md and docs/*.md points to a file that exists."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: `[text](target)` and `![alt](target "title")`; the target ends at the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _recipes_doc():
    spec = importlib.util.spec_from_file_location("denoq_tools_recipes_doc", ROOT / "tools" / "recipes_doc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def relative_links(text: str) -> list[str]:
    """The link targets of a markdown text outside code, without web addresses and in-page anchors."""
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        targets.append(unquote(target.split("#", 1)[0]))
    return targets


def test_recipes_doc_is_up_to_date():
    committed = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert committed == _recipes_doc().render(), (
        "docs/recipes.md differs from the recipe definitions; run `python tools/recipes_doc.py --write`")


def test_recipes_doc_lists_every_preset_and_key():
    from denoq.compiler.recipe import RECIPE_KEYS, RECIPES

    text = _recipes_doc().render()
    for name in RECIPES:
        assert f"| `{name}` |" in text
    for key in RECIPE_KEYS:
        assert f"| `{key}` |" in text


def test_link_parser():
    text = ("[a](docs/x.md) ![p](pic.png \"title\") [w](https://example.org) [s](#top) [f](y.md#part)\n"
            "`[not](code.md)`\n```\n[not](fenced.md)\n```\n")
    assert relative_links(text) == ["docs/x.md", "pic.png", "y.md"]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_point_to_existing_files(page: Path):
    missing = [t for t in relative_links(page.read_text(encoding="utf-8")) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"
