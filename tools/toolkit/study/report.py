"""A study's files: writing `study.json`, `study.png` (PSNR vs the swept parameter, or the accumulated error per
step) and the markdown table on stdout; reading earlier `study.json` files back (`read_studies`, `relabelled`)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from toolkit.common import Column, column_table
from toolkit.study.matrices import MATRICES


def drift_png(results: Sequence[dict[str, Any]], samplers: Sequence[str], title: str) -> bytes:
    """The accumulated error per step, ‖x_t^q − x_t^fp‖ / ‖x_t^fp‖ from the same noise, one line per row and one
    panel per sampler (x axis: timestep, descending as sampling runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from denoq.figures import figure_png

    fig, axes = plt.subplots(1, len(samplers), figsize=(5.5 * len(samplers), 4.0), squeeze=False)
    for ax, s in zip(axes[0], samplers, strict=True):
        for r in results:
            d = r.get("drift", {}).get(s)
            if d:
                ax.semilogy(d["t"], d["value"], label=r["series"])
        ax.invert_xaxis()
        ax.set_xlabel("timestep t")
        ax.set_ylabel("‖x_t^q − x_t^fp‖ / ‖x_t^fp‖")
        ax.set_title(s, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return figure_png(fig)


def study_png(results: Sequence[dict[str, Any]], sampler: str, xlabel: str, title: str,
              x_of: Callable[[dict[str, Any]], float] | None = None) -> bytes:
    """PSNR vs FP with `sampler` against each row's x (log 2 axis, 0 drawn at 1), one line per series; with
    `x_of`, against `x_of(row)` on a linear axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from denoq.figures import figure_png

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # more series than the default cycle's ten colours
    series: dict[str, list[tuple[int, float]]] = {}
    for r in results:
        q = r["quality"].get(sampler)
        if q is not None:
            series.setdefault(r["series"], []).append((r["x"] if x_of is None else x_of(r), q["psnr_vs_fp"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([max(x, 1) for x, _ in pts], [p for _, p in pts], marker="o", label=label)
    if x_of is None:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("PSNR vs FP (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if x_of is None:
        ax.legend(fontsize=7)
    else:  # scattered points: the legend beside the axes, where it hides none of them
        fig.set_size_inches(9.0, 4.0)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
    return figure_png(fig)


def _quality_cell(sampler: str) -> Column:
    def cell(r: dict[str, Any]) -> str:
        q = r["quality"].get(sampler)
        if q is None:
            return "—"
        return (f"{q['fd_digits']:.2f} (×{q['fd_ratio']:.3f}) · {q['fd_to_fp']:.2f} · {q['psnr_vs_fp']:.2f} dB"
                + (f" · {q['class_accuracy']:.1f}%" if "class_accuracy" in q else ""))
    return Column(f"{sampler}: FD (×FP) · FD to FP · PSNR [· class accuracy]", cell)


def _label_column(index: int, name: str) -> Column:
    return Column(name, lambda r: r["labels"][index][1])


def study_table(matrix: str, results: Sequence[dict[str, Any]], fp: dict[str, Any], samplers: Sequence[str]) -> str:
    """The FP line and the table: the first row's label columns, one column per sampler, the matrix's own columns
    and the calibration seconds."""
    columns = [_label_column(i, name) for i, (name, _) in enumerate(results[0]["labels"])]
    columns += [_quality_cell(s) for s in samplers]
    columns += [*MATRICES[matrix].columns, Column("calib s", lambda r: f"{r['calib_seconds']:.1f}")]
    def fp_text(s: str) -> str:
        accuracy = fp[s].get("class_accuracy")
        return f"{s} FD-digits {fp[s]['fd_digits']:.2f}" + ("" if accuracy is None else
                                                          f", class accuracy {accuracy:.1f}%")

    return ("FP: " + ", ".join(fp_text(s) for s in samplers) + "\n"
            + column_table(columns, results))


def write_report(out: Path, settings: dict[str, Any], fp: dict[str, Any], results: Sequence[dict[str, Any]],
                 seconds: float) -> None:
    """OUT/study.json (`fp`, `rows`, `seconds`, `settings`), OUT/study.png and the table on stdout; `settings` has
    at least the study's `matrix`, `model` and `samplers`."""
    matrix, model, samplers = settings["matrix"], settings["model"], settings["samplers"]
    report = {"fp": fp, "rows": list(results), "seconds": seconds, "settings": settings}
    (out / "study.json").write_text(json.dumps(report, indent=2) + "\n")
    m = MATRICES[matrix]
    if m.trajectory:
        png = drift_png(results, samplers, f"{model}: accumulated error per step, quantized vs FP from the same "
                                           "noise (ORT)")
    else:
        png = study_png(results, samplers[0], m.xlabel, f"{model}: {matrix} study, Q/DQ graphs, {samplers[0]}",
                        m.x_of)
    (out / "study.png").write_bytes(png)
    print(study_table(matrix, results, fp, samplers))
    print(f"(wrote {out / 'study.json'} and {out / 'study.png'} in {seconds} s)", file=sys.stderr)


def read_studies(matrix: str, paths: Sequence[Path], command: str) -> list[tuple[Path, dict[str, Any]]]:
    """The earlier study.json files of `paths`, each with its path; SystemExit (naming `command`) for a missing
    file or a study of another matrix."""
    studies = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"{command} {path}: no such study.json; give the study.json files an earlier run wrote")
        study = json.loads(path.read_text())
        if study["settings"]["matrix"] != matrix:
            raise SystemExit(f"{command} {path}: a {study['settings']['matrix']} study; give studies of --matrix "
                             f"{matrix}")
        studies.append((path, study))
    return studies


def relabelled(only: str, studies: Sequence[tuple[Path, dict[str, Any]]], command: str
               ) -> list[tuple[dict[str, Any], Path]]:
    """The studies' rows whose `FOLDER/ROW` matches the regular expression `only`, each labelled with its study's
    folder (series `FOLDER: …`, a leading `study` label), with that folder; SystemExit when none matches."""
    rows = []
    for path, study in studies:
        name = path.parent.name
        rows += [({**r, "series": f"{name}: {r['series']}",
                   "labels": [("study", name), *(tuple(label) for label in r["labels"])]}, path.parent)
                 for r in study["rows"] if re.search(only, f"{name}/{r['name']}")]
    if not rows:
        raise SystemExit(f"{command}: no row matches --only {only!r}")
    return rows
