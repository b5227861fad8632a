"""denoq's passes on onnx-ir's pass infrastructure (`onnx_ir.passes`): the base classes every pass derives from.

A pass is an onnx-ir pass (`InPlacePass`: it edits the `ir.Model` it is given and returns it) with one job, a
`name` for logs, records and errors, and a docstring naming the invariant it establishes. The invariant is checked
in the pass itself: `requires` raises onnx-ir's `PreconditionError` for a graph the pass cannot rewrite, `ensures`
raises `PostconditionError` when the rewrite did not establish what it promises; `PassManager`
(`denoq.passes.manager`) turns either into a one-line `DenoqError` naming the pass. A mismatch between the graph
and the QuantPlan is a user error with a fix, raised as `DenoqError` as it is (`denoq.passes.binding`).

Calling a pass (or a `Sequential` of them, `InsertQDQ`) on an `onnx.ModelProto` instead of an `ir.Model` runs it
as a one-pass pipeline through `PassManager` and returns the `ModelProto` (the input is not modified): the form
the tests and tools use, `InsertQDQ(plan)(model)`.
"""

from __future__ import annotations

from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes import PostconditionError, PreconditionError

__all__ = ["DenoqPass", "InPlace", "PostconditionError", "PreconditionError", "pass_name"]


def pass_name(p: object) -> str:
    """A pass's name for logs and errors: its `name` attribute, else its class name."""
    name = getattr(p, "name", None)
    return name if isinstance(name, str) and name else type(p).__name__


class DenoqPass(ir.passes.PassBase):
    """Mixin for denoq's passes: a `name`, and `__call__` also taking an `onnx.ModelProto` (module docstring)."""

    name: str = ""

    def __call__(self, model_or_result: Any, /) -> Any:
        if isinstance(model_or_result, onnx.ModelProto):
            from denoq.passes.manager import PassManager

            return PassManager([self])(model_or_result)[0]
        return super().__call__(model_or_result)

    def __str__(self) -> str:
        return pass_name(self)


class InPlace(DenoqPass, ir.passes.InPlacePass):
    """An in-place denoq pass: `call` edits the model and returns `PassResult(model, modified)`."""
