"""The study's matrices as data: each named matrix builds its rows (recipe variants with their `--set` keys) from
`MatrixOptions`, and says how its table and plot read them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from toolkit.common import Column


@dataclass(frozen=True)
class Row:
    """One compiled variant: its name, preset and overrides, the table's label columns, the plot's series and x,
    and whether every sampler evaluates it (`main`) or only the first."""

    name: str
    preset: str
    sets: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    series: str
    x: int
    main: bool
    samplers: tuple[str, ...] | None = None  # evaluate with exactly these (None: all if main, else the first)


def parse_sampler(text: str) -> tuple[str, int, int, float]:
    """`ddim50:512` → ("ddim", 50, 512, 0.0); `ddim50:512:1` → DDIM with η = 1; SystemExit for anything else."""
    head, _, rest = text.partition(":")
    n, _, eta = rest.partition(":")
    kind = head.rstrip("0123456789")
    try:
        eta_value = float(eta or 0.0)
    except ValueError:
        eta_value = -1.0
    if kind not in ("ddim", "ddpm") or not head[len(kind):].isdigit() or not n.isdigit() or not 0 <= eta_value <= 1:
        raise SystemExit(f"--samplers item {text!r} must look like ddim50:512, ddim50:512:1 (η) or ddpm1000:128")
    return kind, int(head[len(kind):]), int(n), eta_value


def samplers_by_schedule(samplers: list[str]) -> dict[tuple[str, int], list[str]]:
    """`--samplers` grouped by (sampler, steps): calibration statistics belong to one such schedule."""
    groups: dict[tuple[str, int], list[str]] = {}
    for s in samplers:
        kind, steps, _, _ = parse_sampler(s)
        groups.setdefault((kind, steps), []).append(s)
    return groups


def ints(text: str) -> list[int]:
    """`1,2,4` → [1, 2, 4]; empty → []."""
    return [int(v) for v in text.split(",") if v]


def words(text: str) -> list[str]:
    """`a,b` → ["a", "b"]; empty → []."""
    return [v for v in text.split(",") if v]


def _cli(parse: Callable[[str], Any], matrix: str, help: str) -> dict[str, Any]:
    """A `MatrixOptions` field's metadata: how `--NAME` parses, the matrix it belongs to, its help."""
    return {"parse": parse, "matrix": matrix, "help": help}


@dataclass
class MatrixOptions:
    """What the rows of a matrix depend on: the `--samplers` and each matrix's own options (`run`'s `--NAME`)."""

    samplers: list[str] = field(default_factory=lambda: ["ddim50:512", "ddpm1000:128"])
    groups: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata=_cli(
        ints, "timegroups", "timestep groups G of the exact (DP) partition"))
    strategies: list[str] = field(default_factory=lambda: ["uniform", "normal", "srm"], metadata=_cli(
        words, "timegroups", "calibration step rules (activations.calib_timesteps)"))
    search_groups: list[int] = field(default_factory=lambda: [2, 4, 8], metadata=_cli(
        ints, "timegroups", "G of the differentiable group search rows"))
    low_bits: list[int] = field(default_factory=lambda: [6, 4], metadata=_cli(
        ints, "timegroups", "activation bits of the low-bit rows"))
    low_bit_groups: list[int] = field(default_factory=lambda: [1, 4, 8], metadata=_cli(
        ints, "timegroups", "G of the low-bit rows"))
    pool: int = field(default=50, metadata=_cli(int, "timegroups", "recorded DDIM steps per trajectory"))
    k: int = field(default=16, metadata=_cli(int, "timegroups", "calibration steps chosen from them"))
    group_sizes: list[int] = field(default_factory=lambda: [0, 32, 64, 128], metadata=_cli(
        ints, "weights", "RTN and GPTQ weight group sizes (0 = per output channel)"))
    obq_group_sizes: list[int] = field(default_factory=lambda: [0, 64], metadata=_cli(
        ints, "weights", "OBQ weight group sizes"))
    windows: list[int] = field(default_factory=lambda: [2, 4], metadata=_cli(
        ints, "accuquant", "AccuQuant window lengths n ≥ 2"))
    objectives: list[str] = field(default_factory=lambda: ["end"], metadata=_cli(
        words, "accuquant", "window objectives (accuquant.objective: end, every, outputs)"))
    gradients: list[str] = field(default_factory=lambda: ["full"], metadata=_cli(
        words, "accuquant", "window gradients (accuquant.gradient: full, stop at the model inputs)"))
    iters: int = field(default=300, metadata=_cli(
        int, "accuquant", "optimizer iterations per row (300 = the README's earlier tables' budget; the recipe's "
        "default accuquant.iters is 1000)"))
    perstep_iters: int = field(default=0, metadata=_cli(
        int, "accuquant", "also rows whose window fine-tunes after this many per-step iterations (0 = no)"))
    presets: list[str] = field(default_factory=lambda: ["w4a8"], metadata=_cli(
        words, "recon", "recipes whose weights are reconstructed"))
    block_iters: int = field(default=300, metadata=_cli(
        int, "recon", "accuquant.iters of the block-wise rows (per block)"))
    recon_windows: list[int] = field(default_factory=lambda: [2], metadata=_cli(
        ints, "recon", "AccuQuant windows n ≥ 2 at block granularity"))
    lrs: list[float] = field(default_factory=list, metadata=_cli(
        lambda text: [float(v) for v in text.split(",") if v], "recon",
        "also block-output rows with these accuquant.lr (the default row uses the recipe's)"))
    calib_seeds: list[int] = field(default_factory=lambda: [0], metadata=_cli(
        ints, "recon", "calibration seeds (the recipe's seed: trajectories, batches); every row per seed"))
    ptqd: bool = field(default=False, metadata=_cli(
        lambda text: text.lower() in ("1", "true", "yes"), "recon", "also every method with ptqd.enabled=true"))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> MatrixOptions:
        """The options parsed by `add_arguments` (fields missing from `args` keep their defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Each matrix's options (not `--samplers`) on `p`, one argument group per matrix, with their defaults."""
    defaults = MatrixOptions()
    groups: dict[str, Any] = {}
    for f in fields(MatrixOptions):
        if "matrix" not in f.metadata:
            continue
        matrix = f.metadata["matrix"]
        group = groups.setdefault(matrix, p.add_argument_group(f"{matrix} matrix"))
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        group.add_argument("--" + f.name.replace("_", "-"), type=f.metadata["parse"], default=default,
                           help=f"{f.metadata['help']} (default: {shown})")


def timegroup_rows(o: MatrixOptions) -> list[Row]:
    """`w8a8` rows on one calibration budget (`pool` recorded steps, `k` calibrating): A8 for each G of `groups` ×
    rule of `strategies`; A8 uniform with the differentiable search for each G of `search_groups`; and each bits of
    `low_bits` uniform for each G of `low_bit_groups`. The A8 exact rows are main."""
    budget = (f"calib.steps={o.pool}", f"calib.timesteps={o.k}")
    out = [Row(f"a8-{strategy}-g{g}", "w8a8",
               (*budget, f"activations.calib_timesteps={strategy}", f"activations.timestep_groups={g}"),
               (("bits", "A8"), ("G", str(g)), ("timesteps", strategy), ("groups", "dp")), f"A8 {strategy}", g, True)
           for g in o.groups for strategy in o.strategies]
    out += [Row(f"a8-uniform-g{g}-search", "w8a8",
                (*budget, f"activations.timestep_groups={g}", "activations.group_search=differentiable"),
                (("bits", "A8"), ("G", str(g)), ("timesteps", "uniform"), ("groups", "differentiable")),
                "A8 uniform + search", g, False) for g in o.search_groups]
    out += [Row(f"a{bits}-uniform-g{g}", "w8a8",
                (*budget, f"activations.bits={bits}", f"activations.timestep_groups={g}"),
                (("bits", f"A{bits}"), ("G", str(g)), ("timesteps", "uniform"), ("groups", "dp")), f"A{bits} uniform",
                g, False) for bits in o.low_bits for g in o.low_bit_groups]
    return out


def _weight_row(preset: str, method: str, group: int, main: bool, sequential: bool = True) -> Row:
    mode = "" if sequential else " parallel"
    return Row(f"{preset}-{method}{mode.replace(' ', '-')}-g{group}", preset,
               (f"weights.method={method}", f"weights.group_size={group}", f"weights.sequential={sequential}"),
               (("recipe", preset.upper()), ("method", method + mode), ("group", str(group or "channel"))),
               f"{preset.upper()} {method}{mode}", group, main)


def weight_rows(o: MatrixOptions) -> list[Row]:
    """W8A8 RTN and GPTQ per channel; for W4A8 and W4A16: RTN and GPTQ at each of `group_sizes`, GPTQ per channel
    in parallel mode, and OBQ at each of `obq_group_sizes`. The per-channel RTN and GPTQ rows are main."""
    out = [_weight_row("w8a8", m, 0, True) for m in ("rtn", "gptq")]
    for preset in ("w4a8", "w4a16"):
        for g in o.group_sizes:
            out += [_weight_row(preset, "rtn", g, g == 0), _weight_row(preset, "gptq", g, g == 0)]
        out += [_weight_row(preset, "gptq", 0, False, sequential=False)]
        out += [_weight_row(preset, "obq", g, False) for g in o.obq_group_sizes]
    return out


#: PTQD's steps, each a name and the keys it adds: none, the bias correction, bias + k (the head), + VSC.
PTQD_VARIANTS = (("none", ()), ("bias", ("ptqd.enabled=true", "ptqd.correlation=false")),
                 ("bias + k", ("ptqd.enabled=true",)), ("bias + k + vsc", ("ptqd.enabled=true", "ptqd.vsc=true")))


def _schedule_sets(kind: str, steps: int) -> tuple[str, ...]:
    return f"calib.sampler={kind}", f"calib.steps={steps}", f"calib.timesteps={min(25, steps)}"


def ptqd_rows(o: MatrixOptions) -> list[Row]:
    """For each sampler and step count of `samplers` (PTQD's statistics and the per-step precision belong to
    one): W8A8 and W4A8 with each of PTQD_VARIANTS, and step-aware mixed precision W4A8 / W8A8 with the full PTQD
    stack. Each row is evaluated with the samplers of its own sampler and step count."""
    out = []
    for (kind, steps), samplers in samplers_by_schedule(o.samplers).items():
        calib, schedule = _schedule_sets(kind, steps), (("calib", f"{kind}{steps}"),)
        out += [Row(f"{kind}{steps}-{preset}-ptqd-{i}", preset, (*calib, *sets),
                    (*schedule, ("recipe", preset.upper()), ("PTQD", variant)), f"{preset.upper()} {kind}{steps}",
                    2**i, True, tuple(samplers))
                for preset in ("w8a8", "w4a8") for i, (variant, sets) in enumerate(PTQD_VARIANTS)]
        full, full_sets = PTQD_VARIANTS[-1]
        out.append(Row(f"{kind}{steps}-mixed", "w4a8", (*calib, *full_sets, "precision.mixed=w8a8"),
                       (*schedule, ("recipe", "mixed W4A8/W8A8"), ("PTQD", full)), f"mixed {kind}{steps}",
                       2 ** len(PTQD_VARIANTS), True, tuple(samplers)))
    return out


def accuquant_methods(o: MatrixOptions) -> list[tuple[str, tuple[str, ...]]]:
    """The accuquant rows' methods, each a name and its keys: RTN weights, per-step reconstruction
    (`accuquant.window=0`), each window × objective × gradient, and with `perstep_iters` each window after that
    many per-step iterations."""
    tag = {gradient: "" if gradient == "full" else f" {gradient}" for gradient in o.gradients}
    methods = [("rtn", ("weights.method=rtn",)), ("per-step", ("weights.method=adaround", "accuquant.window=0"))]
    methods += [(f"window {n}" + ("" if objective == "end" else f" {objective}") + tag[gradient],
                 ("weights.method=adaround", f"accuquant.window={n}", f"accuquant.objective={objective}",
                  f"accuquant.gradient={gradient}"))
                for gradient in o.gradients for objective in o.objectives for n in o.windows]
    if o.perstep_iters:
        methods += [(f"per-step then window {n}" + tag[gradient],
                     ("weights.method=adaround", f"accuquant.window={n}", f"accuquant.perstep_iters={o.perstep_iters}",
                      f"accuquant.gradient={gradient}"))
                    for gradient in o.gradients for n in o.windows]
    return methods


def accuquant_rows(o: MatrixOptions) -> list[Row]:
    """Per sampler and step count of `samplers` and for W8A8 and W4A8, one row per `accuquant_methods` with
    `accuquant.iters={iters}`; every row calibrates on that sampler's trajectories and is evaluated with its
    samplers."""
    out = []
    for (kind, steps), samplers in samplers_by_schedule(o.samplers).items():
        calib = (*_schedule_sets(kind, steps), f"accuquant.iters={o.iters}")
        out += [Row(f"{kind}{steps}-{preset}-{name.replace(' ', '')}", preset, (*calib, *sets),
                    (("calib", f"{kind}{steps}"), ("recipe", preset.upper()), ("method", name)),
                    f"{preset.upper()} {name}", i, True, tuple(samplers))
                for preset in ("w8a8", "w4a8") for i, (name, sets) in enumerate(accuquant_methods(o))]
    return out


def recon_methods(o: MatrixOptions) -> list[tuple[str, tuple[str, ...]]]:
    """The recon rows' methods, each a name and its keys: GPTQ alone; learned rounding from GPTQ's at network
    granularity (per step, the recipe's iterations); at block granularity (`block_iters` each) each block's output
    (BRECQ, with each of `lrs` too), the model's output per step, and AccuQuant windows `recon_windows`; with
    `ptqd`, each of them with PTQD too."""
    learn = ("weights.method=adaround", "accuquant.init=gptq")
    block = (*learn, "accuquant.granularity=block", f"accuquant.iters={o.block_iters}")
    methods = [("gptq", ("weights.method=gptq",)), ("network per-step", (*learn, "accuquant.window=0")),
               ("block output", (*block, "accuquant.window=0"))]
    methods += [(f"block output lr {lr:g}", (*block, "accuquant.window=0", f"accuquant.lr={lr:g}")) for lr in o.lrs]
    methods += [("block per-step", (*block, "accuquant.window=1"))]
    methods += [(f"block window {n}", (*block, f"accuquant.window={n}")) for n in o.recon_windows]
    if o.ptqd:
        methods += [(f"{name} + PTQD", (*sets, "ptqd.enabled=true")) for name, sets in list(methods)]
    return methods


def recon_rows(o: MatrixOptions) -> list[Row]:
    """Each of `presets` × `recon_methods` × `calib_seeds`, calibrated on the first sampler's schedule and
    evaluated with it; all main."""
    (kind, steps), samplers = next(iter(samplers_by_schedule(o.samplers).items()))
    calib = _schedule_sets(kind, steps)
    return [Row(f"{preset}-{name.replace(' ', '-').replace('+', 'plus')}-s{seed}", preset,
                (*calib, f"seed={seed}", *sets),
                (("recipe", preset.upper()), ("method", name), ("calib seed", str(seed))), f"{preset.upper()} {name}",
                seed, True, tuple(samplers))
            for preset in o.presets for name, sets in recon_methods(o) for seed in o.calib_seeds]


#: The formats matrix: each row a name, its preset and keys, and its label.
FORMAT_ROWS = (
    ("int8-w8a8", "w8a8", (), "INT8 W8A8"),
    ("fp8-w8a8-rtn", "fp8", ("weights.method=rtn",), "FP8 W8A8, RTN weights"),
    ("fp8-w8a8", "fp8", (), "FP8 W8A8 (GPTQ)"),
    ("fp8-attention", "fp8", ("attention.quantize=true",), "FP8 W8A8 + FP8 attention"),
    ("int4-w4a8", "w4a8", (), "INT4 W4A8 (GPTQ)"),
    ("int4-w4a4-tensor", "w4a8", ("activations.bits=4",), "INT4 W4A4, activations per tensor"),
    ("int4-w4a4", "w4a4", (), "INT4 W4A4, activation blocks of 64"),
    ("int4-w4a4-svdquant-r1", "w4a4-svdquant", ("svdquant.rank=1",), "INT4 W4A4 + SVDQuant rank 1"),
    ("int4-w4a4-svdquant-r8", "w4a4-svdquant", ("svdquant.rank=8",), "INT4 W4A4 + SVDQuant rank 8"),
    ("int4-w4a4-svdquant", "w4a4-svdquant", (), "INT4 W4A4 + SVDQuant (preset: rank 32)"),
    ("nvfp4", "nvfp4", (), "NVFP4"),
    ("nvfp4-svdquant-r8", "nvfp4-svdquant", ("svdquant.rank=8",), "NVFP4 + SVDQuant rank 8"),
    ("nvfp4-svdquant", "nvfp4-svdquant", (), "NVFP4 + SVDQuant (preset: rank 32)"),
)


def format_rows(o: MatrixOptions) -> list[Row]:
    """One row per FORMAT_ROWS entry with its recipe's defaults; all main."""
    return [Row(name, preset, sets, (("recipe", label),), label, i, True)
            for i, (name, preset, sets, label) in enumerate(FORMAT_ROWS)]


def _weight_error(r: dict[str, Any]) -> str:
    err = r["weight_error_vs_rtn"]
    return "—" if err is None else f"{err:.3f}"


def _probe_error(r: dict[str, Any]) -> str:
    aq = r.get("accuquant")
    if aq is None:
        return "—"
    return (f"{aq['probe_eps_error_before']:.4f} → {aq['probe_eps_error_after']:.4f}"
            + (" (stopped)" if aq["stopped"] else ""))


@dataclass(frozen=True)
class Matrix:
    """A named study: its rows, the x axis of its PSNR plot (each row's own x on a log 2 axis, or `x_of` of its
    measured row on a linear one), the table columns it adds (between the samplers' and `calib s`), and whether its
    rows record the trajectory (`study.png` is then the accumulated error)."""

    rows: Callable[[MatrixOptions], list[Row]]
    xlabel: str
    columns: tuple[Column, ...] = ()
    trajectory: bool = False
    x_of: Callable[[dict[str, Any]], float] | None = None  # the plot's x from a measured row (linear axis)


MATRICES: dict[str, Matrix] = {
    "timegroups": Matrix(timegroup_rows, "timestep groups G"),
    "weights": Matrix(weight_rows, "weight group size (1 = per output channel)",
                      (Column("layer error / RTN", _weight_error),
                       Column("weight bytes / FP32", lambda r: f"{r['weight_bytes'] / r['fp_weight_bytes']:.3f}"))),
    "ptqd": Matrix(ptqd_rows, "1 none, 2 bias, 4 bias + k, 8 + VSC, 16 mixed precision",
                   (Column("GBOPs / image", lambda r: f"{r['bops_per_image'] / 1e9:.1f}"),)),
    "accuquant": Matrix(accuquant_rows, "", (Column("probe ε error before → after", _probe_error),), trajectory=True),
    "recon": Matrix(recon_rows, "calibration seed",
                    (Column("probe ε error before → after", _probe_error),
                     Column("calib peak MB", lambda r: f"{r['memory_peak_mb']:.0f}" if r.get("memory_peak_mb")
                            else "—"))),
    "formats": Matrix(format_rows, "GBOPs per image",
                      (Column("GBOPs / image", lambda r: f"{r['bops_per_image'] / 1e9:.1f}"),
                       Column("weight bytes / FP32", lambda r: f"{r['weight_bytes'] / r['fp_weight_bytes']:.3f}"),
                       Column("executor", lambda r: r.get("executor", "onnxruntime"))),
                      x_of=lambda r: r["bops_per_image"] / 1e9),
}


def matrix_rows(name: str, options: MatrixOptions) -> list[Row]:
    """The rows of matrix `name` for `options`."""
    return MATRICES[name].rows(options)
