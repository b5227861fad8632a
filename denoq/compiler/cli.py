"""The `denoq` command line: compile, sample, eval, inspect, build, validate, recipes (docs/architecture.md,
Interfaces).

Every user error is one line `error: <problem>; <fix>` on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from denoq.errors import DenoqError


def cmd_compile(args: argparse.Namespace) -> None:
    from denoq.calibrators.distributed import init_from_environment, leave
    from denoq.compiler.api import compile_artifact
    from denoq.compiler.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set, args.config)
    joined = init_from_environment(dict(os.environ))  # under torchrun: data-parallel calibration
    try:
        compile_artifact(args.model, recipe, args.out, force=args.force,
                         allow_parity_failure=args.allow_parity_failure)
    except BaseException:
        if joined:
            leave(finished=False)
        raise
    if joined:
        leave(finished=True)


def cmd_sample(args: argparse.Namespace) -> None:
    import io

    import numpy as np

    from denoq.compiler.artifact import Artifact
    from denoq.compiler.files import atomic_write
    from denoq.compiler.generate import generate
    from denoq.compiler.load import check_label
    from denoq.compiler.pictures import grid_png
    from denoq.sampling.names import default_sampler

    check_output_file(args.out, "--out", ".png", args.force)
    check_output_file(args.save_tensor, "--save-tensor", ".npy", args.force)
    art = Artifact.open(args.art)
    check_label(art.manifest["model"], args.label, args.guidance)
    args.sampler = args.sampler or default_sampler(art.manifest["scheduler"])
    x = generate(art, args.backend, sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed, n=args.n,
                 threads=args.threads, label=args.label, guidance=args.guidance)
    atomic_write(args.out, grid_png(x))
    print(f"[denoq] wrote {args.out} ({args.n} samples, backend {args.backend}, {args.sampler} {args.steps} steps)")
    if args.save_tensor is not None:
        buf = io.BytesIO()
        np.save(buf, x.numpy())
        atomic_write(args.save_tensor, buf.getvalue())
        print(f"[denoq] wrote {args.save_tensor} {tuple(x.shape)}")


def check_output_file(path: Path | None, option: str, suffix: str, force: bool) -> None:
    """Refuse the file target of `option` before any work: a folder (never replaced), an existing file without
    `force`, or a place that cannot be written (`check_writable`). None (option not given) passes."""
    from denoq.compiler.files import check_writable

    if path is None:
        return
    if path.is_dir():
        raise DenoqError(f"{option} {path} is a folder; give a {suffix} file path, e.g. {option} "
                         f"{path / ('samples' + suffix)}")
    if (path.exists() or path.is_symlink()) and not force:
        raise DenoqError(f"{path} exists; pass --force to overwrite it or choose another path")
    check_writable(path, f"choose a writable {option}")


def check_artifact_writable(folder: Path) -> None:
    """Refuse, before any work, an artifact folder that a command cannot add its report files to."""
    from denoq.compiler.files import check_writable

    check_writable(folder / "report.json", f"copy {folder} to a writable folder and run the command on the copy")


def cmd_eval(args: argparse.Namespace) -> None:
    from denoq.compiler.artifact import Artifact
    from denoq.compiler.evaluate import EvalSettings, evaluate
    from denoq.sampling.names import default_sampler

    art = Artifact.open(args.art)
    check_artifact_writable(art.path)
    sampler = args.sampler or default_sampler(art.manifest["scheduler"])
    settings = EvalSettings(backend=args.backend, fp_backend=args.fp_backend, sampler=sampler, steps=args.steps,
                            eta=args.eta, seed=args.seed, n=args.n, threads=args.threads, guidance=args.guidance)
    report = evaluate(art, settings)
    print(summary_table(art, report))
    print(f"[denoq] wrote {args.art / 'report.json'} and {args.art / 'report.html'}")


def summary_table(art, report: dict) -> str:
    """The short table `denoq eval` (and `make demo`) prints: quality and ORT latency, FP32 vs quantized."""

    def num(v, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    s = report["sampler"]
    head = f"{s['sampler']} {s['steps']} steps, eta {s['eta']:g}, {s['n']} samples, seed {s['seed']}"
    if s.get("guidance") is not None:
        head += f", guidance {s['guidance']:g}"
    if "class_accuracy" in report:
        head += (f"; class accuracy (the shipped classifier reads the requested digit): FP32 "
                 f"{report['class_accuracy_fp']:.1%}, quantized {report['class_accuracy']:.1%}")
    if "mixed" in report:
        name = f"mixed {'+'.join(report['mixed']['members'])}"
        return "\n".join([head, f"{'model':22s} {'FD-digits':>10s} {'FD to FP':>9s} {'PSNR vs FP':>11s}",
                          f"{'FP32':22s} {num(report['fd_digits_fp'], '10.2f')}",
                          f"{name:22s} {num(report['fd_digits'], '10.2f')} {num(report['fd_to_fp'], '9.2f')} "
                          f"{num(report['psnr_vs_fp'], '8.2f')} dB",
                          report["mixed"]["text"]])
    lat = report["latency_ms"]
    name = f"{art.manifest['recipe']['name']} ({art.manifest['plan']['target']})"
    lines = [head, f"{'model':22s} {'FD-digits':>10s} {'PSNR vs FP':>11s} "
             + " ".join(f"{'ORT ms b' + k.removeprefix('batch'):>11s}" for k in lat if k.startswith("batch"))]
    rows = (("FP32", report["fd_digits_fp"], None, "fp32"), (name, report["fd_digits"], report["psnr_vs_fp"], "qdq"))
    for label, fd, ps, key in rows:
        cells = " ".join(f"{lat[k][key]:11.2f}" for k in lat if k.startswith("batch"))
        lines.append(f"{label:22s} {num(fd, '10.2f')} {num(ps, '8.2f') + ' dB' if ps else '—':>11s} {cells}")
    speed = ", ".join(f"{k}: {v['speedup']:.2f}×" for k, v in lat.items() if k.startswith("batch"))
    lines.append(f"ORT speed-up FP32 → quantized ({lat['threads']} threads): {speed}; "
                 f"layers fused into integer kernels: {report['fusion']['fraction_fused']:.0%}")
    if art.manifest["plan"]["target"] == "trt":
        lines.append("(the trt profile quantizes layer inputs only, as TensorRT wants; ONNX Runtime's CPU integer "
                     "kernels need quantized outputs too: compile with --recipe w8a8-ort for CPU speed)")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> None:
    from denoq.compiler.artifact import Artifact
    from denoq.compiler.inspect import describe

    art = Artifact.open(args.art)
    print(json.dumps(art.manifest, indent=2, sort_keys=True) if args.json else describe(art, layers=args.layers))


def cmd_build(args: argparse.Namespace) -> None:
    from denoq.compiler.build import build

    art = build(args.art, args.profile, args.opt_level)
    info = art.manifest["engine"]
    print(f"[denoq] wrote {args.art / 'engine.plan'} ({info['bytes'] / 1e6:.1f} MB, TensorRT {info['tensorrt']}, "
          f"{info['gpu']} sm {info['compute_capability']}, profile {info['profile']}, {info['seconds']} s)")


def cmd_validate(args: argparse.Namespace) -> None:
    from denoq.compiler.artifact import Artifact
    from denoq.compiler.validate import ValidateSettings, validate

    art = Artifact.open(args.art)
    check_artifact_writable(art.path)
    report = validate(art, ValidateSettings(n=args.n, steps=args.steps, seed=args.seed))
    for name, v in sorted(report["tensors"].items()):
        if name != "reference":
            print(f"{name:14s} per tensor (÷ quantization error): vs reference ≤ "
                  f"{max(v['diff_over_quant_error']):.2f}, vs FP ≤ {max(v['error_over_quant_error']):.2f}; SQNR to "
                  f"reference ≥ {min(v['sqnr_db']):.1f} dB  {'ok' if v['passed'] else 'FAILED'}")
    ref = report["images"]["reference"]["psnr_vs_fp_db"]
    for name, v in sorted(report["images"].items()):
        if name != "reference":
            print(f"{name:14s} images: PSNR vs reference {v['psnr_vs_reference_db']:.2f} dB (reference vs FP "
                  f"{ref:.2f} dB)  {'ok' if v['passed'] else 'FAILED'}")
    for name, why in sorted(report["skipped"].items()):
        print(f"{name:14s} skipped: {why}")
    print(f"[denoq] wrote {args.art / 'validate.json'} and {args.art / 'validate.png'}")
    if not report["passed"]:
        raise DenoqError("validation failed: a backend disagrees with the ORT CPU reference by more than the "
                         "quantization error (validate.json); check the engine's build and denoq inspect")


def cmd_recipes(args: argparse.Namespace) -> None:
    from denoq.compiler.recipe import describe_recipes

    print(describe_recipes())


def at_least(lo: int, fix: str, kind: type[int] | type[float] = int, why: str = "") -> Callable[[str], int | float]:
    """An argparse `type=`: the argument as `kind` (int, or a finite float) ≥ `lo`; anything else is an
    `argparse.ArgumentTypeError` saying what is expected (`why`: the reason, e.g. " (…)") and `fix`."""
    expected = "an integer" if kind is int else "a finite number"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < lo:
            raise argparse.ArgumentTypeError(f"expects {expected} ≥ {lo}{why}, got {text!r}; {fix}")
        return value

    return parse


def _sampling_args(p: argparse.ArgumentParser, n: int, backend: str, min_n: int = 1, why_n: str = "") -> None:
    from denoq.compiler.backend_names import BACKENDS
    from denoq.sampling.names import ALL_SAMPLERS

    p.add_argument("--backend", choices=BACKENDS, default=backend, help=f"eps backend (default {backend})")
    p.add_argument("--sampler", choices=ALL_SAMPLERS, default=None,
                   help="default: ddim, or flow-euler for a flow-matching model")
    p.add_argument("--steps", type=at_least(1, "pass e.g. --steps 50"), default=50, help="sampler steps (default 50)")
    p.add_argument("--eta", type=at_least(0, "pass e.g. --eta 0 (deterministic DDIM) or --eta 1", float), default=0.0,
                   help="DDIM eta (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=at_least(min_n, f"pass e.g. --n {n}", why=why_n), default=n,
                   help=f"number of samples (default {n})")
    p.add_argument("--threads", type=at_least(1, "pass e.g. --threads 4, or omit --threads to use all cores"),
                   default=None, help="ONNX Runtime intra-op threads (default: all cores)")


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: a usage error is a DenoqError (one line `error: <problem>; <fix>`,
    exit status 2, from `main`), not a usage block and SystemExit."""

    def error(self, message: str) -> NoReturn:
        raise DenoqError(message if ";" in message else f"{message}; see {self.prog} --help")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="denoq", description="Post-training quantization compiler for diffusion models: calibrate "
                    "in PyTorch, Q/DQ ONNX, ONNX Runtime / TensorRT.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="calibrate, export and quantize a model into an artifact folder")
    p.add_argument("model", nargs="?", default=None,
                   help="diffusers pipeline folder or embedded model name (default: digits)")
    p.add_argument("--recipe", default="w8a8", help="recipe preset (denoq recipes lists them; default w8a8)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--config", type=Path, default=None, help="TOML file of recipe keys")
    p.add_argument("--out", type=Path, required=True, help="artifact folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--allow-parity-failure", action="store_true",
                   help="keep an artifact whose Q/DQ graph in ONNX Runtime disagrees with the PyTorch simulation "
                        "beyond the parity bound (recorded in the manifest's parity_gate); default: refuse it")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("sample", help="sample a grid of images from an artifact's backend")
    p.add_argument("art", type=Path, help="artifact folder")
    _sampling_args(p, n=64, backend="ort")
    p.add_argument("--out", type=Path, required=True, help="grid PNG to write")
    p.add_argument("--save-tensor", type=Path, default=None, help="also save the raw samples [N,C,H,W] (.npy)")
    p.add_argument("--label", type=int, default=None, help="class-conditional models: the class to sample")
    p.add_argument("--guidance", type=at_least(0, "pass e.g. --guidance 4", float), default=None,
                   help="classifier-free guidance scale (with --label; 1 = conditional, 0 = unconditional)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="quality (FD-digits, PSNR vs FP), latency and pictures into the artifact")
    p.add_argument("art", type=Path, help="artifact folder")
    _sampling_args(p, n=512, backend="ort", min_n=2, why_n=" (a Fréchet distance needs at least 2 samples)")
    p.add_argument("--fp-backend", choices=("ort-fp", "torch-fp"), default="ort-fp",
                   help="FP reference (default ort-fp: the exported FP graph, checked against PyTorch at compile)")
    p.add_argument("--guidance", type=at_least(0, "pass e.g. --guidance 4", float), default=None,
                   help="class-conditional models: classifier-free guidance scale (labels cycle through the classes)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="what is in an artifact: recipe, layers, bit widths, hashes, versions")
    p.add_argument("art", type=Path)
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.add_argument("--layers", action="store_true", help="one line per quantized layer: bits, scales, zero points")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("build", help="build the TensorRT engine of a trt artifact (needs denoq[gpu] and a GPU)")
    p.add_argument("art", type=Path, help="artifact folder compiled with target=trt")
    p.add_argument("--profile", default="", help="optimization profile: batch=MIN:OPT:MAX[,height=…,width=…,"
                   "tokens=…] (default batch=1:4:16, the model's resolution and token length)")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0-5 (default 3)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("validate", help="compare every available backend with ORT CPU (per tensor and per image)")
    p.add_argument("art", type=Path, help="artifact folder")
    p.add_argument("--n", type=at_least(1, "pass e.g. --n 16"), default=16,
                   help="samples per backend for the image comparison (default 16)")
    p.add_argument("--steps", type=at_least(1, "pass e.g. --steps 20"), default=20,
                   help="DDIM steps of the image comparison (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("recipes", help="list recipe presets and keys with their defaults")
    p.set_defaults(func=cmd_recipes)
    return parser


#: The fix `main` prints for an OSError, by errno.
OS_ERROR_FIXES: dict[int, str] = {
    errno.ENOSPC: "free space on the disk (or write to another disk) and run again",
    errno.EDQUOT: "free space within your disk quota (or write to another disk) and run again",
    errno.EACCES: "choose a writable --out (or a folder you may write to)",
    errno.EPERM: "choose a writable --out (or a folder you may write to)",
    errno.EROFS: "the file system is read-only: choose a writable --out",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "the path is a folder: give a file path",
    errno.ENOENT: "check the path",
}


def rank_prefix() -> str:
    """`rank R: ` under a launcher of several ranks (`torchrun` sets RANK and WORLD_SIZE), else nothing. Read from
    the environment: the process group is already left when `main` prints the error."""
    return f"rank {os.environ.get('RANK', '0')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def os_error_line(exc: OSError) -> str:
    """What `main` prints after `error: ` for an OSError (a full disk, a read-only folder, …): the path, the
    operating system's words and the fix (OS_ERROR_FIXES), on one line."""
    where = f"{exc.filename}: " if exc.filename is not None else ""
    what = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    return f"{where}{what}; {OS_ERROR_FIXES.get(exc.errno, 'check the path and the disk, then run again')}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command of `argv` (default: sys.argv). Returns the exit status: 0, 2 after one line `error: …` on
    stderr for a user error (a DenoqError, a usage error, or an OSError such as a full disk), 130 on Ctrl-C."""
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        args = build_parser().parse_args(argv)
        from denoq.log import verbose

        with verbose(not getattr(args, "quiet", False) and os.environ.get("RANK", "0") == "0"):
            args.func(args)
    except DenoqError as exc:
        print(f"error: {rank_prefix()}{exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`denoq inspect ART | head`): end quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that every `with` (an ArtifactWriter's temporary folder) unwinds."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
