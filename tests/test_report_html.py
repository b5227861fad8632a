"""report.html: a readable, self-contained page (tables, formatted numbers, explained metrics, captioned pictures),
eval's labelled progress bars, and, where Chromium is installed, a screenshot that is not blank and does not
overflow the width (tools/report_shot.py)."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageStat

import denoq.sampling.loop
from denoq.compiler.artifact import Artifact
from denoq.compiler.evaluate import EvalSettings, evaluate
from denoq.compiler.html_parts import num, si
from denoq.compiler.report_html import render_html
from denoq.compiler.report_words import QUALITY

TOOLS = Path(__file__).resolve().parents[1] / "tools"
WIDTH = 1000


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"denoq_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def evaluated(tiny_artifact_trt, tmp_path_factory):
    """The tiny artifact evaluated at the smallest settings; the labels its progress bars got."""
    path = shutil.copytree(tiny_artifact_trt.path, tmp_path_factory.mktemp("report") / "art")
    labels = []
    real = denoq.sampling.loop.bar

    def recording(*args, **kwargs):
        labels.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    denoq.sampling.loop.bar = recording
    try:
        art = Artifact.open(path)
        report = evaluate(art, EvalSettings(n=4, steps=2, threads=1))
    finally:
        denoq.sampling.loop.bar = real
    pictures = {name: (path / name).read_bytes() for name in report["pictures"]}
    return Artifact.open(path), report, pictures, labels


def _text(page: str) -> str:
    """The page without its inlined pictures (base64 is digits and letters), tags and entities."""
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    page = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    return re.sub(r"<[^>]+>", " ", page)


def _quality_rows(page: str) -> list[str]:
    table = re.search(r"<table class='quality'>(.*?)</table>", page, re.S)
    assert table is not None, "no quality table"
    return re.findall(r"<tr>(?!<th)(.*?)</tr>", table.group(1), re.S)


def test_eval_labels_its_two_progress_bars(evaluated):
    assert evaluated[3] == ["FP (ort-fp) ddim 2", "quantized (ort) ddim 2"]


def test_the_page_is_readable_and_self_contained(evaluated):
    art, report, pictures, _ = evaluated
    page = (art.path / "report.html").read_text()
    text = _text(page)
    m = art.manifest
    # self-contained: no script, nothing fetched, every picture inlined once with a caption
    assert "<script" not in page.lower() and not re.search(r"""(src|href)=['"]?(https?:)?//""", page)
    assert page.count("data:image/png;base64,") == len(pictures) == len(report["pictures"])
    assert page.count("<figcaption>") == len(pictures)
    # the header
    for label in ("model", "recipe", "target", "backend", "sampler", "samples", "seed", "CPU", "denoq"):
        assert f"<dt>{label}</dt>" in page
    for value in (m["recipe"]["name"], m["plan"]["target"], m["cpu"]["model"], m["cpu"]["isa"], m["denoq_version"],
                  "ddim, 2 steps"):
        assert value in text, value
    # sections as tables, none as raw JSON
    for section in ("quality", "runs", "latency", "fusion", "layers", "calibration", "checks"):
        assert f"id='{section}'" in page, section
    assert page.count("<table") >= 7
    assert "<pre" not in page and '{"' not in text and json.dumps(report["fusion"], sort_keys=True)[:40] not in page
    assert "QLinearConv" in text or "MatMulIntegerToFloat" in text
    assert f"{report['fusion']['fused']} of {report['fusion']['layers']}" in text
    # numbers formatted: BOPs with an SI prefix, no long digit strings, no raw report keys
    assert report["bops_per_image"] > 1e9 and f">{si(report['bops_per_image'])}<" in page
    assert not re.search(r"\d{7,}", text)
    assert "fd_digits" not in text and "psnr_vs_fp" not in text
    # every metric has its human name, a unit column and an explanation
    rows = _quality_rows(page)
    names = [name for key, _, name, _, _ in QUALITY if key in report]
    assert len(rows) == len(names) >= 5
    for row, name in zip(rows, names, strict=True):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        assert cells[0] == name and len(cells) == 5 and len(cells[4]) > 40, row
    # the compile's parity gate and TensorRT rule count
    assert "Parity gate" in text and "TensorRT rules" in text and "no violations" in text


def test_nan_inf_and_missing_values_show_a_dash(evaluated):
    art, report, pictures, _ = evaluated
    bad = copy.deepcopy(report)
    bad["psnr_vs_fp"], bad["fd_to_fp"], bad["fd_ratio"] = float("nan"), float("inf"), "nan"  # "nan": report.json
    for run in bad["runs"].values():
        run["psnr_vs_fp"] = float("-inf")
    page = render_html(art, bad, pictures)
    text = _text(page)
    assert not re.search(r"\b(nan|NaN|inf|Infinity|None)\b", text)
    rows = {re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)[0]: r for r in _quality_rows(page)}
    for name in ("PSNR vs FP", "FD to FP", "FD ratio"):
        assert "<td class='num'>—</td>" in rows[name], rows[name]
    assert num(None) == num(float("nan")) == num("inf") == num(True) == "—"
    assert si(212126924800) == "212.1 G" and si(float("nan")) == "—" and si(512) == "512"
    assert num(2182.367) == "2182" and num(123456.7) == "123,457" and num(0.00001234) == "1.23e-05"


def test_screenshot_is_not_blank_and_fits_the_width(evaluated, tmp_path):
    shot = _load_tool("report_shot")
    chromium = shot.find_chromium()
    if chromium is None:
        pytest.skip("no Chromium to screenshot report.html: install Debian's package `chromium` "
                    "(apt-get install -y chromium, /usr/bin/chromium)")
    page = evaluated[0].path / "report.html"
    info = shot.measure(page, WIDTH, chromium)
    assert info["overflow_count"] == 0 and info["scroll_width"] <= info["viewport"] == WIDTH, info
    assert info["height"] > 2000  # the tables and pictures are laid out, not an error page
    narrow = shot.measure(page, 760, chromium)
    assert narrow["overflow_count"] == 0 and narrow["scroll_width"] <= narrow["viewport"], narrow
    paths = shot.screenshot(page, tmp_path / "shot.png", WIDTH, info["height"], max_height=4000, chromium=chromium)
    assert len(paths) == -(-info["height"] // 4000)
    first = Image.open(paths[0]).convert("L")
    assert first.size == (WIDTH, 4000)
    stat = ImageStat.Stat(first)
    assert stat.stddev[0] > 20 and len(first.getcolors(256 * 256) or range(257)) > 16  # text and pictures drawn
    # the body is centred and narrower than the viewport: its right margin is background on every shot
    for path in paths:
        img = Image.open(path).convert("L")
        margin = img.crop((img.width - 12, 0, img.width, img.height))
        assert margin.getextrema()[0] >= 250, f"{path}: something is drawn in the right-hand margin"
