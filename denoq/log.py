"""denoq's messages and progress bars, on the standard `logging` module.

Every module logs through `logging.getLogger(__name__)` (all under the `denoq` logger) and wraps long loops in
`bar(...)`, a tqdm bar labelled by what it runs. A bar is shown exactly when the `denoq` logger would emit an INFO
message, so one switch governs both: the command line's `--quiet`, `denoq.quantize(progress=False)`, or the
user's own logging configuration (`logging.getLogger("denoq").setLevel(logging.WARNING)`). As a library with no
configuration of its own, denoq follows Python's default (warnings only, no bars); `verbose()` is what the command
line and `denoq.quantize` use to show INFO messages (stdout) and bars (stderr).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

ROOT = "denoq"
T = TypeVar("T")


def shown() -> bool:
    """Whether INFO messages (and so progress bars) of denoq reach a handler."""
    return logging.getLogger(ROOT).isEnabledFor(logging.INFO)


def bar(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
        leave: bool = True) -> tqdm:
    """A tqdm progress bar over `iterable` labelled `desc`, disabled unless `shown()`."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=not shown(), file=sys.stderr)


class _Handler(logging.StreamHandler):
    """Writes `[denoq] message` lines through tqdm, so that a message does not tear a bar in two: what denoq
    reports on stdout, warnings on stderr (where the bars and a failed command's one `error:` line go)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("[denoq] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr if record.levelno >= logging.WARNING else sys.stdout)
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)


@contextlib.contextmanager
def verbose(on: bool = True) -> Iterator[None]:
    """Within the block, denoq's INFO messages and bars are shown (`on`) or are silenced (`not on`). A handler
    the user configured on the `denoq` logger stays; ours is added only when there is none, and the logger's
    level and handlers are restored afterwards."""
    logger = logging.getLogger(ROOT)
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    if on and not logger.handlers:
        logger.addHandler(_Handler())
        logger.propagate = False
    logger.setLevel(logging.INFO if on else logging.WARNING)
    try:
        yield
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
