"""report.html: the evaluation report as a self-contained page a person reads instead of report.json.

One HTML file: its own CSS, the pictures inlined as base64, no scripts and nothing fetched. Every number comes from
the report (`denoq.compiler.evaluate`) or the artifact's manifest; missing, nan and infinite values show as "—".
"""

from __future__ import annotations

import base64
from typing import Any

from denoq.compiler.artifact import Artifact
from denoq.compiler.html_parts import DASH, esc, finite, kv, num, pct, row, si, table, td, verdict
from denoq.compiler.report_words import CAPTIONS, CHECK_WORDS, CSS, OP_WORDS, QUALITY

PTQD_ROWS = 20  # at most this many steps in the PTQD table (evenly thinned; report.json has them all)
WORST_LAYERS = 5


def _figure(name: str, pictures: dict[str, bytes], shown: set[str]) -> str:
    """The picture `name` inlined, with its caption; "" when the report has no such picture."""
    if name not in pictures:
        return ""
    shown.add(name)
    title, text = CAPTIONS.get(name, (name, ""))
    data = base64.b64encode(pictures[name]).decode()
    return (f"<figure><h3>{esc(name)}</h3><img src='data:image/png;base64,{data}' alt='{esc(title)}'>"
            f"<figcaption><b>{esc(title)}.</b> {esc(text)}</figcaption></figure>")


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
    facts = [("model", f"{esc(model['name'])} <span class='muted'>({esc(model['class'])}{params})</span>"),
             ("recipe", esc(m["recipe"]["name"])),
             ("target", esc(_target(m))),
             ("backend", f"{esc(s['backend'])} <span class='muted'>vs FP {esc(s['fp_backend'])}</span>"),
             ("sampler", f"{esc(s['sampler'])}, {s['steps']} steps{eta}"),
             ("samples", f"{s['n']:,}"),
             ("seed", esc(s["seed"])),
             ("guidance", guidance),
             ("CPU", esc(cpu_text)),
             ("denoq", esc(m.get("denoq_version", DASH)))]
    if "weights" in m:
        w = m["weights"]
        facts.append(("weights", f"{si(w['qdq_bytes'], 'B')} <span class='muted'>(×{w['ratio']:.3f} of FP32)</span>"))
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in facts)
    return (f"<h1>denoq evaluation report</h1><p class='sub mono'>{esc(art.path)}</p>"
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
        rows.append(row([td(name, "name"), td(q, "num"), td(fp, "num"), td(esc(unit), "unit"),
                          td(esc(words), "explain")]))
    note = f"<p class='note'>{esc(report['fd_note'])}</p>" if report.get("fd_note") else ""
    grid = table([("metric", ""), ("quantized", "num"), ("FP", "num"), ("unit", ""), ("what it means", "")], rows,
                  "quality")
    return ("<h2 id='quality'>Quality</h2><p>The FP model and the quantized backend sample from the same noise with "
            "the same sampler; each metric compares what came out.</p>" + grid + note
            + _figure("samples_fp_vs_quant.png", pictures, shown) + _figure("timestep_error.png", pictures, shown))


def _runs(report: dict[str, Any]) -> str:
    runs = report["runs"]
    current = _run_name(report["sampler"])
    acc = any("class_accuracy" in r for r in runs.values())
    head = [("run", ""), ("FD-digits FP", "num"), ("FD-digits quantized", "num"), ("FD ratio", "num"),
            ("FD to FP", "num"), ("PSNR vs FP (dB)", "num")] + ([("class accuracy (%)", "num")] if acc else [])
    rows = []
    for name, r in sorted(runs.items()):
        fd, fd_fp = finite(r.get("fd_digits")), finite(r.get("fd_digits_fp"))
        ratio = None if fd is None or not fd_fp else fd / fd_fp
        mark = " <span class='muted'>(this run)</span>" if name == current else ""
        cells = [td(f"<code>{esc(name)}</code>{mark}"), td(num(fd_fp), "num"), td(num(fd), "num"),
                 td(num(ratio), "num"), td(num(r.get("fd_to_fp")), "num"), td(num(r.get("psnr_vs_fp")), "num")]
        if acc:
            cells.append(td(pct(r.get("class_accuracy")), "num"))
        rows.append(row(cells, "current" if name == current else ""))
    return ("<h2 id='runs'>All evaluation runs of this artifact</h2><p class='note'>One row per <code>denoq "
            "eval</code> kept in the manifest, named sampler and steps, η, backend, samples and seed (and guidance "
            "scale).</p>" + table(head, rows))


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
        rows.append(row([td(f"<code>{esc(name)}</code>"), td(num(mixed["steps_per_member"][name]), "num"),
                          td(si(meta["bops_per_call"][name]), "num"), td(si(per_image[name]), "num"),
                          td(num(mixed["bops_vs_all"][name]), "num"),
                          td(DASH if gate is None else verdict(gate["passed"]) + f" ({num(gate['ratio'], 3)})"),
                          td(DASH if rules is None else num(rules["count"]), "num")]))
    rows.append(row([td("<b>mixed</b>"), td(num(len(mixed["t"])), "num"), td(""),
                      td(f"<b>{si(per_image['mixed'])}</b>", "num"), td("1", "num"), td(""), td("")]))
    grid = table([("member", ""), ("steps", "num"), ("BOPs per call", "num"), ("BOPs per image", "num"),
                    ("mixed ÷ this", "num"), ("parity gate", ""), ("TRT rule violations", "num")], rows)
    spans = []
    for member, ts in _spans(mixed["t"], mixed["member"]):
        where = f"t = {ts[0]}" if len(ts) == 1 else f"t = {ts[0]} … {ts[-1]}"
        spans.append(f"<li>{where}: <code>{esc(member)}</code> ({len(ts)} step{'s' if len(ts) > 1 else ''})</li>")
    return ("<h2 id='mixed'>Step-aware mixed precision</h2>"
            f"<p>{esc(mixed['text'])}. Rule: {esc(meta.get('criterion', DASH))}.</p>{grid}"
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
        rows.append(row([td(str(batch), "num"), td(num(v["fp32"], 3), "num"), td(num(v["qdq"], 3), "num"),
                          td(num(v["qdq"] / batch, 3), "num"), td(f"{num(v['speedup'], 3)}×", "num")]))
    threads = lat["threads"]
    return ("<h2 id='latency'>Latency in ONNX Runtime</h2>"
            f"<p>One model call (one denoising step) on the CPU with {threads} thread{'s' if threads != 1 else ''}, "
            "median wall-clock time; FP32 is the exported FP graph, Q/DQ the quantized one.</p>"
            + table([("batch", "num"), ("FP32 (ms)", "num"), ("Q/DQ (ms)", "num"), ("Q/DQ per sample (ms)", "num"),
                      ("speed-up", "num")], rows, "compact")
            + "<p class='note'>Speed-up = FP32 time ÷ Q/DQ time; below 1× the quantized graph is slower (on small "
              "models the quantize/dequantize steps cost more than integer kernels save).</p>")


def _fusion(report: dict[str, Any]) -> str:
    f = report["fusion"]
    layers = f["layers"]
    rows = [row([td(f"<code>{esc(op)}</code>"), td(esc(OP_WORDS.get(op, op))), td(verdict(True, "fused", ""),),
                  td(num(count), "num")]) for op, count in f["integer_ops"].items()]
    rows += [row([td(f"<code>{esc(op)}</code>"), td(esc(OP_WORDS.get(op, op))), td(verdict(False, "", "not fused")),
                   td(num(count), "num")]) for op, count in f["float_ops"].items()]
    by_op: dict[bool, list[str]] = {True: [], False: []}
    for layer, op in sorted(f["by_layer"].items()):
        by_op[op in f["integer_ops"]].append(f"<li><code>{esc(layer)}</code> <span class='muted'>{esc(op)}</span></li>")
    lists = "".join(f"<details><summary>{title} ({len(items)})</summary><ul class='layers'>{''.join(items)}</ul>"
                    "</details>" for title, items in (("Layers not fused", by_op[False]),
                                                     ("Layers fused", by_op[True])) if items)
    share = f" ({100 * f['fraction_fused']:.0f}%)" if layers else ""
    return ("<h2 id='fusion'>Integer kernels in ONNX Runtime</h2>"
            f"<p><b>{f['fused']} of {layers}</b> quantized layers{share} run as integer kernels; <b>{f['unfused']}</b> "
            "stay float kernels on dequantized weights (correct, but no faster than FP32). Left standing in the "
            f"optimized graph: {f['quantize_nodes']} QuantizeLinear and {f['dequantize_nodes']} DequantizeLinear "
            "nodes.</p>"
            + table([("ORT kernel", ""), ("what it computes", ""), ("", ""), ("layers", "num")], rows) + lists)


def _layer_sqnr(report: dict[str, Any], pictures: dict[str, bytes], shown: set[str]) -> str:
    sqnr = report.get("layer_sqnr_db") or {}
    worst = sorted(sqnr.items(), key=lambda kv: (finite(kv[1]) is not None, finite(kv[1]) or 0.0))[:WORST_LAYERS]
    rows = [row([td(f"<code>{esc(k)}</code>"), td(num(v, 3), "num")]) for k, v in worst]
    grid = table([(f"lowest {len(worst)} of {len(sqnr)} layers", ""), ("SQNR (dB)", "num")], rows,
                   "compact") if rows else ""
    return ("<h2 id='layers'>Per-layer error</h2>" + grid + _figure("layer_error.png", pictures, shown))


def _groups_and_calibration(report: dict[str, Any], pictures: dict[str, bytes], shown: set[str]) -> str:
    out = ["<h2 id='groups'>Timestep groups</h2>"]
    groups = report.get("timestep_groups")
    out.append(f"<p>{esc(groups.get('text', '1 group') if groups else '1 group')}</p>")
    out.append(_figure("timestep_groups.png", pictures, shown))
    cal = report.get("calibration")
    if cal:
        ts = cal["timesteps"]
        shown_ts = ", ".join(map(str, ts)) if len(ts) <= 24 else \
            ", ".join(map(str, ts[:12])) + ", …, " + ", ".join(map(str, ts[-4:]))

        def terms(d: dict[str, Any], main: str) -> str:
            rest = ", ".join(f"{k} {num(v)}" for k, v in sorted(d.items()) if k != main)
            return esc(d[main]) + (f" <span class='muted'>({esc(rest)})</span>" if rest else "")

        rows = [("timesteps", f"{len(ts)}: <span class='mono'>{esc(shown_ts)}</span>"),
                ("timestep rule", terms(cal["selection"], "strategy")),
                ("group search", terms(cal["group_search"], "method")),
                ("weights", esc(cal["weights"]["method"]))]
        fallbacks = cal["weights"].get("fallbacks")
        if fallbacks:
            rows.append(("weight fallbacks", esc("; ".join(f"{k}: {v}" for k, v in sorted(fallbacks.items())))))
        learned = cal.get("accuquant")
        if learned:
            rows.append(("learned quantizers", esc(f"AdaRound + LSQ, {learned['objective']}, {learned['iters']} "
                                                  f"iterations: probe ε error {num(learned['probe_eps_error_before'])}"
                                                  f" → {num(learned['probe_eps_error_after'])}")))
        out.append("<h2 id='calibration'>Calibration</h2>" + kv(rows) + f"<p class='note'>{esc(cal['text'])}</p>")
    return "".join(out)


def _ptqd(report: dict[str, Any], pictures: dict[str, bytes], shown: set[str]) -> str:
    p = report.get("ptqd")
    if not p:
        return _figure("ptqd.png", pictures, shown)
    n = len(p["t"])
    idx = list(range(n)) if n <= PTQD_ROWS else sorted({round(i * (n - 1) / (PTQD_ROWS - 1)) for i in range(PTQD_ROWS)})
    order = sorted(idx, key=lambda i: -p["t"][i])  # sampling order: high t first
    rows = [row([td(str(p["t"][i]), "num"), td(num(p["k"][i], 3), "num"), td(num(p["mean_abs_bias"][i], 3), "num"),
                  td(num(p["residual_std"][i], 3), "num"), td(num(p["normality_p"][i], 2), "num"),
                  td("<span class='bad'>no</span>" if (finite(p["normality_p"][i]) or 1.0) < 0.01 else "yes")])
            for i in order]
    thinned = f" ({len(idx)} of {n} steps shown, evenly spaced; report.json has all)" if len(idx) < n else ""
    return ("<h2 id='ptqd'>PTQD noise correction</h2>"
            f"<p>Statistics for {esc(p['sampler'])} {p['num_steps']} steps; variance schedule calibration "
            f"{'on' if p['vsc'] else 'off'}. <b>{p['non_gaussian_steps']} of {n}</b> steps have residuals that are "
            f"not Gaussian at the 1% level (D'Agostino–Pearson).{esc(thinned)}</p>"
            + table([("t", "num"), ("k_t", "num"), ("mean |bias|", "num"), ("residual std", "num"),
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
        out.append(f"<p><b>Parity gate</b> {verdict(gate['passed'])}: {esc(words)}.</p>")
    rules = m.get("trt_rules")
    if rules is not None:
        trt = m.get("trt", {})
        graph = f" ({esc(trt.get('graph'))}, {'float16' if trt.get('fp16') else 'float32'})" if trt else ""
        out.append(f"<p><b>TensorRT rules</b>{graph}: {verdict(not rules['count'], 'no violations', '')}"
                   + (f"<span class='bad'>{rules['count']} violation(s)</span>" if rules["count"] else "") + "</p>")
        if rules.get("violations"):
            out.append("<ul>" + "".join(f"<li>{esc(v)}</li>" for v in rules["violations"][:10]) + "</ul>")
    checks = m.get("checks")
    if checks:
        order = [k for k in CHECK_WORDS if k in checks] + sorted(k for k in checks if k not in CHECK_WORDS)
        rows = [row([td(esc(CHECK_WORDS.get(k, k))),
                     td(esc(checks[k]) if isinstance(checks[k], str) else num(checks[k], 3), "num")]) for k in order]
        out.append(table([("parity check on 8 calibration inputs", ""), ("value", "num")], rows))
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
            f"<title>denoq report: {esc(art.path.name)}</title><style>{CSS}</style></head><body>"
            f"{header}{nav}{rest_body}<footer>Written by <code>denoq eval</code> (denoq "
            f"{esc(m.get('denoq_version', DASH))}); versions at compile: {esc(versions or DASH)}. The numbers are in "
            "report.json beside this page.</footer></body></html>\n")
