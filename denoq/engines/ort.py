"""ONNX Runtime: session options, providers, the sampler's eps backend (docs/architecture.md, Targets).

ORT is the validation target (CPU here, CUDA where `onnxruntime-gpu` is installed). What its CPU EP makes of a
Q/DQ graph and how fast it runs are read in `ort_report.py`. Measured on this (shared) machine: spinning intra-op
threads made the same graph up to 2.4× slower under load, so spinning is off unless asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.numpy_helper
import onnxruntime as ort
import torch

from denoq.cpu import u8s8_saturates
from denoq.errors import DenoqError, install_hint
from denoq.onnxio import load_model
from denoq.sampling.cond import COND_INPUTS, Cond, Conditioning

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

GUIDANCE_INPUT = "guidance_scale"  # the guided graph's per-sample classifier-free guidance scale

#: ORT's session config entry for exact integer kernels on CPUs without VNNI (`kOrtSessionOptionsAvx2PrecisionMode`).
AVX2_PRECISION = "session.x64quantprecision"

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def session_options(threads: int | None = 2, spinning: bool = False, level: str = "all",
                    optimized_model_path: str | Path | None = None, exact_integers: bool = True) -> ort.SessionOptions:
    """Options for one inference session.

    `threads`: intra-op threads (None: ORT's default, one per physical core); inter-op is 1 (sequential).
    `spinning`: let idle intra-op threads spin (`session.intra_op.allow_spinning`); off by default.
    `level`: graph optimization, one of `disable`, `basic`, `extended`, `all` (default).
    `optimized_model_path`: where ORT writes the graph it optimized (for inspection).
    `exact_integers`: on CPUs without VNNI (`denoq.cpu.u8s8_saturates`), ORT's `session.x64quantprecision`, which
    keeps the integer kernels exact there; on by default, off only to measure what it saves (`tools/bench.py`).
    """
    if level not in LEVELS:
        raise DenoqError(f"unknown ORT optimization level {level!r}; use one of {', '.join(LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = 0 if threads is None else int(threads)
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3  # errors only: ORT warns about every NCHWc-optimized model it saves
    # weight-only int4/int8 MatMuls fuse into MatMulNBits, whose default accuracy level 4 quantizes the activations
    # to int8 on the fly: a graph without activation Q/DQ would not compute what it says; level 1 = fp32 compute
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    # without VNNI, ORT's u8×s8 kernels saturate 16-bit pair sums (denoq.cpu): this entry has ORT convert the
    # constant s8 weights to u8 and run its exact but slower u8×u8 kernels. It converts on VNNI CPUs too, where
    # u8×s8 is exact already, so it is set only where the kernels saturate (and create_session leaves it off for
    # graphs whose weights fit, `weights_fit_pair_sums`).
    so.add_session_config_entry(AVX2_PRECISION, "1" if exact_integers and u8s8_saturates() else "0")
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return so


def providers() -> list[str]:
    """`CUDAExecutionProvider` (then CPU) when this onnxruntime build offers it, else `CPUExecutionProvider`."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def disabled_optimizers(model: onnx.ModelProto) -> list[str]:
    """ORT graph optimizers to turn off for `model`, to work around ORT bugs (observed with onnxruntime 1.31).

    `MatMulAddFusion` on a `DQ → MatMul → Add` with a 3-D input and *int8* activations (the `trt` profile's
    attention projections) inserts Reshapes with Q/DQ copies that the int8→uint8 QDQ rewrite then breaks:
    session creation fails with "output_dtype INT8 does not match y_zero_point type UINT8". Without it the
    layer still runs as MatMulIntegerToFloat. uint8 graphs (`ort-cpu`) keep the fusion (it gives QGemm).

    `QDQSelectorActionTransformer` fuses a 4-bit `DQ → Conv → Q` into a QLinearConv, which rejects uint4 / int4
    ("Type 'tensor(uint4)' … QLinearConv"): session creation fails. ORT has no 4-bit activation kernels to lose,
    so graphs with 4-bit activations run their Q/DQ unfused.

    The same transformer ignores `block_size` on an 8-bit blocked weight `DequantizeLinear` before a MatMul with
    quantized activations (MatMulIntegerToFloat / QLinearMatMul then fail at run time: "Per-column quantization
    parameter …", "weight zero point must be a scalar"); such graphs also run unfused.
    """
    inits = {i.name: i for i in model.graph.initializer}
    zero_point_types = {inits[node.input[2]].data_type for node in model.graph.node
                        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in inits}
    blocked_8bit = any(node.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in node.attribute)
                       and node.input[0] in inits
                       and inits[node.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
                       for node in model.graph.node)
    disabled = []
    if onnx.TensorProto.INT8 in zero_point_types:
        disabled.append("MatMulAddFusion")
    if zero_point_types & {onnx.TensorProto.INT4, onnx.TensorProto.UINT4} or blocked_8bit:
        disabled.append("QDQSelectorActionTransformer")
    return disabled


#: The largest |integer weight| whose u8×s8 pair sums cannot saturate: 2 · 255 · 64 = 32640 ≤ 32767.
PAIR_SAFE_WEIGHT = 64


def weights_fit_pair_sums(model: onnx.ModelProto) -> bool:
    """True when every integer weight of `model` (an int8 initializer a DequantizeLinear reads) has |q| ≤
    PAIR_SAFE_WEIGHT, as 7-bit weights (`weights.bits=7`) do: ORT's u8×s8 kernels are exact on them even without
    VNNI, so `session.x64quantprecision`, which makes them slower, is not needed. False when a weight is larger,
    unsigned, or stored as external data (not read here)."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        weight = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if weight is None or weight.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            continue
        if weight.data_type == onnx.TensorProto.UINT8 or onnx.external_data_helper.uses_external_data(weight):
            return False
        if np.abs(onnx.numpy_helper.to_array(weight).astype(np.int16)).max(initial=0) > PAIR_SAFE_WEIGHT:
            return False
    return True


GPU_PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def gpu_providers(kind: str, cache_dir: Path | None = None) -> list[Any]:
    """The provider list of an ORT session on the GPU: `cuda` (CUDA EP) or `tensorrt` (TensorRT EP with explicit
    Q/DQ, FP16 and INT8 on, its engines and timing cache in `cache_dir`; CUDA EP behind it for what it does not
    take). DenoqError when this onnxruntime build lacks the provider."""
    if kind not in GPU_PROVIDERS:
        raise DenoqError(f"unknown ORT GPU provider {kind!r}; choose one of {', '.join(GPU_PROVIDERS)}")
    name = GPU_PROVIDERS[kind]
    available = ort.get_available_providers()
    if name not in available:
        raise DenoqError(f"onnxruntime {ort.__version__} has no {name} (it has {', '.join(available)}); "
                         f"{install_hint('onnxruntime-gpu')}")
    if kind == "cuda":
        return [name]
    options: dict[str, Any] = {"trt_fp16_enable": True, "trt_int8_enable": True}
    if cache_dir is not None:
        options.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)})
    return [(name, options), "CUDAExecutionProvider"]


def _provider_name(p: Any) -> str:
    return p[0] if isinstance(p, tuple) else str(p)


def create_session(path: str | Path, threads: int | None = 2, execution_providers: Sequence[Any] | None = None,
                   spinning: bool = False, level: str = "all",
                   optimized_model_path: str | Path | None = None,
                   exact_integers: bool = True) -> ort.InferenceSession:
    """An InferenceSession for the ONNX file at `path` with `session_options` and the ORT workarounds."""
    path = Path(path)
    if not path.is_file():
        raise DenoqError(f"ONNX model {path} does not exist; compile the artifact first")
    header = load_model(path, load_external_data=False)
    so = session_options(threads, spinning, level, optimized_model_path,
                         exact_integers and not weights_fit_pair_sums(header))
    wanted = list(execution_providers or providers())
    try:
        session = ort.InferenceSession(str(path), so, providers=wanted,
                                       disabled_optimizers=disabled_optimizers(header))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        msg = " ".join(str(exc).split())[:400]
        raise DenoqError(f"onnxruntime cannot load {path} ({msg}); check the model with denoq inspect") from exc
    first = _provider_name(wanted[0])
    if execution_providers and session.get_providers()[0] != first:  # ORT falls back when a provider fails
        raise DenoqError(f"onnxruntime could not start {first} for {path} (the session runs on "
                         f"{session.get_providers()[0]}); check the CUDA / TensorRT libraries onnxruntime-gpu needs")
    return session


def timestep_feed(t: torch.Tensor | float, batch: int, integral: bool) -> torch.Tensor:
    """The `timestep` [B] of a call: one value broadcast or one per sample; for a graph with an integer timestep
    input the values must be integral (graphs exported by this denoq take the scheduler's float values)."""
    tt = torch.as_tensor(t).reshape(-1)
    if integral and tt.is_floating_point():
        if not torch.equal(tt, tt.round()):
            raise DenoqError(f"timestep {tt.tolist()} is not integral and this graph takes int64 timesteps; pass the "
                             "scheduler's integer timesteps, or recompile (graphs take float timesteps now)")
        tt = tt.to(torch.int64)
    if tt.numel() == 1:
        return tt.expand(batch)
    if tt.numel() != batch:
        raise DenoqError(f"timestep has {tt.numel()} values for a batch of {batch}; pass one per sample or one "
                         "for all")
    return tt


def cond_feeds(names: Sequence[str], cond: Cond, where: str) -> dict[str, torch.Tensor]:
    """The conditioning inputs `names` of a graph or engine fed from `cond` (a tensor for the one input, or a
    `Conditioning` with exactly those names); DenoqError naming what is missing or extra."""
    if not names:
        if cond is not None:
            raise DenoqError(f"{where} is unconditional (no conditioning input) but a cond was given; "
                             "sample it without conditioning")
        return {}
    if cond is None:
        raise DenoqError(f"{where} is conditional (graph inputs {', '.join(names)}) but no cond was given; pass the "
                         "conditioning (class labels or encoder states)")
    if isinstance(cond, Conditioning):
        if sorted(cond.tensors) != sorted(names):
            raise DenoqError(f"{where} takes {', '.join(names)} but the conditioning holds "
                             f"{', '.join(cond.tensors)}; pass the model's own conditioning")
        return dict(cond.tensors)
    if len(names) != 1:
        raise DenoqError(f"{where} takes {', '.join(names)}; pass them all (added_cond_kwargs)")
    return {names[0]: torch.as_tensor(cond)}


class OrtBackend:
    """An ONNX Runtime session as the sampler's `eps(x, t, cond)` callable (docs/architecture.md, Sampler).

    The graph's inputs are `sample` [B, C, H, W], `timestep` [B] (float32: the scheduler's values; int64 in
    graphs of older exports) and, for conditional models, `encoder_hidden_states` (with SDXL's `text_embeds` and
    `time_ids`: a `Conditioning`) or `class_labels`; a guided graph (`denoq.passes.guidance`) also takes
    `guidance_scale` float32 [B], given as `guidance=` (one number or one per sample). Its output is `out_sample`.
    """

    def __init__(self, path: str | Path, threads: int | None = 2, providers: Sequence[Any] | None = None,
                 spinning: bool = False, level: str = "all", exact_integers: bool = True, session: Any = None) -> None:
        """`session`: an object with ONNX Runtime's session interface (`get_inputs`, `get_outputs`, `run`,
        `get_providers`) to run instead of a new ORT session (`denoq.engines.reference`)."""
        self.path = Path(path)
        self.session = session if session is not None else create_session(
            self.path, threads, providers, spinning, level, exact_integers=exact_integers)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        for required in ("sample", "timestep"):
            if required not in self.inputs:
                raise DenoqError(f"{self.path} has no graph input {required!r} (inputs: {', '.join(self.inputs)}); "
                                 "export the model with denoq.export")
        self.cond_inputs = [n for n in COND_INPUTS if n in self.inputs]
        self.guided = GUIDANCE_INPUT in self.inputs
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = "out_sample" if "out_sample" in outputs else outputs[0]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def feeds(self, x: torch.Tensor, t: torch.Tensor | float, cond: Cond = None,
              guidance: float | torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """The session's input dict for `eps(x, t, cond)`: t (and a guided graph's scale) broadcast to [B], dtypes
        as the graph wants."""
        batch = x.shape[0]
        tt = timestep_feed(t, batch, integral=self.inputs["timestep"].type != "tensor(float)")
        feeds = {"sample": self._array("sample", x), "timestep": self._array("timestep", tt)}
        feeds.update({k: self._array(k, v) for k, v in cond_feeds(self.cond_inputs, cond, self.path.name).items()})
        if self.guided != (guidance is not None):
            raise DenoqError(f"{self.path.name} {'is' if self.guided else 'is not'} a guided graph (input "
                             f"{GUIDANCE_INPUT!r}) but guidance was {'not ' if self.guided else ''}given; "
                             f"{'pass the guidance scale' if self.guided else 'guide the plain graph outside'}")
        if guidance is not None:
            scale = torch.as_tensor(guidance, dtype=torch.float32).reshape(-1)
            feeds[GUIDANCE_INPUT] = self._array(GUIDANCE_INPUT, scale.expand(batch) if scale.numel() == 1 else scale)
        return feeds

    def _array(self, name: str, value: torch.Tensor) -> np.ndarray:
        dtype = _NP_TYPES.get(self.inputs[name].type)
        a = value.detach().cpu().numpy()
        return np.ascontiguousarray(a if dtype is None else a.astype(dtype, copy=False))

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, cond: Cond = None,
                 guidance: float | torch.Tensor | None = None) -> torch.Tensor:
        """eps(x, t, cond): runs the graph, returns `out_sample` on x's device in x's dtype."""
        (out,) = self.session.run([self.output], self.feeds(x, t, cond, guidance))
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)
