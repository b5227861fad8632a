"""The words of the report page: each metric's name, unit and explanation, plain names for ORT's kernels and the
compile checks, every picture's caption, and the page's CSS."""

from __future__ import annotations

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
    "qdq_executor": "executor of the Q/DQ graph in these checks (onnx.reference where ORT's CPU kernels lack NVFP4)",
    "fp_onnx_vs_torch_max_abs": "FP ONNX graph in ORT vs the PyTorch model, max |Δ|",
    "qdq_ort_vs_sim_max_abs": "Q/DQ graph in its executor vs the PyTorch simulation, max |Δ|",
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
