"""The PTQD correction head: correlated-noise and bias correction appended to the model output (docs/architecture.md,
Correction head (PTQD)).

PTQD (He et al., "PTQD: Accurate Post-Training Quantization for Diffusion Models", NeurIPS 2023, arXiv 2305.10657)
splits the quantization noise Δ = ε_q − ε of the noise prediction into a part linearly correlated with the FP
prediction and a residual,

    Δ = k_t · ε + Δ′      ⇒      ε_q = (1 + k_t) · ε + Δ′,

(k_t the least-squares slope of Δ on ε at step t). Its correlated-noise correction divides ε_q by 1 + k_t;
its bias correction subtracts the residual's mean μ_t[c] (per channel), which the calibrator folds into one table
`bias[t, c] = μ_t[c]` (the mean of Δ′, in ε_q's units, removed *before* the division; `denoq.calibrators.ptqd`
measures both tables):

    ε̂ = (ε_q − bias[t]) / (1 + k_t)  =  ε + (Δ′ − μ_t) / (1 + k_t).

What is left, (Δ′ − μ_t)/(1 + k_t), is zero-mean with variance σ_q²(t) per element; the sampler absorbs that variance
into its noise schedule (variance schedule calibration, `denoq.sampling.vsc`).

In the graph (NCHW output `out_sample`, input `timestep` [B] read at its table rows `selector.timestep_rows`, each
sample with its own t):

    out_sample ← Mul(Sub(ε_q, Gather(bias_table, timestep)), Gather(inv_one_plus_k, timestep))
    bias_table: float32 [T, C, 1, 1]  → gathered [B, C, 1, 1]
    inv_one_plus_k = 1 / (1 + k): float32 [T, 1, 1, 1] → gathered [B, 1, 1, 1]

One Gather per table, already shaped for broadcasting, the division stored as a multiply by its reciprocal (one
pointwise op TensorRT fuses). `apply_head` is the reference in the same op order (Sub, then Mul, float32): with the
same ε_q, every executor computes the same two correctly rounded float32 operations per element, so they agree bit
for bit.

No torch here (passes are ONNX only): the tables may be given as torch tensors or numpy arrays, and `apply_head` is
written with operators both support, so the simulation calls it on torch tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import PassResult, PostconditionError, PreconditionError

from denoq.errors import DenoqError
from denoq.passes.infra import InPlace
from denoq.passes.selector import TIMESTEP_INPUT, is_timestep_rows, timestep_rows

HEAD_OUTPUT = "out_sample"


def apply_head(eps_q: Any, t: Any, bias: Any, inv_one_plus_k: Any) -> Any:
    """The head's reference: `(ε_q − bias[t]) · inv_one_plus_k[t]`, in the graph's op order (PTQD's corrections).

    Args:
        eps_q: the model output ε_q, float32 `[B, C, H, W]` (torch tensor or numpy array).
        t: the table rows, int64 `[B]` (same library as `eps_q`), each in [0, T) (`sampling.cond.timestep_index`).
        bias: float32 `[T, C]`, the per-(timestep, channel) mean of the residual Δ′.
        inv_one_plus_k: float32 `[T]`, 1 / (1 + k_t).

    Returns ε̂ `[B, C, H, W]`: Sub, then Mul, each rounded once in float32 when the inputs are float32 (pass the
    tables as the pass stores them, `AppendPtqdHead.tables()`, for a bit-exact comparison with the graph).
    """
    b = bias[t]  # [B, C]
    s = inv_one_plus_k[t]  # [B]
    return (eps_q - b.reshape(*b.shape, 1, 1)) * s.reshape(-1, 1, 1, 1)


def _float32(table: Any, what: str) -> np.ndarray:
    if hasattr(table, "detach"):  # a torch tensor, without importing torch
        table = table.detach().cpu().numpy()
    try:
        with np.errstate(over="ignore"):  # a float64 value beyond float32's range becomes inf: reported below
            arr = np.asarray(table, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DenoqError(f"ptqd head: the {what} table is not numeric ({exc}); pass a float tensor") from exc
    return arr


class AppendPtqdHead(InPlace):
    """Pass: append PTQD's correction head `ε = (ε_q − Gather(bias, t)) · Gather(inv_one_plus_k, t)` to `out_sample`
    (module docstring: PTQD's correlated-noise correction, division by 1 + k_t, and bias correction, subtraction of
    the residual's mean μ_t).

    Args:
        bias: `[T, C]`, the residual's mean per training timestep and output channel (ε_q's units).
        inv_one_plus_k: `[T]`, 1 / (1 + k_t) per training timestep.
        name: prefix of the nodes (`<name>/Sub`, …) and initializers (`<name>.bias`, `<name>.inv_one_plus_k`).

    Invariant established: the graph output `out_sample` (same name, type, shape and position among the outputs)
    is `Mul(Sub(y, Gather(<name>.bias, timestep)), Gather(<name>.inv_one_plus_k, timestep))`, where `y` is the
    previous `out_sample` value (renamed `<name>.eps_q`), `<name>.bias` float32 `[T, C, 1, 1]`,
    `<name>.inv_one_plus_k` float32 `[T, 1, 1, 1]`; both Gathers read the graph input `timestep` (axis 0). Every
    other value, reader of `y` and graph output is unchanged. Tables are checked when the pass is built (shapes,
    equal lengths, finite; DenoqError), the graph by `requires` (a `timestep` input, a float32 rank-4
    `out_sample` with C channels, no head yet; PreconditionError).
    """

    def __init__(self, bias: Any, inv_one_plus_k: Any, name: str = "ptqd_head") -> None:
        self.bias, self.inv_one_plus_k, self.name = bias, inv_one_plus_k, name
        bias = _float32(bias, "bias")
        inv = _float32(inv_one_plus_k, "1/(1+k)")
        if bias.ndim != 2:
            raise DenoqError(f"ptqd head: the bias table has shape {bias.shape}, expected [T, C] (per training "
                             "timestep and output channel); recompute the PTQD statistics")
        if inv.ndim != 1:
            raise DenoqError(f"ptqd head: the 1/(1+k) table has shape {inv.shape}, expected [T] (per training "
                             "timestep); recompute the PTQD statistics")
        if bias.shape[0] != inv.shape[0] or bias.shape[0] == 0:
            raise DenoqError(f"ptqd head: the bias table has {bias.shape[0]} timesteps but 1/(1+k) has "
                             f"{inv.shape[0]}; both must have the scheduler's T entries, recompute the statistics")
        for what, arr in (("bias", bias), ("1/(1+k)", inv)):
            if not np.all(np.isfinite(arr)):
                bad = int(np.argwhere(~np.isfinite(arr))[0][0])
                raise DenoqError(f"ptqd head: the {what} table is not finite in float32 (first at timestep {bad}); "
                                 "recompute the PTQD statistics")
        self._bias, self._inv = bias, inv

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """The float32 tables the graph holds, as `apply_head` takes them: bias `[T, C]`, 1/(1+k) `[T]`."""
        return self._bias.copy(), self._inv.copy()

    def requires(self, model: ir.Model) -> None:
        self._check(model.graph)

    def call(self, model: ir.Model) -> PassResult:
        g = model.graph
        _, y, channels = self._check(g)
        T = self._bias.shape[0]
        t = timestep_rows(g, T, self.name)
        bias_name, inv_name = f"{self.name}.bias", f"{self.name}.inv_one_plus_k"
        bias_table = ir.val(bias_name, const_value=ir.tensor(self._bias.reshape(T, channels, 1, 1), name=bias_name))
        inv_table = ir.val(inv_name, const_value=ir.tensor(self._inv.reshape(T, 1, 1, 1), name=inv_name))
        g.register_initializer(bias_table)
        g.register_initializer(inv_table)

        batch = list(t.shape) if t.shape is not None else None
        f32 = ir.DataType.FLOAT
        bias_b = ir.node("Gather", [bias_table, t], attributes={"axis": 0}, name=f"{self.name}/bias/Gather",
                         outputs=[ir.val(f"{self.name}.bias_b", f32,
                                         None if batch is None else ir.Shape([*batch, channels, 1, 1]))])
        inv_b = ir.node("Gather", [inv_table, t], attributes={"axis": 0}, name=f"{self.name}/inv_one_plus_k/Gather",
                        outputs=[ir.val(f"{self.name}.inv_one_plus_k_b", f32,
                                        None if batch is None else ir.Shape([*batch, 1, 1, 1]))])
        sub = ir.node("Sub", [y, bias_b.outputs[0]], name=f"{self.name}/Sub",
                      outputs=[ir.val(f"{self.name}.debiased", f32, ir.Shape(list(y.shape)))])  # type: ignore[arg-type]
        mul = ir.node("Mul", [sub.outputs[0], inv_b.outputs[0]], name=f"{self.name}/Mul",
                      outputs=[ir.val(f"{self.name}.corrected", f32, ir.Shape(list(y.shape)))])  # type: ignore[arg-type]
        g.extend([bias_b, inv_b, sub, mul])

        out = mul.outputs[0]
        for i, o in enumerate(g.outputs):  # only the graph-output slot moves; other readers of y keep reading y
            if o is y:
                g.outputs[i] = out
        y.name = f"{self.name}.eps_q"
        out.name = HEAD_OUTPUT
        g.sort()
        return PassResult(model, True)

    def ensures(self, model: ir.Model) -> None:
        g = model.graph
        t = next((v for v in g.inputs if v.name == TIMESTEP_INPUT), None)
        out = next((v for v in g.outputs if v.name == HEAD_OUTPUT), None)
        mul = None if out is None else out.producer()
        sub = None if mul is None or mul.inputs[0] is None else mul.inputs[0].producer()
        ok = mul is not None and mul.name == f"{self.name}/Mul" and sub is not None and sub.name == f"{self.name}/Sub"
        for table in (mul.inputs[1], sub.inputs[1]) if ok else ():  # type: ignore[union-attr]
            gather = None if table is None else table.producer()
            ok = ok and gather is not None and gather.op_type == "Gather" and is_timestep_rows(gather.inputs[1], t)
        if not ok:
            raise PostconditionError(f"{HEAD_OUTPUT!r} is not Mul(Sub(ε_q, Gather(bias, timestep)), "
                                     "Gather(1/(1+k), timestep))")

    def _check(self, g: ir.Graph) -> tuple[ir.Value, ir.Value, int]:
        """The `timestep` input, the `out_sample` output and its channel count; PreconditionError on any mismatch."""
        t = next((v for v in g.inputs if v.name == TIMESTEP_INPUT), None)
        if t is None:
            raise PreconditionError(f"the graph has no {TIMESTEP_INPUT!r} input to gather the per-timestep tables "
                                    "with; export the model with its timestep input")
        if t.dtype not in (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.FLOAT):
            raise PreconditionError(f"graph input {TIMESTEP_INPUT!r} is {t.dtype}, the head gathers with an "
                                    "integer or float32 timestep; re-export the model")
        y = next((v for v in g.outputs if v.name == HEAD_OUTPUT), None)
        if y is None:
            names = ", ".join(v.name or "?" for v in g.outputs)
            raise PreconditionError(f"the graph has no {HEAD_OUTPUT!r} output (it has {names}); export the model "
                                    f"with its noise prediction named {HEAD_OUTPUT!r}")
        if y.shape is None or len(y.shape) != 4:
            got = "unknown" if y.shape is None else f"{len(y.shape)} ({list(y.shape)})"
            raise PreconditionError(f"output {HEAD_OUTPUT!r} has rank {got}, the head needs an NCHW noise "
                                    "prediction of rank 4; apply it to image models exported with shape information")
        if y.dtype != ir.DataType.FLOAT:
            raise PreconditionError(f"output {HEAD_OUTPUT!r} is {y.dtype}, the head is built for float32 graphs; "
                                    "append it to the float32 graph, convert to FP16 afterwards")
        channels = y.shape[1]
        if not isinstance(channels, int) or channels != self._bias.shape[1]:
            raise PreconditionError(f"output {HEAD_OUTPUT!r} has {channels} channels but the bias table has "
                                    f"{self._bias.shape[1]}; the statistics come from a different model, recompute "
                                    "them")
        taken = {v.name for v in g.inputs} | set(g.initializers)
        taken |= {o.name for node in g for o in node.outputs}
        mine = {f"{self.name}.{s}" for s in ("bias", "inv_one_plus_k", "bias_b", "inv_one_plus_k_b", "debiased",
                                             "corrected", "eps_q")}
        if taken & mine:
            raise PreconditionError(f"the graph already has values named {sorted(taken & mine)[0]!r} (a PTQD head "
                                    f"named {self.name!r} is already there?); append the head once")
        return t, y, channels
