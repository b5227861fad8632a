"""The bench's markdown: each table described by its heading, its columns, the rows it reads from the JSON report
and its note, and rendered by one function (`render_table`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from toolkit.bench.variants import BY_KEY, CORE, HEADS, SELECTOR_OVERHEAD_GOAL, SELECTORS, label_quality, variant_label
from toolkit.common import Column, column_table, fmt


@dataclass(frozen=True)
class Settings:
    """What the tables' headers and notes say about the run (the `--groups`, `--threads` and `--rounds` options)."""

    groups: int = 1
    threads: int = 2
    rounds: int = 7


@dataclass(frozen=True)
class Item:
    """One row's data: the model, its report entry (`res`), the batch and variant where the table has them, and the
    row's own entry (`data`: a latency, fusion or quality entry)."""

    model: str
    res: dict[str, Any]
    batch: str = ""
    key: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Table:
    """A section of the bench's output: shown when `items` yields a row."""

    heading: str
    columns: Callable[[Settings], Sequence[Column]]
    items: Callable[[dict[str, Any]], Iterator[Item]]
    note: Callable[[dict[str, Any], Settings], str] | None = None


def render_table(table: Table, report: dict[str, Any], settings: Settings) -> str | None:
    """`## heading`, the table and its note; None when the report has no row for it."""
    items = list(table.items(report))
    if not items:
        return None
    text = f"## {table.heading}\n\n" + column_table(table.columns(settings), items)
    return text + ("\n\n" + table.note(report, settings) if table.note else "")


def _latency(report: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str, dict[str, Any]]]:
    for model, res in report["models"].items():
        for bkey, per in res.get("latency", {}).items():
            yield model, res, bkey.removeprefix("batch"), per


def _batch_rows(report: dict[str, Any]) -> Iterator[Item]:
    for model, res, batch, per in _latency(report):
        yield Item(model, res, batch, data=per)


def _variant_rows(keys: Sequence[str]) -> Callable[[dict[str, Any]], Iterator[Item]]:
    """Items of the timed variants among `keys`, per model and batch; `data` is the batch's latency entries."""
    def items(report: dict[str, Any]) -> Iterator[Item]:
        for model, res, batch, per in _latency(report):
            yield from (Item(model, res, batch, k, per) for k in keys if k in per)
    return items


def _ms(key: str) -> Callable[[Item], str]:
    return lambda i: f"{i.data[key]['median_ms']:.2f}"


def _own_ms(i: Item) -> str:
    return f"{i.data[i.key]['median_ms']:.2f}"


def _overhead(i: Item) -> str:
    e = i.data[i.key]
    return f"{e['overhead']:.3f} ({e['overhead_min']:.3f}–{e['overhead_max']:.3f})"


def _speedup_cell(key: str) -> Callable[[Item], str]:
    return lambda i: (f"{i.data[key]['median_ms']:.2f} ({i.data[key]['speedup']:.2f}×, "
                      f"{i.data[key]['speedup_min']:.2f}–{i.data[key]['speedup_max']:.2f})")


def _base_ms(i: Item) -> str:
    return f"{i.data[BY_KEY[i.key].base]['median_ms']:.2f}"


def _fused(which: str) -> Callable[[Item], str]:
    """The fusion fraction of the row's variant (`which` = "key") or of its base (`which` = "base")."""
    def cell(i: Item) -> str:
        fusion = i.res.get("fusion", {})
        k = i.key if which == "key" else BY_KEY[i.key].base
        return f"{fusion[k]['fraction_fused']:.0%}" if k in fusion else "–"
    return cell


def _models(report: dict[str, Any]) -> Iterator[Item]:
    yield from (Item(m, r) for m, r in report["models"].items())


def _fusion(report: dict[str, Any]) -> Iterator[Item]:
    for model, res in report["models"].items():
        yield from (Item(model, res, key=k, data=rep) for k, rep in res.get("fusion", {}).items())


def _quality(report: dict[str, Any]) -> Iterator[Item]:
    if "quality" in report:
        q = report["quality"]
        yield from (Item(q["model"], report["models"][q["model"]], key=k, data=r) for k, r in q["rows"].items())


def _peer_scale(i: Item) -> str:
    scale = i.res["info"].get("peer", {}).get("sin_input_scale")
    return "–" if scale is None else f"{scale:.3g}"


def _quality_note(report: dict[str, Any], _: Settings) -> str:
    q = report["quality"]
    info = report["models"][q["model"]]["info"]
    note = (f"Model `{q['model']}`, DDIM {q['steps']} steps (η = 0), {q['n']} samples from the same noise (seed "
            f"{q['seed']}); graphs run in ONNX Runtime, the FP reference in PyTorch.")
    scale = info.get("peer", {}).get("sin_input_scale")
    if scale is not None:
        note += (f" ORT quantize_static quantizes the timestep embedding's t·freq to int8 before Sin/Cos (scale "
                 f"{scale:.3g}); `t-emb. + keep_fp FP` leaves that path and the layers denoq keeps in float "
                 f"({len(info.get('peer-t', {}).get('nodes_to_exclude', []))} nodes, `nodes_to_exclude`) in float.")
    return note


MODELS = Table("Models", lambda s: [
    Column("model", lambda i: i.model),
    Column("parameters", lambda i: f"{i.res['info']['parameters']:,}"),
    Column("sample", lambda i: "×".join(map(str, i.res["info"]["sample_shape"]))),
    Column("calibration inputs", lambda i: str(i.res["info"]["calibration_inputs"])),
    Column("peer: quant_pre_process", lambda i: str(i.res["info"].get("peer", {}).get("preprocessed", "reused"))),
    Column("peer: int8 scale of t·freq (Sin input)", _peer_scale)], _models)

LATENCY = Table("Latency per model call", lambda s: [
    Column("model", lambda i: i.model), Column("batch", lambda i: i.batch), Column("FP32 ms", _ms("fp32")),
    *(Column(f"{variant_label(k)} ms (×FP32)", _speedup_cell(k)) for k in CORE if k != "fp32")], _batch_rows,
    lambda r, s: (f"ONNX Runtime CPU, {s.threads} intra-op threads, spinning off. ms: median of {s.rounds} "
                  "interleaved round medians; ×FP32: median (and range) over the rounds of FP32 / variant timed in "
                  "the same round. ORT quantize_static: QDQ, per-channel int8 weights, int8 activations, both "
                  "symmetric, MinMax calibration on the same calibration inputs as denoq's compile."))

SELECTOR = Table("Timestep selector overhead", lambda s: [
    Column("model", lambda i: i.model), Column("batch", lambda i: i.batch),
    Column("profile", lambda i: variant_label(BY_KEY[i.key].base)),
    Column("selector layers", lambda i: str(i.res["info"].get(f"selector_layers_{i.key}", "–"))),
    Column("G=1 ms", _base_ms), Column(f"G={s.groups} ms", _own_ms),
    Column(f"G={s.groups} / G=1 (range)", _overhead),
    Column("fused G=1", _fused("base")), Column(f"fused G={s.groups}", _fused("key"))], _variant_rows(SELECTORS),
    lambda r, s: (f"`activations.timestep_groups={s.groups}` added to each profile's recipe; a selector layer runs "
                  "x → Mul(Gather(r, t)) → Q → DQ → layer → Div → Add(bias). G / G=1: median (and range) over the "
                  f"rounds of the two graphs' ms timed in the same round; goal ≤ {SELECTOR_OVERHEAD_GOAL:.2f}."))

HEAD = Table("PTQD head overhead", lambda s: [
    Column("model", lambda i: i.model), Column("batch", lambda i: i.batch), Column("without head ms", _base_ms),
    Column("with head ms", _own_ms), Column("with / without (range)", _overhead)], _variant_rows(HEADS),
    lambda r, s: ("The `denoq trt` graph with `ε = (ε_q − Gather(bias, t)) · Gather(1/(1+k), t)` appended at its "
                  "output (`denoq.passes.ptqd_head`); ratio: median (and range) over the rounds of the two graphs' ms "
                  "timed in the same round."))

FUSION = Table("Integer-kernel fusion in ONNX Runtime (CPU EP)", lambda s: [
    Column("model", lambda i: i.model), Column("graph", lambda i: variant_label(i.key, s.groups)),
    Column("quantized layers", lambda i: str(i.data["layers"])), Column("fused", lambda i: str(i.data["fused"])),
    Column("fraction fused", lambda i: f"{i.data['fraction_fused']:.0%}"),
    Column("integer kernels", lambda i: ", ".join(f"{op} {c}" for op, c in i.data["integer_ops"].items()) or "–"),
    Column("unfused float kernels", lambda i: ", ".join(f"{op} {c}" for op, c in i.data["float_ops"].items()) or "–"),
    Column("Q / DQ left", lambda i: f"{i.data['quantize_nodes']} / {i.data['dequantize_nodes']}")], _fusion)

QUALITY = Table("Sample quality", lambda s: [
    Column("sampler backend", lambda i: label_quality(i.key)), Column("FD-digits", lambda i: fmt(i.data["fd_digits"])),
    Column("FD / FP", lambda i: fmt(i.data.get("fd_ratio"), ".3f")),
    Column("FD to FP samples", lambda i: fmt(i.data["fd_to_fp"])),
    Column("PSNR vs FP (dB)", lambda i: fmt(i.data["psnr_vs_fp"]))], _quality, _quality_note)

#: The bench's tables, in output order.
TABLES: tuple[Table, ...] = (MODELS, LATENCY, SELECTOR, HEAD, FUSION, QUALITY)
