"""`denoq inspect`: a readable summary of an artifact's manifest."""

from __future__ import annotations

from collections import Counter

from denoq.compiler.artifact import Artifact
from denoq.sampling.names import SAMPLER_CLASSES, is_flow, scheduler_class


def describe(art: Artifact, layers: bool = False) -> str:
    """Recipe, model, layers with bit widths, checks, file hashes and library versions, as text; with `layers`,
    one line per quantized layer (op, bits, activation scales and zero points)."""
    m = art.manifest
    lines = [f"artifact {art.path}  (schema {m['schema_version']}, denoq {m.get('denoq_version')})"]
    model = m["model"]
    lines.append(f"model    {model['name']}: {model['class']}, sample {model['sample_shape']}, "
                 f"{model['parameters']:,} parameters, T={model['num_train_timesteps']}")
    lines.append("         " + _scheduler_line(m["scheduler"], "text" in model))
    if "text" in model:
        lines.append("         " + _conditioning_line(model, m.get("calibration", {}).get("conditioning", {})))
    recipe = m["recipe"]
    lines.append(f"recipe   {recipe['name']}: " + ", ".join(f"{k}={v}" for k, v in sorted(recipe['values'].items())))
    if "mixed" in m:
        lines.extend(_mixed_lines(m["mixed"]))
    else:
        plan = m["plan"]
        planned = plan["layers"]
        kinds = Counter((v["op"], _precision(v), bool(v["output"])) for v in planned.values())
        lines.append(f"plan     target {plan['target']}, {len(planned)} layers:")
        for (op, precision, out), n in sorted(kinds.items(), key=str):
            lines.append(f"           {n:4d} × {op:6s} {precision}" + ("  +output Q/DQ" if out else ""))
        if layers and planned:
            lines.extend(_layer_lines(art))
    if "cost" in m:
        c = m["cost"]
        lines.append(f"cost     {c['bops_per_call'] / 1e9:.2f} GBOPs per call ({c['macs_per_call'] / 1e6:.1f} M MACs; "
                     f"FP{c['float_bits']}: {c['fp_bops_per_call'] / 1e9:.2f} GBOPs)")
    if "weights" in m:
        w = m["weights"]
        conv4 = len(w["conv_int4_in_int8_container"])
        lines.append(f"weights  {w['qdq_bytes'] / 1e6:.2f} MB on disk vs {w['fp32_bytes'] / 1e6:.2f} MB FP32 "
                     f"(×{w['ratio']:.3f})" + (f"; {conv4} conv layer(s) hold int4 values in an int8 container "
                                               "(TensorRT has no INT4 convolution)" if conv4 else ""))
    kept = m.get("calibration", {}).get("kept_fp", [])
    if kept:
        lines.append(f"           kept in floating point: {', '.join(kept)}")
    if "checks" in m:
        lines.append("checks   " + ", ".join(f"{k}={v}" if isinstance(v, str) else f"{k}={v:.3g}"
                                              for k, v in sorted(m["checks"].items())))
    lines.extend(_deployment_lines(m))
    lines.append("files")
    stale = set(art.stale())
    for name, digest in sorted(m["files"].items()):
        path = art.path / name
        size = f"{path.stat().st_size / 1e6:8.2f} MB" if path.is_file() else "  missing"
        note = "  (derived: missing or changed since written)" if name in stale else ""
        lines.append(f"           {name:28s} {size}  sha256 {digest[:16]}…{note}")
    lines.append("versions " + ", ".join(f"{k} {v}" for k, v in sorted(m["versions"].items()) if v))
    return "\n".join(lines)


def _scheduler_line(scheduler: dict, text: bool) -> str:
    """The scheduler, what it trains on (flow matching's velocity, or the betas and prediction type) and who
    samples the artifact with it."""
    name = scheduler_class(scheduler)
    how = "denoq sample runs it" if name in SAMPLER_CLASSES and not text else \
        "sample through its diffusers pipeline with pipe.unet / pipe.transformer = denoq.load(ART)"
    kind = f"flow matching, shift {scheduler.get('shift', 1.0)}" + \
        (", dynamic by resolution" if scheduler.get("use_dynamic_shifting") else "") if is_flow(scheduler) else \
        f"{scheduler.get('beta_schedule', 'linear')} betas, {scheduler.get('prediction_type', 'epsilon')}"
    return f"scheduler {name} ({kind}; {how})"


def _conditioning_line(model: dict, calib: dict) -> str:
    text = model["text"]
    added = f" + {', '.join(text['added_conditions'])}" if text["added_conditions"] else ""
    source = calib.get("source", "?")
    flag = "  (UNREPRESENTATIVE: random embeddings)" if calib.get("representative") is False else ""
    return (f"text     {text['pipeline'] or 'bare UNet'}: encoder_hidden_states [B, L, {text['width']}]{added}; "
            f"calibrated on {source}{flag}")


def _deployment_lines(m: dict) -> list[str]:
    """The TensorRT graph and its rules verdict, the engine's build info, the last validation."""
    lines = []
    if "trt" in m:
        rules = m.get("trt_rules", {})
        verdict = "keeps every trt rule" if not rules.get("count") else \
            f"{rules['count']} trt-rules violation(s): " + "; ".join(rules["violations"][:3])
        lines.append(f"tensorrt graph {m['trt']['graph']} ({'float16' if m['trt']['fp16'] else 'float32'}): {verdict}")
    if "engine" in m:
        e = m["engine"]
        lines.append(f"engine   TensorRT {e['tensorrt']} on {e['gpu']} (sm {e['compute_capability']}), profile "
                     f"{e['profile']}, built in {e['seconds']} s from {e['onnx']}")
    if "validate" in m:
        v = m["validate"]
        lines.append(f"validate {'passed' if v['passed'] else 'FAILED'} (validate.json); skipped: "
                     f"{', '.join(v['skipped']) or 'none'}")
    return lines


def _mixed_lines(mixed: dict) -> list[str]:
    """The members, steps per member, BOPs and the per-step choice of a mixed artifact."""
    names = mixed["members"]
    per_image = mixed["bops_per_image"]
    lines = [f"mixed    step-aware precision over {mixed['sampler']} {mixed['num_steps']} steps: {mixed['criterion']}"]
    for n in names:
        lines.append(f"           {n:10s} {mixed['steps_per_member'][n]:4d} steps, "
                     f"{mixed['bops_per_call'][n] / 1e9:.2f} GBOPs per call (members/{n})")
    lines.append(f"           BOPs per image: mixed {per_image['mixed'] / 1e9:.1f} G, "
                 + ", ".join(f"all-{n} {per_image[n] / 1e9:.1f} G" for n in names))
    lines.append("           per step (t:member): " + " ".join(f"{r['t']}:{r['member']}" for r in mixed["steps"]))
    return lines


_GRID_NAMES = {"fp8": "FP8", "fp4": "NVFP4"}


def _precision(layer: dict) -> str:
    """`W4A8`, `W8A8`, `FP8 W / FP8 A`, `NVFP4 W / NVFP4 A (blocks) + rank-32 branch`: a plan layer's precision."""
    q = layer["input"] or {}
    w_fmt, a_fmt = layer.get("weight_format", "int"), q.get("format", "int")
    w_name = _GRID_NAMES.get(w_fmt, f"INT{layer['weight_bits']}")
    a_name = _GRID_NAMES.get(a_fmt, f"INT{q.get('bits')}") if q else "float"
    text = f"W{layer['weight_bits']}A{q.get('bits', '-')}" if w_fmt == a_fmt == "int" else f"{w_name} W / {a_name} A"
    if q.get("block_size"):
        text += " (dynamic blocks)"
    return text + (f" + rank-{layer['lowrank']} branch" if layer.get("lowrank") else "")


def _layer_lines(art: Artifact) -> list[str]:
    from safetensors import safe_open

    def act(q: dict | None, tensor: str, f) -> str:
        if q is None:
            return "-"
        scale = f.get_tensor(tensor)
        groups = len(set(scale.tolist()))
        fmt = q.get("format", "int")
        kind = _GRID_NAMES.get(fmt, f"{'' if q['signed'] else 'u'}int{q['bits']}").lower()
        if q.get("block_size"):
            return f"{kind} blocks of {q['block_size']}" + (f" g={float(scale[0]):.4g}" if fmt == "fp4" else "")
        return f"{kind} s={float(scale[0]):.4g} z={q['zero_point']}" + (f" ({groups} scales)" if groups > 1 else "")

    out = [f"           {'layer':52s} {'op':6s} {'W':>5s}  {'input':28s} output"]
    with safe_open(str(art.file("plan.safetensors")), framework="numpy") as f:  # numpy: no torch import
        for name, lm in sorted(art.manifest["plan"]["layers"].items()):
            a_in = act(lm["input"], f"{name}.input_scale", f)
            a_out = act(lm["output"], f"{name}.output_scale", f)
            w = _GRID_NAMES.get(lm.get("weight_format", "int"), str(lm["weight_bits"]))
            out.append(f"           {name:52s} {lm['op']:6s} {w:>5s}  {a_in:28s} {a_out}")
    return out
