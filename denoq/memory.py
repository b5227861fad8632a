"""Peak memory of a stretch of work in this process: the resident set's high-water mark on the CPU (Linux: the
kernel's VmHWM, reset through `/proc/self/clear_refs`), torch's `max_memory_allocated` on a CUDA device.

    with PeakMemory() as peak:
        work()
    peak.mb        # the highest RSS (or CUDA allocation) during `work`, MB; None where it cannot be read

The value is the process's absolute peak during the stretch (what a machine must hold), not the growth over the
start; `base_mb` is the level at the start.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_kb(key: str) -> int | None:
    """A `/proc/self/status` field in kB (VmRSS, VmHWM), None off Linux."""
    try:
        lines = _STATUS.read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in lines if line.startswith(key + ":")), None)


class PeakMemory:
    """Context manager measuring the peak CPU RSS (`device` cpu) or CUDA allocation (`device` cuda) inside it."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.base_mb: float | None = None
        self.mb: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_mb = torch.cuda.memory_allocated() / 2**20
            return self
        try:
            _CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
        except OSError:
            return self  # no reset: no honest peak for this stretch
        rss = status_kb("VmRSS")
        self.base_mb = None if rss is None else rss / 1024
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        elif self.base_mb is not None:
            hwm = status_kb("VmHWM")
            self.mb = None if hwm is None else hwm / 1024
