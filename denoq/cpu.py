"""The x86 instruction-set level this process sees, as ONNX Runtime's integer kernels (MLAS) choose by it.

MLAS picks its u8×s8 GEMM kernel from `cpuid` at start-up. Without VNNI (AVX2, and AVX-512 without VNNI) the
kernel multiplies with `vpmaddubsw`, which adds each *pair* of u8·s8 products into a signed 16-bit lane with
saturation: |255·127 + 255·127| = 64770 > 32767, so large activations against large weights come out clipped.
VNNI (`vpdpbusd`) sums straight into 32 bits. `isa_level()` reads `cpuid` itself (not /proc/cpuinfo), so it
reports what the kernels in this process see, also when `cpuid` is masked to imitate another CPU
(`tools/cpu_as.py`).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform

# x86-64 System V: cpuid(leaf=edi, subleaf=esi, out=rdx) stores eax, ebx, ecx, edx at out[0..3].
_CPUID_CODE = bytes([
    0x53,                    # push rbx
    0x89, 0xF8,              # mov eax, edi
    0x89, 0xF1,              # mov ecx, esi
    0x49, 0x89, 0xD0,        # mov r8, rdx
    0x0F, 0xA2,              # cpuid
    0x41, 0x89, 0x00,        # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,  # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,  # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,  # mov [r8+12], edx
    0x5B,                    # pop rbx
    0xC3,                    # ret
])

#: Levels, best first, and whether ORT's u8×s8 kernels saturate 16-bit pair sums on them.
SATURATES = {"avx512-vnni": False, "avx-vnni": False, "avx512bw": True, "avx2": True, "sse": True}


def _cpuid_fn() -> tuple[mmap.mmap, ctypes._CFuncPtr]:
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_CPUID_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32 * 4))(address)
    return page, fn


def _bit(value: int, bit: int) -> bool:
    return bool(value >> bit & 1)


@functools.lru_cache(maxsize=1)
def isa_level() -> str:
    """`avx512-vnni`, `avx-vnni`, `avx512bw` (AVX-512 without VNNI), `avx2`, `sse`, or the machine name
    (`aarch64`, …) off x86-64."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return platform.machine().lower() or "unknown"
    page, cpuid = _cpuid_fn()
    try:
        regs = (ctypes.c_uint32 * 4)()
        cpuid(0, 0, ctypes.byref(regs))
        max_leaf = regs[0]
        if max_leaf < 7:
            return "sse"
        cpuid(7, 0, ctypes.byref(regs))
        ebx, ecx = regs[1], regs[2]
        cpuid(7, 1, ctypes.byref(regs))
        eax1 = regs[0]
    finally:
        del cpuid
        page.close()
    if _bit(ebx, 16) and _bit(ebx, 30):  # AVX512F, AVX512BW
        return "avx512-vnni" if _bit(ecx, 11) else "avx512bw"
    if _bit(ebx, 5):  # AVX2
        return "avx-vnni" if _bit(eax1, 4) else "avx2"
    return "sse"


def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's u8×s8 integer kernels saturate 16-bit pair sums on this CPU (no VNNI)."""
    return SATURATES.get(isa_level(), False)


def cpu_record() -> dict[str, str | bool]:
    """What a manifest or a benchmark records of the CPU: its model name, the ISA level the kernels see, and
    whether the u8×s8 kernels saturate there."""
    return {"model": cpu_model(), "isa": isa_level(), "u8s8_saturates": u8s8_saturates()}


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo` on Linux, `platform.processor()` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
