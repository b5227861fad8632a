"""Compiling a study's rows and sampling their graphs in ONNX Runtime, in worker processes of one thread each."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from toolkit.study.matrices import Row, parse_sampler

#: At most this many evenly spaced steps of a trajectory are kept for the accumulated error per step.
TRAJECTORY_POINTS = 50
#: A row to sample: its key, its artifact folder and its samplers.
Task = tuple[str, Path, Sequence[str]]


def one_thread() -> None:
    """A worker's initializer: torch on one thread (the workers share the machine's cores)."""
    torch.set_num_threads(1)


def compile_row(row: Row, model: str, out: Path) -> dict[str, Any]:
    """Compile `row` for `model` into `out/artifacts/ROW`; returns what the table reports of its compile:
    calibration seconds and BOPs per image, and per kind of row its timesteps, AccuQuant record, weight error
    and bytes, or the mixed plan's steps per member."""
    from denoq.compiler.api import compile_artifact
    from denoq.compiler.mixed import members
    from denoq.compiler.recipe import load_recipe

    art = compile_artifact(model, load_recipe(row.preset, row.sets), out / "artifacts" / row.name, force=True)
    if "mixed" in art.manifest:
        mixed = art.manifest["mixed"]
        return {"calib_seconds": sum(m.timings["calibration"]["seconds"] for m in members(art).values())
                + art.timings["mixed"]["seconds"], "bops_per_image": mixed["bops_per_image"]["mixed"],
                "steps_per_member": mixed["steps_per_member"]}
    cal = art.manifest["calibration"]
    weights = cal.get("weights", {})
    timed = art.timings["calibration"]
    return {"calib_seconds": timed["seconds"], "memory_peak_mb": timed.get("memory_peak_mb"),
            "timesteps": cal["timesteps"],
            "bops_per_image": art.manifest["cost"]["bops_per_call"] * art.manifest["recipe"]["values"]["calib.steps"],
            "accuquant": cal.get("accuquant"),
            "selection": cal.get("timestep_selection", {}), "search_terms": cal.get("group_search", {}),
            "weight_error_vs_rtn": weights.get("output_error_vs_rtn_median"),
            "weight_seconds": timed.get("weights", {}).get("seconds"),
            "weight_bytes": art.manifest["weights"]["qdq_bytes"],
            "executor": art.manifest["checks"].get("qdq_executor", "onnxruntime"),
            "fp_weight_bytes": art.manifest["weights"]["fp32_bytes"]}


def sample_graph(art_dir: Path, backend: str, sampler: str, seed: int, trajectory: bool = False
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Samples of an artifact's graph (`ort`: the Q/DQ graph, with its PTQD variance calibration when it has one,
    in `onnx.reference` where the artifact's checks ran there (NVFP4); `ort-fp`: the FP graph) in ONNX Runtime,
    one thread; with `trajectory`, x_t at up to TRAJECTORY_POINTS evenly spaced steps, by timestep."""
    from denoq.compiler.artifact import Artifact
    from denoq.compiler.generate import generate

    kind, steps, n, eta = parse_sampler(sampler)
    every = max(1, steps // TRAJECTORY_POINTS)
    states: dict[int, torch.Tensor] = {}

    def keep(step: int, t: torch.Tensor, x_t: torch.Tensor, out: torch.Tensor) -> None:
        if trajectory and step % every == 0:
            states[int(t[0])] = x_t.clone()

    art = Artifact.open(art_dir)
    if backend == "ort" and art.manifest.get("checks", {}).get("qdq_executor") == "onnx.reference":
        backend = "onnx-ref"
    x = generate(art, backend, sampler=kind, steps=steps, eta=eta, seed=seed, n=n, threads=1,
                 callback=keep)
    return x, states


def measure(samplers: Sequence[str], seed: int, trajectory: bool, rows: Sequence[Task], pool: Executor
            ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Sample the FP graph (the first row's artifact's) once per sampler of `samplers` and each row with its Q/DQ
    graph, all from the noise of `seed`, in `pool`. Returns the FP FD-digits per sampler and, per row key, its
    `quality` per sampler (FD-digits, ×FP, FD to FP samples, PSNR vs FP) and, with `trajectory`, its `drift`
    (the accumulated error ‖x_t^q − x_t^fp‖ / ‖x_t^fp‖ per kept step)."""
    from denoq.metrics import fd_between, fd_digits, psnr

    tasks = [(None, s) for s in samplers] + [(key, s) for key, _, ss in rows for s in ss]
    folders = {None: rows[0][1], **{key: folder for key, folder, _ in rows}}
    outs = dict(zip(tasks, tqdm(pool.map(sample_graph, [folders[key] for key, _ in tasks],
                                         ["ort-fp" if key is None else "ort" for key, _ in tasks],
                                         [s for _, s in tasks], [seed] * len(tasks), [trajectory] * len(tasks)),
                                total=len(tasks), desc="sampling (graph, sampler) pairs", unit="pair"),
                    strict=True))
    samples = {k: v[0] for k, v in outs.items()}
    labels = _class_labels(folders[None])
    fp = {s: {"fd_digits": fd_digits(samples[(None, s)]), **_accuracy(samples[(None, s)], labels)}
          for s in samplers}
    measured = {}
    for key, _, ss in rows:
        quality = {}
        for s in ss:
            x = samples[(key, s)]
            fd = fd_digits(x)
            quality[s] = {"fd_digits": fd, "fd_ratio": fd / fp[s]["fd_digits"],
                          "fd_to_fp": fd_between(x, samples[(None, s)]), "psnr_vs_fp": psnr(x, samples[(None, s)]),
                          **_accuracy(x, labels)}
        drift = {}
        for s in ss if trajectory else ():
            fp_states, q_states = outs[(None, s)][1], outs[(key, s)][1]
            ts = sorted(fp_states, reverse=True)
            drift[s] = {"t": ts, "value": [float((q_states[t] - fp_states[t]).norm() / fp_states[t].norm())
                                           for t in ts]}
        measured[key] = {"quality": quality, "drift": drift}
    return fp, measured


def _class_labels(art_dir: Path) -> torch.Tensor | None:
    """The labels `generate` samples a class-conditional artifact with (every class in turn), None otherwise."""
    from denoq.compiler.artifact import Artifact

    model = Artifact.open(art_dir).manifest["model"]
    return None if model.get("cond_input") != "class_labels" else torch.arange(4096) % int(model["num_classes"])


def _accuracy(x: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
    """`class_accuracy` (%) of samples `x` drawn with `labels` (their first len(x)); {} for unconditional models."""
    from denoq.metrics import class_accuracy

    return {} if labels is None else {"class_accuracy": 100 * class_accuracy(x, labels[:len(x)])}
