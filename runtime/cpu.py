"""What the CPU is and what this process may run on it: model name, instruction-set flags, AMX granted or not.

A CPU can advertise AMX in CPUID while Linux has not given this process the tile state: AMX code then dies with
SIGILL. `amx_usable` asks the kernel for it (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``), which is
also what makes AMX usable for the rest of the process (oneDNN does the same).
"""

from __future__ import annotations

import ctypes
import functools
import platform

# the instruction-set extensions that decide which kernels run (and which builds crash: AMX advertised, not allowed)
ISA_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "neon",
    "asimd",
    "sve",
)
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18  # x86-64 Linux


def _cpuinfo_field(prefixes: tuple[str, ...]) -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(prefixes):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field(("model name",)) or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The performance-relevant CPU flags the kernel reports (x86 "flags", Arm "Features")."""
    present = set((_cpuinfo_field(("flags", "Features")) or "").split())
    return [flag for flag in ISA_FLAGS if flag in present]


@functools.cache
def amx_usable() -> bool:
    """AMX advertised by the CPU *and* granted to this process by Linux (asked once per process)."""
    if "amx_tile" not in cpu_flags():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def describe() -> dict:
    """The CPU in a report: model, flags, and whether AMX is usable here (not only advertised)."""
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "amx_usable": amx_usable()}
