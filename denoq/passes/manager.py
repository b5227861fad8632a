"""Run a pipeline of passes on onnx-ir's `PassManager` (docs/architecture.md, Contracts: Passes).

`PassManager(passes, verify)(model_proto)` is the thin denoq layer around `onnx_ir.passes.PassManager`:

- the protobuf model is converted to an `ir.Model` once, at the start of the pipeline, and back once, at the end;
  the passes in between all edit that one `ir.Model` (the input `ModelProto` is never modified);
- a `Sequential` among `passes` (`InsertQDQ` is one) is flattened, so every pass it holds is run, recorded and
  checked on its own;
- each pass runs inside a `_Step` (itself an onnx-ir pass) that records what it did (`PassRecord`: nodes added and
  removed by op type, initializers, seconds) and, with `verify` (debug mode; every compile verifies), checks the
  graph after it: `onnx.checker.check_model(full_check=True)` and strict shape inference with data propagation,
  on a protobuf snapshot of the `ir.Model` (the checker reads protobuf; the snapshot is read, never converted
  back). The input model is checked the same way before the first pass;
- errors leave as one-line `DenoqError`s: a pass's own `DenoqError` (a plan that does not fit the graph) as it is,
  onnx-ir's `PreconditionError` / `PostconditionError` as "pass 'NAME' refused its input: …" / "… broke its own
  postcondition: …", a graph the checker rejects as "pass 'NAME' produced an invalid ONNX graph (…)".
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import onnx_ir as ir
from onnx_ir.passes import InvariantError, PassBase, PassResult, PostconditionError, Sequential

from denoq.errors import DenoqError
from denoq.onnxio import check_and_infer
from denoq.passes.infra import pass_name

log = logging.getLogger(__name__)


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


def _census(model: ir.Model) -> tuple[Counter[str], set[str]]:
    return Counter(n.op_type for n in model.graph), set(model.graph.initializers)


def _one_line(exc: object, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " …"


def verify(model: onnx.ModelProto, where: str) -> None:
    """`onnx.checker` (full check) and strict shape inference; DenoqError naming `where` when either fails."""
    try:
        check_and_infer(model, check=True, strict=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise DenoqError(f"{where} produced an invalid ONNX graph ({_one_line(exc)}); fix that pass or its "
                         "input") from exc


def _cause(exc: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type `kind` in `exc`'s chain of causes (itself included)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


class _Step(PassBase):
    """Runs one pass, records what it did into `records` and, with `verify`, checks the graph after it."""

    def __init__(self, inner: PassBase, verify: bool, records: list[PassRecord]) -> None:
        self.inner, self.verify, self.records, self.name = inner, verify, records, pass_name(inner)

    @property
    def in_place(self) -> bool:
        return self.inner.in_place

    @property
    def changes_input(self) -> bool:
        return self.inner.changes_input

    def __str__(self) -> str:
        return self.name

    def call(self, model: ir.Model) -> PassResult:
        ops, inits = _census(model)
        start = time.perf_counter()
        try:
            result = self.inner(model)
        except InvariantError as exc:
            own = _cause(exc, DenoqError)
            if own is not None:  # a plan that does not fit the graph: the binding's own one-line message
                raise own from own.__cause__
            what = "refused its input" if not isinstance(exc, PostconditionError) else "broke its own postcondition"
            cause = exc.__cause__  # onnx-ir wraps an unexpected error in requires / ensures: name it
            why = exc if cause is None else f"{exc} ({type(cause).__name__}: {cause})"
            raise DenoqError(f"pass {self.name!r} {what}: {_one_line(why)}") from exc
        seconds = time.perf_counter() - start
        ops_after, inits_after = _census(result.model)
        self.records.append(PassRecord(name=self.name, seconds=seconds, nodes_added=dict(ops_after - ops),
                                       nodes_removed=dict(ops - ops_after),
                                       initializers_added=len(inits_after - inits),
                                       initializers_removed=len(inits - inits_after)))
        log.debug("pass %s", self.records[-1].summary())
        if self.verify:
            verify(ir.to_proto(result.model), f"pass {self.name!r}")
        return result


def flatten(passes: Sequence[PassBase]) -> list[PassBase]:
    """`passes` with every `Sequential` (not onnx-ir's `PassManager`, which may repeat) replaced by its passes."""
    out: list[PassBase] = []
    for p in passes:
        if isinstance(p, Sequential) and not isinstance(p, ir.passes.PassManager):
            out += flatten(p.passes)
        elif isinstance(p, PassBase):
            out.append(p)
        else:
            raise TypeError(f"{pass_name(p)} is not an onnx-ir pass (onnx_ir.passes.PassBase); denoq's passes are")
    return out


@dataclass(frozen=True)
class PassManager:
    """Runs `passes` in order on a model: `(final model, one PassRecord per pass)` (module docstring).

    With `verify` (debug mode) the input and the result of every pass are checked with
    `onnx.checker.check_model(full_check=True)` and strict shape inference, and the first failure raises a
    DenoqError naming the pass that broke the graph. The input model is never modified.
    """

    passes: Sequence[PassBase]
    verify: bool = False

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassRecord]]:
        if self.verify:
            verify(model, "the input model (before any pass)")
        records: list[PassRecord] = []
        steps = [_Step(p, self.verify, records) for p in flatten(self.passes)]
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # onnx-ir wraps the proto's tensors: work on a copy, leave the input as it is
        ir_model = ir.from_proto(copy)
        if steps:
            try:
                ir_model = ir.passes.PassManager(steps, steps=1, early_stop=False)(ir_model).model
            except ir.passes.PassError as exc:  # onnx-ir wraps each failure; the first DenoqError is ours
                own = _cause(exc, DenoqError)
                if own is None:
                    raise
                raise own from own.__cause__
        return ir.to_proto(ir_model), records
