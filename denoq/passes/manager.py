"""Run passes in order, optionally verifying the graph after each one (DESIGN.md, Contracts: Passes)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx

from denoq.errors import DenoqError
from denoq.onnxio import check_and_infer

Pass = Callable[[onnx.ModelProto], onnx.ModelProto]


def pass_name(p: Pass) -> str:
    """A pass's name for logs and errors: its `name` attribute, else its function or class name."""
    name = getattr(p, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(p, "__name__", type(p).__name__)


@dataclass(frozen=True)
class PassRecord:
    """What one pass did, for logs: node counts by op type added and removed, initializers, time."""

    name: str
    seconds: float
    nodes_added: dict[str, int]
    nodes_removed: dict[str, int]
    initializers_added: int
    initializers_removed: int

    def summary(self, timed: bool = True) -> str:
        """One line: the node and initializer counts, and (`timed`) the time it took."""
        def fmt(d: dict[str, int]) -> str:
            return ", ".join(f"{k}×{v}" for k, v in sorted(d.items())) or "none"

        return (f"{self.name}: +[{fmt(self.nodes_added)}] -[{fmt(self.nodes_removed)}] initializers "
                f"+{self.initializers_added}/-{self.initializers_removed}"
                + (f" in {self.seconds:.2f}s" if timed else ""))


def _record(name: str, seconds: float, before: onnx.ModelProto, after: onnx.ModelProto) -> PassRecord:
    ops_before = Counter(n.op_type for n in before.graph.node)
    ops_after = Counter(n.op_type for n in after.graph.node)
    inits_before = {i.name for i in before.graph.initializer}
    inits_after = {i.name for i in after.graph.initializer}
    return PassRecord(name=name, seconds=seconds, nodes_added=dict(ops_after - ops_before),
                      nodes_removed=dict(ops_before - ops_after),
                      initializers_added=len(inits_after - inits_before),
                      initializers_removed=len(inits_before - inits_after))


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " …"


def verify(model: onnx.ModelProto, where: str) -> None:
    """`onnx.checker` (full check) and strict shape inference; DenoqError naming `where` when either fails."""
    try:
        check_and_infer(model, check=True, strict=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise DenoqError(f"{where} produced an invalid ONNX graph ({_one_line(exc)}); fix that pass or its "
                         "input") from exc


@dataclass(frozen=True)
class PassManager:
    """Runs `passes` in order on a model: `(final model, one PassRecord per pass)`.

    With `verify` (debug mode) the input and the result of every pass are checked with
    `onnx.checker.check_model(full_check=True)` and strict shape inference, and the first failure raises a
    DenoqError naming the pass that broke the graph. The input model is never modified.
    """

    passes: Sequence[Pass]
    verify: bool = False

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassRecord]]:
        if self.verify:
            verify(model, "the input model (before any pass)")
        records = []
        for p in self.passes:
            name = pass_name(p)
            start = time.perf_counter()
            result = p(model)
            seconds = time.perf_counter() - start
            if not isinstance(result, onnx.ModelProto):
                raise TypeError(f"pass {name!r} returned {type(result).__name__}, not an onnx.ModelProto")
            if self.verify:
                verify(result, f"pass {name!r}")
            records.append(_record(name, seconds, model, result))
            model = result
        return model, records
