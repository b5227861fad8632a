"""Run a command as if on an older x86 CPU: `cpuid` answers without AVX-512 / VNNI, so ONNX Runtime, numpy and torch
pick the kernels of that level and run them at native speed.

    python tools/cpu_as.py avx2 -- python -m pytest -q -m "slow or not slow"
    python tools/cpu_as.py avx2 -- python tools/bench.py --models big --skip-quality

Levels: `avx2` (no AVX-512, no VNNI: Haswell to Comet Lake, Zen 1 to 3) and `avx512bw` (AVX-512 without VNNI:
Skylake-SP). It builds `cpuid_mask.c` with the system C compiler into a preloaded library that turns on Linux's
CPUID faulting (`arch_prctl(ARCH_SET_CPUID)`) and answers every `cpuid` with the real values less the masked
features. It needs an x86-64 Linux whose CPU offers CPUID faulting (`cpuid_fault` in /proc/cpuinfo) and `cc`;
`unavailable()` says why not where it does not work. pytest's faulthandler plugin would take over the SIGSEGV
that `cpuid` raises, so it is turned off through PYTEST_ADDOPTS. `denoq.cpu.isa_level()` reports the masked level.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cpuid_mask.c")
LEVELS = ("avx2", "avx512bw")


@functools.lru_cache(maxsize=1)
def _build() -> Path | str:
    """The built library, or why it cannot be built."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs x86-64 Linux (this is {platform.system()} {platform.machine()})"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "needs a C compiler (cc / gcc)"
    lib = Path(tempfile.mkdtemp(prefix="denoq-cpuid-")) / "cpuid_mask.so"
    done = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(SOURCE)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        return f"{cc} could not build {SOURCE.name}: {done.stderr.strip()[:200]}"
    probe = subprocess.run(["true"], env={**os.environ, "LD_PRELOAD": str(lib)}, capture_output=True, text=True,
                           check=False)
    if probe.returncode != 0:
        return probe.stderr.strip() or f"the preloaded library fails (exit {probe.returncode})"
    return lib


def unavailable() -> str | None:
    """None where this machine can imitate an older CPU, else the reason it cannot."""
    built = _build()
    return built if isinstance(built, str) else None


def masked_env(level: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the library preloaded for `level`. RuntimeError where unavailable."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; use one of {', '.join(LEVELS)}")
    built = _build()
    if isinstance(built, str):
        raise RuntimeError(f"cannot imitate an older CPU here: {built}")
    out = dict(os.environ if env is None else env)
    out["LD_PRELOAD"] = " ".join(p for p in (str(built), out.get("LD_PRELOAD", "")) if p)
    out["DENOQ_CPUID_LEVEL"] = level
    out["PYTEST_ADDOPTS"] = " ".join(p for p in (out.get("PYTEST_ADDOPTS", ""), "-p no:faulthandler") if p)
    out.pop("PYTHONFAULTHANDLER", None)
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in LEVELS or argv[1] != "--":
        print(f"usage: python tools/cpu_as.py {{{','.join(LEVELS)}}} -- COMMAND [ARGS ...]", file=sys.stderr)
        return 2
    try:
        env = masked_env(argv[0])
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return subprocess.run(argv[2:], env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
