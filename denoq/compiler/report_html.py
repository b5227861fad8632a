"""report.html: the evaluation report as a self-contained page a person reads instead of report.json."""

from __future__ import annotations

import base64
import html
import json
from typing import Any

from denoq.compiler.artifact import Artifact


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _details_html(report: dict[str, Any]) -> str:
    """The report's sections after quality: the per-step precision of a mixed artifact, or a single artifact's
    latency, timestep groups, calibration and fusion."""
    if "mixed" in report:
        mixed = report["mixed"]
        steps = " ".join(f"{t}:{m}" for t, m in zip(mixed["t"], mixed["member"], strict=True))
        return (f"<h2>Step-aware mixed precision</h2><p>{html.escape(mixed['text'])}</p>"
                f"<p>member per step (timestep:member, in sampling order): {html.escape(steps)}</p>"
                "<p>Latency, layers and calibration: see each member's own report "
                "(<code>denoq eval ART/members/NAME</code>).</p>")
    lat = report["latency_ms"]
    lat_rows = "".join(f"<tr><td>{k}</td><td>{v['fp32']:.2f}</td><td>{v['qdq']:.2f}</td><td>{v['speedup']:.2f}×</td>"
                       "</tr>" for k, v in lat.items() if k.startswith("batch"))
    fusion = html.escape(json.dumps(report["fusion"], sort_keys=True))
    return f"""<h2>ONNX Runtime latency per model call ({lat['threads']} threads)</h2><table><tr><th></th>
<th>FP32 ms</th><th>Q/DQ ms</th><th>speed-up</th></tr>{lat_rows}</table>
<h2>Timestep groups</h2><p>{html.escape(report.get("timestep_groups", {}).get("text", "1 group"))}</p>
<p>{html.escape(report["calibration"]["text"])}: {html.escape(str(report["calibration"]["timesteps"]))}</p>
<h2>Integer-kernel fusion in ORT</h2><pre>{fusion}</pre>"""


def render_html(art: Artifact, report: dict[str, Any], pictures: dict[str, bytes]) -> str:
    """A self-contained page (pictures inlined as base64) a person can read instead of the JSON."""
    m = art.manifest
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(report.get(k))}</td></tr>"
                   for k in ("fd_digits_fp", "fd_digits", "fd_ratio", "fd_to_fp", "psnr_vs_fp", "bops_per_image"))
    runs = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{_fmt(r[k])}</td>" for k in
                   ("fd_digits_fp", "fd_digits", "fd_to_fp", "psnr_vs_fp")) + "</tr>"
                   for name, r in sorted(report["runs"].items()))
    imgs = "".join(f"<h3>{html.escape(name)}</h3><img src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
                   for name, data in pictures.items())
    title = html.escape(str(art.path))
    target = m["plan"]["target"] if "plan" in m else m["recipe"]["values"]["target"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>denoq report: {title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:3px 8px}}
table{{border-collapse:collapse;margin:1em 0}}img{{max-width:100%}}</style></head><body>
<h1>denoq report</h1><p>model <b>{html.escape(m['model']['name'])}</b> ({m['model']['class']}), recipe
<b>{html.escape(m['recipe']['name'])}</b>, target <b>{target}</b>, backend {report['sampler']['backend']},
sampler {report['sampler']['sampler']} {report['sampler']['steps']} steps, η={report['sampler']['eta']},
{report['sampler']['n']} samples, seed {report['sampler']['seed']}.</p>
<h2>Quality (this run)</h2><table>{rows}</table>
<h2>All evaluation runs of this artifact</h2><table><tr><th>run</th><th>FD-digits FP</th><th>FD-digits quant</th>
<th>FD to FP</th><th>PSNR vs FP (dB)</th></tr>{runs}</table>
{_details_html(report)}
<h2>Pictures</h2>{imgs}</body></html>
"""
