"""Quality studies over recipe variants, measured side by side in one run: each variant is compiled, its Q/DQ
graph samples in ONNX Runtime from the same noise as the FP graph, and FD-digits / PSNR vs FP are reported with
the calibration time.

Commands:

- `run --matrix NAME`: compile and measure the rows of a matrix;
- `merge STUDY_JSON...`: run nothing: the rows of earlier studies of one matrix, measured with the same
  `--samplers` and `--seed`, in one table and plot, each row labelled by its study's folder (`--only` matches
  `FOLDER/ROW`);
- `resample STUDY_JSON...`: compile nothing: the artifacts of earlier studies' rows sampled again with
  `--samplers` and `--seed` (more samples, other noise) beside the FP graph sampled once, labelled and picked as
  by `merge`.

Matrices (`--matrix`; the rows of each are defined in `toolkit/study/matrices.py`):

- `timegroups` (ADP-DM timestep groups): `w8a8` (TensorRT profile) on one calibration budget for every row,
  `calib.samples` trajectories of `--pool` DDIM steps of which `--k` steps calibrate, chosen by
  `activations.calib_timesteps`. Rows: A8 with G ∈ `--groups` × rule ∈ `--strategies` (exact DP partition); A8,
  uniform steps, ADP-DM's differentiable search, G ∈ `--search-groups`; A6 and A4 (`--low-bits`, int4 / clipped
  int8 Q/DQ that ORT runs unfused; TensorRT takes 8-bit activations only), uniform, G ∈ `--low-bit-groups`.
- `ptqd`: per sampler and step count of `--samplers`, W8A8 and W4A8 without correction, with PTQD's bias
  correction only, with bias + k (the head), with head + variance schedule calibration, and step-aware mixed
  precision W4A8/W8A8 with the full stack (statistics on that sampler's trajectories); BOPs per image reported.
- `accuquant`: per sampler and step count of `--samplers`, W8A8 and W4A8 with RTN weights, per-step
  reconstruction of the learned quantizers (AdaRound + LSQ) and AccuQuant windows `--windows` with each objective
  of `--objectives` and gradient of `--gradients` (`--iters` iterations each; with `--perstep-iters` k also each
  window fine-tuning after k per-step iterations); study.png is the accumulated error ‖x_t^q − x_t^fp‖ / ‖x_t^fp‖
  per step of every row.
- `weights` (OBQ / GPTQ): W8A8 RTN and GPTQ per channel; W4A8 and W4A16 with RTN and GPTQ at every group size
  of `--group-sizes` (0 = per output channel), GPTQ per channel in parallel mode (Hessians from the FP model
  only), and OBQ at `--obq-group-sizes`. Also reported: the median over layers of each layer's output error
  relative to RTN on FP inputs, and the weight bytes on disk vs FP32.

Rows run in `--jobs` worker processes with one thread each (calibration times are therefore measured under that
load). Every row is evaluated with the first sampler of `--samplers`, the rows a matrix marks as main with all of
them. Samplers are `ddim50:512` (DDIM, 50 steps, 512 samples, η = 0), `ddim50:512:1` (η = 1) or `ddpm1000:128`.
Output: the markdown table on stdout, everything in `OUT/study.json`, the plot in `OUT/study.png`.

    OMP_NUM_THREADS=1 python tools/study.py run --matrix timegroups --out /tmp/study 2>&1 | tee /tmp/study.log
    OMP_NUM_THREADS=1 python tools/study.py run --matrix weights --model /tmp/digits-b --out /tmp/wstudy
    OMP_NUM_THREADS=1 python tools/study.py run --matrix ptqd --samplers ddim50:256,ddim50:256:1,ddpm1000:128 \\
        --out /tmp/p
    OMP_NUM_THREADS=1 python tools/study.py run --matrix accuquant --samplers ddim50:256,ddpm1000:128 --out /tmp/aq
    python tools/study.py merge /tmp/aq_a/study.json /tmp/aq_b/study.json --matrix accuquant \\
        --samplers ddim50:256 --out /tmp/aq_ab
    OMP_NUM_THREADS=1 python tools/study.py resample /tmp/aq_a/study.json /tmp/aq_b/study.json \\
        --matrix accuquant --samplers ddpm1000:512 --seed 7 --out /tmp/aq_512

The earlier form, options only (`study.py --matrix … [--merge|--resample STUDY_JSON…]`), is still accepted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))  # the toolkit package beside this script

from toolkit.study.matrices import MATRICES, MatrixOptions, Row, add_arguments, parse_sampler  # noqa: E402
from toolkit.study.measure import compile_row, measure, one_thread  # noqa: E402
from toolkit.study.report import read_studies, relabelled, write_report  # noqa: E402

COMMANDS = ("run", "merge", "resample")


def parser() -> argparse.ArgumentParser:
    """The command line: `run`, `merge` and `resample`, each with its options (`--help` of each lists them)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--matrix", choices=sorted(MATRICES), required=True, help="the study's matrix")
    common.add_argument("--out", type=Path, required=True, help="folder for study.json, study.png (and artifacts)")
    common.add_argument("--samplers", type=lambda s: s.split(","), default=MatrixOptions().samplers,
                        help="comma-separated samplers, the first evaluating every row (default: "
                             "ddim50:512,ddpm1000:128)")
    common.add_argument("--seed", type=int, default=0, help="the sampling noise's seed (default: 0)")
    common.add_argument("--only", default="", help="regular expression: only the rows whose name matches (merge "
                                                   "and resample: FOLDER/ROW)")
    jobs = argparse.ArgumentParser(add_help=False)
    jobs.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each (default: 2)")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", default="digits", help="embedded model name or diffusers pipeline folder")
    studies = argparse.ArgumentParser(add_help=False)
    studies.add_argument("studies", type=Path, nargs="+", metavar="STUDY_JSON", help="study.json of earlier runs")

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,merge,resample}")
    run_p = sub.add_parser("run", parents=[common, model, jobs], help="compile and measure a matrix's rows",
                           description="Compile every row of --matrix and measure it against the FP graph.")
    run_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a recipe key added to every row (e.g. weights.conv_blocks=true to compare with older "
                            "runs), repeatable")
    add_arguments(run_p)
    sub.add_parser("merge", parents=[studies, common, model], help="earlier studies' rows in one table and plot",
                   description="Run nothing: the rows of earlier studies of --matrix, measured with the same "
                               "--samplers and --seed, in one table, study.json and study.png.")
    sub.add_parser("resample", parents=[studies, common, jobs], help="earlier studies' artifacts on new noise",
                   description="Compile nothing: sample the artifacts of earlier studies' rows again with --samplers "
                               "and --seed, the FP graph once.")
    return p


def legacy_argv(argv: Sequence[str]) -> list[str]:
    """The earlier options-only form as a command: `--merge A B …` → `merge A B …`, `--resample …` → `resample …`,
    anything else → `run …`; argv that names a command (or asks for help) is returned as it is."""
    argv = list(argv)
    if not argv or argv[0] in (*COMMANDS, "-h", "--help"):
        return argv
    found = [flag for flag in ("--merge", "--resample") if flag in argv]
    if len(found) > 1:
        raise SystemExit("--merge and --resample: give one of them")
    if not found:
        return ["run", *argv]
    i = argv.index(found[0])
    end = next((j for j in range(i + 1, len(argv)) if argv[j].startswith("-")), len(argv))
    return [found[0].removeprefix("--"), *argv[i + 1:end], *argv[:i], *argv[end:]]


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as study.json records them (paths as strings)."""
    def plain(v: Any) -> Any:
        return str(v) if isinstance(v, Path) else [plain(p) for p in v] if isinstance(v, list) else v
    return {k: plain(v) for k, v in vars(args).items()}


def run(args: argparse.Namespace) -> int:
    """`run`: compile the rows of `--matrix` (with `--set` added, `--only` matching) and measure them."""
    for s in args.samplers:
        parse_sampler(s)
    todo: list[Row] = [dataclasses.replace(r, sets=(*r.sets, *args.set))
                       for r in MATRICES[args.matrix].rows(MatrixOptions.from_namespace(args))
                       if re.search(args.only, r.name)]
    if not todo:
        raise SystemExit(f"no {args.matrix} row matches --only {args.only!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, initializer=one_thread) as pool:
        compiled = dict(zip([r.name for r in todo],
                            tqdm(pool.map(compile_row, todo, [args.model] * len(todo), [args.out] * len(todo)),
                                 total=len(todo), desc=f"compiling variants ({args.jobs} jobs)", unit="variant"),
                            strict=True))
        samplers = {r.name: list(r.samplers) if r.samplers else args.samplers if r.main else args.samplers[:1]
                    for r in todo}
        fp, measured = measure(args.samplers, args.seed, MATRICES[args.matrix].trajectory,
                               [(r.name, args.out / "artifacts" / r.name, samplers[r.name]) for r in todo], pool)
    results = [{**dataclasses.asdict(r), **compiled[r.name], **measured[r.name]} for r in todo]
    write_report(args.out, settings_of(args), fp, results, round(time.perf_counter() - start, 1))
    return 0


def merge(args: argparse.Namespace) -> int:
    """`merge`: the rows of earlier studies in one table and plot; each row's series is labelled with its study's
    folder (e.g. `aq_long_s0: W4A8 per-step`). Refuses studies of another matrix, samplers or seed."""
    studies = read_studies(args.matrix, args.studies, "merge")
    for path, study in studies:
        got = study["settings"]
        if (got["samplers"], got["seed"]) != (args.samplers, args.seed):
            raise SystemExit(f"merge {path}: measured with --matrix {got['matrix']} --samplers "
                             f"{','.join(got['samplers'])} --seed {got['seed']}; merge only studies run with "
                             f"--matrix {args.matrix} --samplers {','.join(args.samplers)} --seed {args.seed}")
    results = [row for row, _ in relabelled(args.only, studies, "merge")]
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(args.out, settings_of(args), studies[0][1]["fp"], results, 0.0)
    return 0


def resample(args: argparse.Namespace) -> int:
    """`resample`: the artifacts of earlier studies' rows, as they are, sampled again with this run's `--samplers`
    and `--seed` beside the FP graph sampled once, so that rows of several studies (e.g. calibration seeds) are
    measured on one evaluation. Refuses studies of another matrix or of several models, and rows whose artifact
    is gone."""
    for s in args.samplers:
        parse_sampler(s)
    studies = read_studies(args.matrix, args.studies, "resample")
    models = sorted({study["settings"]["model"] for _, study in studies})
    if len(models) > 1:
        raise SystemExit(f"resample: the studies are of different models ({', '.join(models)}); resample one "
                         "model's studies at a time")
    args.model = models[0]
    rows = relabelled(args.only, studies, "resample")
    keyed = []
    for i, (row, folder) in enumerate(rows):
        art = folder / "artifacts" / row["name"]
        if not (art / "manifest.json").is_file():
            raise SystemExit(f"resample: the artifact {art} of row {folder.name}/{row['name']} is gone; resample "
                             "studies whose artifacts folder is still there")
        keyed.append((str(i), art, list(args.samplers)))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, initializer=one_thread) as pool:
        fp, measured = measure(args.samplers, args.seed, MATRICES[args.matrix].trajectory, keyed, pool)
    results = [{**row, "samplers": list(args.samplers), **measured[key]}
               for (row, _), (key, _, _) in zip(rows, keyed, strict=True)]
    write_report(args.out, settings_of(args), fp, results, round(time.perf_counter() - start, 1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (the command line when None; the earlier options-only form is translated) and run its
    command."""
    args = parser().parse_args(legacy_argv(sys.argv[1:] if argv is None else argv))
    return {"run": run, "merge": merge, "resample": resample}[args.command](args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
