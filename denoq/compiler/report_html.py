"""report.html: the evaluation report as a self-contained page a person reads instead of report.json.

One HTML file: its own CSS, the pictures inlined as base64, no scripts and nothing fetched. Every number comes from
the report (`denoq.compiler.evaluate`) or the artifact's manifest; missing, nan and infinite values show as "—".
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable
from typing import Any

from denoq.compiler.artifact import Artifact

DASH = "—"
SI_PREFIXES = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
PTQD_ROWS = 20  # at most this many steps in the PTQD table (evenly thinned; report.json has them all)
WORST_LAYERS = 5

# Quality: (report key of the quantized value, key of the FP value or None, name, unit, explanation).
QUALITY = (
    ("fd_digits", "fd_digits_fp", "FD-digits", "",
     "Fréchet distance between the samples and real digits in the feature space of a small digits classifier "
     "(the one shipped with denoq); lower is better. The FP column is the FP model's own distance, the floor "
     "quantization is measured against."),
    ("fd_ratio", None, "FD ratio", "×",
     "FD-digits of the quantized samples divided by the FP model's: 1.00 means quantization costs no measurable "
     "quality, 1.10 means 10% farther from real digits than the FP model."),
    ("fd_to_fp", None, "FD to FP", "",
     "Fréchet distance between the quantized samples and the FP samples themselves (same features); 0 means the "
     "same distribution, lower is better."),
    ("psnr_vs_fp", None, "PSNR vs FP", "dB",
     "Peak signal-to-noise ratio of each quantized sample against its FP twin made from the same noise, averaged "
     "over the samples (identical twins count as 100 dB); higher is better."),
    ("class_accuracy", "class_accuracy_fp", "Class accuracy", "%",
     "Share of samples that the digits classifier recognises as the class they were asked for; higher is "
     "better."),
    ("bops_per_image", None, "BOPs per image", "BOPs",
     "Bit operations to make one image: MACs × weight bits × activation bits summed over the layers, times the "
     "sampling steps. The FP column counts the same MACs at 32 × 32 bits."),
)

# How ORT runs a quantized layer (`denoq.engines.ort.fusion_report`): op type → words.
OP_WORDS = {
    "QLinearConv": "integer convolution",
    "ConvInteger": "integer convolution, int32 output",
    "QGemm": "integer fully-connected (Gemm)",
    "QLinearMatMul": "integer matrix multiply",
    "MatMulIntegerToFloat": "integer matrix multiply, float output",
    "MatMulInteger": "integer matrix multiply, int32 output",
    "DynamicQuantizeMatMul": "matrix multiply with dynamically quantized input",
    "MatMulNBits": "matrix multiply with packed low-bit weights",
    "Conv": "float convolution on dequantized weights",
    "Gemm": "float fully-connected on dequantized weights",
    "MatMul": "float matrix multiply on dequantized weights",
    "FusedConv": "float convolution + activation on dequantized weights",
    "FusedGemm": "float fully-connected + activation on dequantized weights",
    "FusedMatMul": "float matrix multiply (fused transpose/scale) on dequantized weights",
    "?": "not found in ORT's optimized graph",
}

# The manifest's parity checks (docs/artifact.md): key → words.
CHECK_WORDS = {
    "fp_onnx_vs_torch_max_abs": "FP ONNX graph in ORT vs the PyTorch model, max |Δ|",
    "qdq_ort_vs_sim_max_abs": "Q/DQ graph in ORT vs the PyTorch simulation, max |Δ|",
    "sim_vs_fp_max_abs": "simulation vs FP model (the quantization error itself), max |Δ|",
    "qdq_ort_vs_sim_over_quant_error": "ORT vs simulation over the quantization error (max)",
    "qdq_ort_vs_sim_rms_over_quant_error": "ORT vs simulation over the quantization error (RMS; the gate reads this)",
    "fp16_vs_qdq_rms": "float16 TensorRT graph vs float32 Q/DQ graph, RMS",
    "fp16_error_over_fp32_error": "float16 graph's error to FP over the float32 graph's (≈ 1: float16 adds none)",
    "guided_vs_plain_guided_max_abs": "guided graph vs the plain graph guided in Python, max |Δ| (bit-exact: 0)",
    "guided_vs_sim_max_abs": "guided graph vs the guided simulation, max |Δ|",
    "guided_sim_vs_fp_max_abs": "guided simulation vs the guided FP model, max |Δ|",
    "guided_vs_sim_over_quant_error": "guided graph vs simulation over the quantization error (max)",
}

# Picture → (title, what it shows and how to read it).
CAPTIONS = {
    "samples_fp_vs_quant.png": (
        "FP and quantized samples from the same noise",
        "Left: the FP reference; right: the quantized backend. Both start from the same noise and use the same "
        "sampler, so each sample on the right is the twin of the one in the same place on the left. Twins that "
        "keep their shape mean quantization kept the trajectory; PSNR vs FP measures how far they differ."),
    "timestep_error.png": (
        "Error per sampling step",
        "x axis: timestep t, sampling runs from left (noise) to right (image). Blue: the quantized model's output "
        "error relative to the FP output, both given the same FP input (its own error at that step). Orange: how "
        "far the quantized trajectory has drifted from the FP trajectory, the accumulated effect. A drift that "
        "keeps growing towards t = 0 ends in visibly different samples."),
    "layer_error.png": (
        "Output SQNR of each quantized layer",
        "Signal-to-quantization-noise ratio of each layer's output in the simulation against the FP layer, in "
        "network order, probed at 10%, 50% and 90% of the FP trajectory; higher is better (each bit of precision "
        "is worth about 6 dB). The shortest bars are the layers to keep at higher precision first."),
    "timestep_groups.png": (
        "Activation range per timestep against the timestep-grouped clipping levels",
        "One panel per plotted layer: blue is the largest |input| the FP model feeds the layer at each sampled "
        "timestep, red the clipping level of its quantizer (one level per timestep group, boundaries dashed). "
        "Blue above red clips outliers at that step; blue far below red wastes resolution."),
    "ptqd.png": (
        "PTQD statistics per step",
        "The correction PTQD applies at each calibrated timestep: top, the correlated part k_t of the quantization "
        "noise (ε_q = (1 + k_t)·ε + Δ′); middle, the mean bias |b| removed from the output; bottom, the residual "
        "noise std with the normality test's p-value (crosses: residuals that are not Gaussian at the 1% level, "
        "where the variance calibration's Gaussian assumption is weakest)."),
    "precision.png": (
        "Step-aware precision: which member runs each step",
        "Top: the signal-to-noise ratio of each member's quantization noise (SNR_Q) against the sampler's own "
        "signal-to-noise ratio at that step (SNR_F, dashed); a member is good enough where its SNR_Q lies above "
        "SNR_F. Bottom: the member chosen for each step, the cheapest one that is good enough (the most precise "
        "one where none is)."),
}

CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#dde2ea;--head:#f2f4f8;--accent:#2f5d9f;--hi:#eef4ff;--ok:#1b7a3a;
--bad:#b3261e}
*{box-sizing:border-box}
html{background:#fff}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;color:var(--fg);
max-width:960px;margin:0 auto;padding:24px 24px 48px;overflow-wrap:break-word}
h1{font-size:26px;margin:0 0 2px}
h2{font-size:19px;margin:34px 0 10px;padding-bottom:4px;border-bottom:2px solid var(--line)}
p{margin:6px 0 10px}
.sub{color:var(--muted);margin:0 0 14px}
.muted,.note{color:var(--muted);font-size:13px}
code,.mono{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12.5px;
overflow-wrap:anywhere}
nav{font-size:13px;margin:6px 0 8px;color:var(--muted)}
nav a{color:var(--accent);text-decoration:none;margin-right:12px;white-space:nowrap}
dl.facts{display:grid;grid-template-columns:max-content minmax(0,1fr) max-content minmax(0,1fr);gap:4px 14px;
margin:10px 0;padding:12px 16px;background:var(--head);border-radius:6px;font-size:14px}
dl.facts dt{color:var(--muted)}
dl.facts dd{margin:0;font-weight:600}
table{border-collapse:collapse;width:100%;margin:8px 0 12px;font-size:14px}
table.compact{width:auto;min-width:50%}
th,td{padding:5px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:var(--head);font-weight:600;font-size:13px}
.num{text-align:right;font-variant-numeric:tabular-nums}
td.num{white-space:nowrap}
td.explain{color:var(--muted);font-size:13px;min-width:12em}
td.name{font-weight:600;white-space:nowrap}
td.unit{white-space:nowrap;color:var(--muted)}
tr.current td{background:var(--hi)}
table.kv th{width:14em;background:none;font-weight:normal;color:var(--muted);font-size:14px}
.ok{color:var(--ok);font-weight:600}
.bad{color:var(--bad);font-weight:600}
figure{margin:14px 0 22px}
figure h3{font:12px ui-monospace,"DejaVu Sans Mono",monospace;color:var(--muted);margin:0 0 4px}
figure img{display:block;max-width:100%;height:auto;border:1px solid var(--line);border-radius:4px}
figcaption{font-size:13px;color:var(--muted);margin-top:6px;max-width:52em}
figcaption b{color:var(--fg)}
details{margin:6px 0}
summary{cursor:pointer;color:var(--accent)}
ul.layers{columns:2;column-gap:28px;font-size:13px;margin:6px 0;padding-left:18px}
@media (max-width:720px){body{padding:16px 12px 40px}
dl.facts{grid-template-columns:max-content minmax(0,1fr)}ul.layers{columns:1}th,td{padding:4px 6px}}
footer{margin-top:40px;font-size:12px;color:var(--muted);border-top:1px solid var(--line);padding-top:8px}
"""


# -- formatting ----------------------------------------------------------------------------------------------------
def _finite(v: Any) -> float | None:
    """`v` as a finite float; None for None, nan, ±inf (also their JSON spellings "nan", "inf") and non-numbers."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None
    if not isinstance(v, int | float):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def num(v: Any, digits: int = 4) -> str:
    """A number with `digits` significant digits (large ones whole and thousands-separated, those below 1e-4 in
    e-notation); "—" for a
    missing, nan or infinite value."""
    f = _finite(v)
    if f is None:
        return DASH
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    a = abs(f)
    if a == 0:
        return "0"
    if a >= 10 ** digits:
        return f"{f:,.0f}"
    if a < 1e-4:
        return f"{f:.{max(digits - 2, 1)}e}"
    return f"{f:.{digits}g}"


def si(v: Any, unit: str = "") -> str:
    """`v` with an SI prefix: 212126924800 → "212.1 G" (+ unit); "—" for a missing, nan or infinite value."""
    f = _finite(v)
    if f is None:
        return DASH
    for scale, prefix in SI_PREFIXES:
        if abs(f) >= scale:
            return f"{f / scale:.1f} {prefix}{unit}"
    return f"{f:.4g} {unit}".rstrip()


def pct(v: Any) -> str:
    f = _finite(v)
    return DASH if f is None else f"{100 * f:.1f}"


def _e(v: Any) -> str:
    return html.escape(str(v))


def _row(cells: Iterable[str], cls: str = "") -> str:
    return f"<tr{f' class={cls!r}' if cls else ''}>" + "".join(cells) + "</tr>"


def _td(text: str, cls: str = "") -> str:
    """A cell of already escaped or formatted `text`."""
    return f"<td class='{cls}'>{text}</td>" if cls else f"<td>{text}</td>"


def _table(head: Iterable[tuple[str, str]], rows: Iterable[str], cls: str = "") -> str:
    """A table with header cells `(text, class)` and prepared `<tr>` rows."""
    ths = "".join(f"<th class='{c}'>{_e(h)}</th>" if c else f"<th>{_e(h)}</th>" for h, c in head)
    return f"<table{f' class={cls!r}' if cls else ''}><tr>{ths}</tr>{''.join(rows)}</table>"


def _kv(rows: Iterable[tuple[str, str]]) -> str:
    """A two-column table of (label, prepared value)."""
    return "<table class='kv'>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _verdict(ok: bool, yes: str = "passed", no: str = "FAILED") -> str:
    return f"<span class='ok'>✓ {yes}</span>" if ok else f"<span class='bad'>✗ {no}</span>"


def _figure(name: str, pictures: dict[str, bytes], shown: set[str]) -> str:
    """The picture `name` inlined, with its caption; "" when the report has no such picture."""
    if name not in pictures:
        return ""
    shown.add(name)
    title, text = CAPTIONS.get(name, (name, ""))
    data = base64.b64encode(pictures[name]).decode()
    return (f"<figure><h3>{_e(name)}</h3><img src='data:image/png;base64,{data}' alt='{_e(title)}'>"
            f"<figcaption><b>{_e(title)}.</b> {_e(text)}</figcaption></figure>")


# -- sections ------------------------------------------------------------------------------------------------------
def _target(m: dict[str, Any]) -> str:
    return m["plan"]["target"] if "plan" in m else m["recipe"]["values"].get("target", DASH)


def _member_manifests(art: Artifact) -> dict[str, dict[str, Any]]:
    """A mixed artifact's members' manifests by name (their parity gate, rules and cost); {} when unreadable."""
    from denoq.compiler.mixed import members
    from denoq.errors import DenoqError

    try:
        return {name: member.manifest for name, member in members(art).items()}
    except (DenoqError, OSError, KeyError):
        return {}


def _header(art: Artifact, report: dict[str, Any], parts: dict[str, dict[str, Any]]) -> str:
    m = art.manifest
    s = report["sampler"]
    model = m["model"]
    cpu = m.get("cpu") or next((p["cpu"] for p in parts.values() if "cpu" in p), None)
    cpu_text = DASH if not cpu else f"{cpu.get('model', '?')} ({cpu.get('isa', '?')})"
    params = f", {model['parameters']:,} parameters" if isinstance(model.get("parameters"), int) else ""
    eta = f", η = {s['eta']:g}" if s["sampler"] == "ddim" else ""
    guidance = DASH if s.get("guidance") is None else f"{s['guidance']:g}"
    facts = [("model", f"{_e(model['name'])} <span class='muted'>({_e(model['class'])}{params})</span>"),
             ("recipe", _e(m["recipe"]["name"])),
             ("target", _e(_target(m))),
             ("backend", f"{_e(s['backend'])} <span class='muted'>vs FP {_e(s['fp_backend'])}</span>"),
             ("sampler", f"{_e(s['sampler'])}, {s['steps']} steps{eta}"),
             ("samples", f"{s['n']:,}"),
             ("seed", _e(s["seed"])),
             ("guidance", guidance),
             ("CPU", _e(cpu_text)),
             ("denoq", _e(m.get("denoq_version", DASH)))]
    if "weights" in m:
        w = m["weights"]
        facts.append(("weights", f"{si(w['qdq_bytes'], 'B')} <span class='muted'>(×{w['ratio']:.3f} of FP32)</span>"))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in facts)
    return (f"<h1>denoq evaluation report</h1><p class='sub mono'>{_e(art.path)}</p>"
            f"<dl class='facts'>{dl}</dl>")


def _fp_bops(art: Artifact, parts: dict[str, dict[str, Any]], steps: int) -> float | None:
    cost = art.manifest.get("cost") or next((p["cost"] for p in parts.values() if "cost" in p), None)
    return None if cost is None else cost["fp_bops_per_call"] * steps


def _quality(art: Artifact, report: dict[str, Any], parts: dict[str, dict[str, Any]], pictures: dict[str, bytes],
             shown: set[str]) -> str:
    rows = []
    for key, fp_key, name, unit, words in QUALITY:
        if key not in report and (fp_key is None or fp_key not in report):
            continue
        if key == "bops_per_image":
            q, fp = si(report[key]), si(_fp_bops(art, parts, report["sampler"]["steps"]))
        elif unit == "%":
            q, fp = pct(report.get(key)), pct(report.get(fp_key))
        else:
            q, fp = num(report.get(key)), (num(report.get(fp_key)) if fp_key else "")
        rows.append(_row([_td(name, "name"), _td(q, "num"), _td(fp, "num"), _td(_e(unit), "unit"),
                          _td(_e(words), "explain")]))
    note = f"<p class='note'>{_e(report['fd_note'])}</p>" if report.get("fd_note") else ""
    table = _table([("metric", ""), ("quantized", "num"), ("FP", "num"), ("unit", ""), ("what it means", "")], rows,
                   "quality")
    return ("<h2 id='quality'>Quality</h2><p>The FP model and the quantized backend sample from the same noise with "
            "the same sampler; each metric compares what came out.</p>" + table + note
            + _figure("samples_fp_vs_quant.png", pictures, shown) + _figure("timestep_error.png", pictures, shown))


def _runs(report: dict[str, Any]) -> str:
    runs = report["runs"]
    current = _run_name(report["sampler"])
    acc = any("class_accuracy" in r for r in runs.values())
    head = [("run", ""), ("FD-digits FP", "num"), ("FD-digits quantized", "num"), ("FD ratio", "num"),
            ("FD to FP", "num"), ("PSNR vs FP (dB)", "num")] + ([("class accuracy (%)", "num")] if acc else [])
    rows = []
    for name, r in sorted(runs.items()):
        fd, fd_fp = _finite(r.get("fd_digits")), _finite(r.get("fd_digits_fp"))
        ratio = None if fd is None or not fd_fp else fd / fd_fp
        mark = " <span class='muted'>(this run)</span>" if name == current else ""
        cells = [_td(f"<code>{_e(name)}</code>{mark}"), _td(num(fd_fp), "num"), _td(num(fd), "num"),
                 _td(num(ratio), "num"), _td(num(r.get("fd_to_fp")), "num"), _td(num(r.get("psnr_vs_fp")), "num")]
        if acc:
            cells.append(_td(pct(r.get("class_accuracy")), "num"))
        rows.append(_row(cells, "current" if name == current else ""))
    return ("<h2 id='runs'>All evaluation runs of this artifact</h2><p class='note'>One row per <code>denoq "
            "eval</code> kept in the manifest, named sampler and steps, η, backend, samples and seed (and guidance "
            "scale).</p>" + _table(head, rows))


def _run_name(s: dict[str, Any]) -> str:
    """`EvalSettings.run_name` of the report's settings (imported lazily: evaluate imports this module)."""
    from denoq.compiler.evaluate import EvalSettings

    return EvalSettings(**s).run_name


def _mixed(report: dict[str, Any], parts: dict[str, dict[str, Any]], art: Artifact, pictures: dict[str, bytes],
           shown: set[str]) -> str:
    mixed = report["mixed"]
    meta = art.manifest["mixed"]
    per_image = mixed["bops_per_image"]
    rows = []
    for name in mixed["members"]:
        p = parts.get(name, {})
        gate = p.get("parity_gate")
        rules = p.get("trt_rules")
        rows.append(_row([_td(f"<code>{_e(name)}</code>"), _td(num(mixed["steps_per_member"][name]), "num"),
                          _td(si(meta["bops_per_call"][name]), "num"), _td(si(per_image[name]), "num"),
                          _td(num(mixed["bops_vs_all"][name]), "num"),
                          _td(DASH if gate is None else _verdict(gate["passed"]) + f" ({num(gate['ratio'], 3)})"),
                          _td(DASH if rules is None else num(rules["count"]), "num")]))
    rows.append(_row([_td("<b>mixed</b>"), _td(num(len(mixed["t"])), "num"), _td(""),
                      _td(f"<b>{si(per_image['mixed'])}</b>", "num"), _td("1", "num"), _td(""), _td("")]))
    table = _table([("member", ""), ("steps", "num"), ("BOPs per call", "num"), ("BOPs per image", "num"),
                    ("mixed ÷ this", "num"), ("parity gate", ""), ("TRT rule violations", "num")], rows)
    spans = []
    for member, ts in _spans(mixed["t"], mixed["member"]):
        where = f"t = {ts[0]}" if len(ts) == 1 else f"t = {ts[0]} … {ts[-1]}"
        spans.append(f"<li>{where}: <code>{_e(member)}</code> ({len(ts)} step{'s' if len(ts) > 1 else ''})</li>")
    return ("<h2 id='mixed'>Step-aware mixed precision</h2>"
            f"<p>{_e(mixed['text'])}. Rule: {_e(meta.get('criterion', DASH))}.</p>{table}"
            "<p class='note'>BOPs per image of a member: if it ran every step. Parity gate: the member's Q/DQ graph "
            "in ORT against its simulation, as a multiple of the quantization error (bound 2).</p>"
            f"<p>Member per step, in sampling order:</p><ul>{''.join(spans)}</ul>"
            + _figure("precision.png", pictures, shown)
            + "<p class='note'>Latency, layers and calibration: see each member's own report (<code>denoq eval "
              "ART/members/NAME</code>).</p>")


def _spans(ts: list[int], names: list[str]) -> list[tuple[str, list[int]]]:
    """Consecutive steps run by the same member: [(member, [t, …]), …]."""
    out: list[tuple[str, list[int]]] = []
    for t, name in zip(ts, names, strict=True):
        if out and out[-1][0] == name:
            out[-1][1].append(t)
        else:
            out.append((name, [t]))
    return out


def _latency(report: dict[str, Any]) -> str:
    lat = report["latency_ms"]
    rows = []
    for key, v in lat.items():
        if not key.startswith("batch"):
            continue
        batch = int(key[len("batch"):])
        rows.append(_row([_td(str(batch), "num"), _td(num(v["fp32"], 3), "num"), _td(num(v["qdq"], 3), "num"),
                          _td(num(v["qdq"] / batch, 3), "num"), _td(f"{num(v['speedup'], 3)}×", "num")]))
    threads = lat["threads"]
    return ("<h2 id='latency'>Latency in ONNX Runtime</h2>"
            f"<p>One model call (one denoising step) on the CPU with {threads} thread{'s' if threads != 1 else ''}, "
            "median wall-clock time; FP32 is the exported FP graph, Q/DQ the quantized one.</p>"
            + _table([("batch", "num"), ("FP32 (ms)", "num"), ("Q/DQ (ms)", "num"), ("Q/DQ per sample (ms)", "num"),
                      ("speed-up", "num")], rows, "compact")
            + "<p class='note'>Speed-up = FP32 time ÷ Q/DQ time; below 1× the quantized graph is slower (on small "
              "models the quantize/dequantize steps cost more than integer kernels save).</p>")


def _fusion(report: dict[str, Any]) -> str:
    f = report["fusion"]
    layers = f["layers"]
    rows = [_row([_td(f"<code>{_e(op)}</code>"), _td(_e(OP_WORDS.get(op, op))), _td(_verdict(True, "fused", ""),),
                  _td(num(count), "num")]) for op, count in f["integer_ops"].items()]
    rows += [_row([_td(f"<code>{_e(op)}</code>"), _td(_e(OP_WORDS.get(op, op))), _td(_verdict(False, "", "not fused")),
                   _td(num(count), "num")]) for op, count in f["float_ops"].items()]
    by_op: dict[bool, list[str]] = {True: [], False: []}
    for layer, op in sorted(f["by_layer"].items()):
        by_op[op in f["integer_ops"]].append(f"<li><code>{_e(layer)}</code> <span class='muted'>{_e(op)}</span></li>")
    lists = "".join(f"<details><summary>{title} ({len(items)})</summary><ul class='layers'>{''.join(items)}</ul>"
                    "</details>" for title, items in (("Layers not fused", by_op[False]),
                                                     ("Layers fused", by_op[True])) if items)
    share = f" ({100 * f['fraction_fused']:.0f}%)" if layers else ""
    return ("<h2 id='fusion'>Integer kernels in ONNX Runtime</h2>"
            f"<p><b>{f['fused']} of {layers}</b> quantized layers{share} run as integer kernels; <b>{f['unfused']}</b> "
            "stay float kernels on dequantized weights (correct, but no faster than FP32). Left standing in the "
            f"optimized graph: {f['quantize_nodes']} QuantizeLinear and {f['dequantize_nodes']} DequantizeLinear "
            "nodes.</p>"
            + _table([("ORT kernel", ""), ("what it computes", ""), ("", ""), ("layers", "num")], rows) + lists)


def _layer_sqnr(report: dict[str, Any], pictures: dict[str, bytes], shown: set[str]) -> str:
    sqnr = report.get("layer_sqnr_db") or {}
    worst = sorted(sqnr.items(), key=lambda kv: (_finite(kv[1]) is not None, _finite(kv[1]) or 0.0))[:WORST_LAYERS]
    rows = [_row([_td(f"<code>{_e(k)}</code>"), _td(num(v, 3), "num")]) for k, v in worst]
    table = _table([(f"lowest {len(worst)} of {len(sqnr)} layers", ""), ("SQNR (dB)", "num")], rows,
                   "compact") if rows else ""
    return ("<h2 id='layers'>Per-layer error</h2>" + table + _figure("layer_error.png", pictures, shown))


def _groups_and_calibration(report: dict[str, Any], pictures: dict[str, bytes], shown: set[str]) -> str:
    out = ["<h2 id='groups'>Timestep groups</h2>"]
    groups = report.get("timestep_groups")
    out.append(f"<p>{_e(groups.get('text', '1 group') if groups else '1 group')}</p>")
    out.append(_figure("timestep_groups.png", pictures, shown))
    cal = report.get("calibration")
    if cal:
        ts = cal["timesteps"]
        shown_ts = ", ".join(map(str, ts)) if len(ts) <= 24 else \
            ", ".join(map(str, ts[:12])) + ", …, " + ", ".join(map(str, ts[-4:]))

        def terms(d: dict[str, Any], main: str) -> str:
            rest = ", ".join(f"{k} {num(v)}" for k, v in sorted(d.items()) if k != main)
            return _e(d[main]) + (f" <span class='muted'>({_e(rest)})</span>" if rest else "")

        rows = [("timesteps", f"{len(ts)}: <span class='mono'>{_e(shown_ts)}</span>"),
                ("timestep rule", terms(cal["selection"], "strategy")),
                ("group search", terms(cal["group_search"], "method")),
                ("weights", _e(cal["weights"]["method"]))]
        fallbacks = cal["weights"].get("fallbacks")
        if fallbacks:
            rows.append(("weight fallbacks", _e("; ".join(f"{k}: {v}" for k, v in sorted(fallbacks.items())))))
        learned = cal.get("accuquant")
        if learned:
            rows.append(("learned quantizers", _e(f"AdaRound + LSQ, {learned['objective']}, {learned['iters']} "
                                                  f"iterations: probe ε error {num(learned['probe_eps_error_before'])}"
                                                  f" → {num(learned['probe_eps_error_after'])}")))
        out.append("<h2 id='calibration'>Calibration</h2>" + _kv(rows) + f"<p class='note'>{_e(cal['text'])}</p>")
    return "".join(out)


def _ptqd(report: dict[str, Any], pictures: dict[str, bytes], shown: set[str]) -> str:
    p = report.get("ptqd")
    if not p:
        return _figure("ptqd.png", pictures, shown)
    n = len(p["t"])
    idx = list(range(n)) if n <= PTQD_ROWS else sorted({round(i * (n - 1) / (PTQD_ROWS - 1)) for i in range(PTQD_ROWS)})
    order = sorted(idx, key=lambda i: -p["t"][i])  # sampling order: high t first
    rows = [_row([_td(str(p["t"][i]), "num"), _td(num(p["k"][i], 3), "num"), _td(num(p["mean_abs_bias"][i], 3), "num"),
                  _td(num(p["residual_std"][i], 3), "num"), _td(num(p["normality_p"][i], 2), "num"),
                  _td("<span class='bad'>no</span>" if (_finite(p["normality_p"][i]) or 1.0) < 0.01 else "yes")])
            for i in order]
    thinned = f" ({len(idx)} of {n} steps shown, evenly spaced; report.json has all)" if len(idx) < n else ""
    return ("<h2 id='ptqd'>PTQD noise correction</h2>"
            f"<p>Statistics for {_e(p['sampler'])} {p['num_steps']} steps; variance schedule calibration "
            f"{'on' if p['vsc'] else 'off'}. <b>{p['non_gaussian_steps']} of {n}</b> steps have residuals that are "
            f"not Gaussian at the 1% level (D'Agostino–Pearson).{_e(thinned)}</p>"
            + _table([("t", "num"), ("k_t", "num"), ("mean |bias|", "num"), ("residual std", "num"),
                      ("normality p", "num"), ("Gaussian at 1%", "")], rows, "compact")
            + _figure("ptqd.png", pictures, shown))


def _checks(art: Artifact) -> str:
    m = art.manifest
    if "parity_gate" not in m and "checks" not in m and "trt_rules" not in m:
        return ""
    out = ["<h2 id='checks'>Compile checks</h2>"]
    gate = m.get("parity_gate")
    if gate:
        words = (f"the Q/DQ graph in ORT differs from the PyTorch simulation by {num(gate['ratio'], 3)}× the "
                 f"simulation's own RMS error to the FP model (bound {num(gate['bound'], 3)}×)")
        if not gate["passed"] and gate.get("first_layer"):
            words += f"; first disagreeing layer: {gate['first_layer']}"
        out.append(f"<p><b>Parity gate</b> {_verdict(gate['passed'])}: {_e(words)}.</p>")
    rules = m.get("trt_rules")
    if rules is not None:
        trt = m.get("trt", {})
        graph = f" ({_e(trt.get('graph'))}, {'float16' if trt.get('fp16') else 'float32'})" if trt else ""
        out.append(f"<p><b>TensorRT rules</b>{graph}: {_verdict(not rules['count'], 'no violations', '')}"
                   + (f"<span class='bad'>{rules['count']} violation(s)</span>" if rules["count"] else "") + "</p>")
        if rules.get("violations"):
            out.append("<ul>" + "".join(f"<li>{_e(v)}</li>" for v in rules["violations"][:10]) + "</ul>")
    checks = m.get("checks")
    if checks:
        order = [k for k in CHECK_WORDS if k in checks] + sorted(k for k in checks if k not in CHECK_WORDS)
        rows = [_row([_td(_e(CHECK_WORDS.get(k, k))), _td(num(checks[k], 3), "num")]) for k in order]
        out.append(_table([("parity check on 8 calibration inputs", ""), ("value", "num")], rows))
    return "".join(out)


def render_html(art: Artifact, report: dict[str, Any], pictures: dict[str, bytes]) -> str:
    """A self-contained page (pictures inlined as base64, no scripts, nothing fetched) a person can read instead
    of the JSON."""
    m = art.manifest
    shown: set[str] = set()
    parts = _member_manifests(art) if "mixed" in m else {}
    body = [_header(art, report, parts), _quality(art, report, parts, pictures, shown), _runs(report)]
    if "mixed" in report:
        body.append(_mixed(report, parts, art, pictures, shown))
    if "latency_ms" in report:
        body.append(_latency(report))
    if "fusion" in report:
        body.append(_fusion(report))
    if "layer_sqnr_db" in report:
        body.append(_layer_sqnr(report, pictures, shown))
    if "calibration" in report or "timestep_groups" in report:
        body.append(_groups_and_calibration(report, pictures, shown))
    body.append(_ptqd(report, pictures, shown))
    body.append(_checks(art))
    rest = "".join(_figure(name, pictures, shown) for name in sorted(pictures) if name not in shown)
    if rest:
        body.append("<h2 id='pictures'>Other pictures</h2>" + rest)
    text = "".join(body)
    sections = [(a, t) for a, t in (("quality", "Quality"), ("runs", "Runs"), ("mixed", "Mixed precision"),
                                    ("latency", "Latency"), ("fusion", "Integer kernels"), ("layers", "Layers"),
                                    ("groups", "Timestep groups"), ("calibration", "Calibration"), ("ptqd", "PTQD"),
                                    ("checks", "Checks"), ("pictures", "Other pictures")) if f"id='{a}'" in text]
    nav = "<nav>" + "".join(f"<a href='#{a}'>{t}</a>" for a, t in sections) + "</nav>"
    header, rest_body = body[0], "".join(body[1:])
    versions = ", ".join(f"{k} {v}" for k, v in sorted(m.get("versions", {}).items()) if v)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>denoq report: {_e(art.path.name)}</title><style>{CSS}</style></head><body>"
            f"{header}{nav}{rest_body}<footer>Written by <code>denoq eval</code> (denoq "
            f"{_e(m.get('denoq_version', DASH))}); versions at compile: {_e(versions or DASH)}. The numbers are in "
            "report.json beside this page.</footer></body></html>\n")
