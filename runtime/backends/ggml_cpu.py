"""Which of llama.cpp's CPU kernels this process runs.

`make setup` builds llama-cpp-python with ggml's backends as loadable modules and every x86-64 CPU variant
(``GGML_BACKEND_DL``, ``GGML_CPU_ALL_VARIANTS``): ``libggml-cpu-haswell.so``, ``-skylakex``, ``-zen4``,
``-sapphirerapids`` … beside ``libllama.so``. Before llama.cpp initialises (which would load whatever ggml finds
in the working directory), this module loads the best variant this CPU runs, by ggml's own score (0: the CPU lacks
an instruction the variant needs), but never one with AMX code unless Linux has granted this process the AMX tile
state (`cpu.amx_usable`): such code would die with SIGILL. Other backend modules there (CUDA, Vulkan …) are loaded
too. ``PALIGEMMA_EDGE_LLAMA_CPU=NAME`` picks a variant by name (to compare kernels on one machine); one this CPU
cannot run is refused. A build with its CPU code linked in (no variants) is used as it is.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from ..cpu import amx_usable
from ..errors import BackendBuildError

VARIANT_ENV = "PALIGEMMA_EDGE_LLAMA_CPU"
_CPU_MODULE_PREFIX = "libggml-cpu"
_NOT_BACKEND_MODULES = ("libggml-base",)  # libggml-*.so files that are libraries, not backend modules


@dataclass(frozen=True)
class CpuVariant:
    """One module of ggml's CPU code: its name, ggml's score here (0: the CPU lacks an instruction it needs),
    whether it has AMX code, and so whether this process may run it."""

    name: str
    path: Path
    score: int
    amx: bool
    runs_here: bool


@dataclass(frozen=True)
class CpuChoice:
    """What was loaded and what it was chosen from (``variant`` None: the CPU code is linked into the build)."""

    variant: CpuVariant | None
    variants: tuple[CpuVariant, ...]

    def describe(self) -> str:
        if self.variant is None:
            return "CPU code linked in (no variants)"
        scores = ", ".join(f"{v.name} {v.score}" if v.runs_here else f"{v.name} ✗" for v in self.variants)
        skipped = [v.name for v in self.variants if v.score > 0 and not v.runs_here]  # only AMX makes these
        amx_note = f"; {', '.join(skipped)} skipped: AMX advertised, not granted" if skipped else ""
        return f"CPU variant {self.variant.name} (ggml scores: {scores}{amx_note})"


def _variant_name(path: Path) -> str:
    stem = path.name.split(".so")[0]
    return stem[len(_CPU_MODULE_PREFIX) + 1 :] or "cpu"


def _probe(path: Path) -> CpuVariant:
    """ggml's score for this CPU and whether the module was built with AMX: both compile-time answers of the
    module (no code of its instruction set runs)."""
    module = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
    score_fn = getattr(module, "ggml_backend_score", None)  # absent: a module built for this machine (ggml: runs)
    score = int(score_fn()) if score_fn else 1
    amx = bool(module.ggml_cpu_has_amx_int8())
    return CpuVariant(_variant_name(path), path, score, amx, runs_here=score > 0 and (not amx or amx_usable()))


def cpu_variants(lib_dir: Path) -> tuple[CpuVariant, ...]:
    """The CPU modules installed in ``lib_dir``, best score first."""
    paths = sorted(lib_dir.glob(f"{_CPU_MODULE_PREFIX}*.so"))
    return tuple(sorted((_probe(path) for path in paths), key=lambda v: (-v.score, v.name)))


def choose(variants: tuple[CpuVariant, ...], wanted: str | None, asked_by: str = VARIANT_ENV) -> CpuVariant:
    """The variant named ``wanted`` (by the option ``asked_by``), else the best-scored one this process may run;
    refused if it may not."""
    names = ", ".join(v.name for v in variants)
    if wanted:
        match = [v for v in variants if v.name == wanted]
        if not match:
            raise BackendBuildError(f"{asked_by}={wanted}: no such llama.cpp CPU variant here (installed: {names}).")
        if not match[0].runs_here:
            why = "needs AMX, which Linux has not granted" if match[0].score else "needs instructions it lacks"
            raise BackendBuildError(f"{asked_by}={wanted}: this CPU cannot run that variant ({why}).")
        return match[0]
    usable = [v for v in variants if v.runs_here]
    if not usable:
        raise BackendBuildError(f"none of llama.cpp's CPU variants runs on this CPU (installed: {names}).")
    return max(usable, key=lambda v: v.score)


def _ggml_path(lib_dir: Path) -> Path | None:
    """libggml's file as libllama loads it, by its soname (libggml.so.0): a wheel holds copies, not links, of
    libggml.so*, and each copy opened is a backend registry of its own. None: not a Linux build."""
    sonames = sorted(lib_dir.glob("libggml.so.*"), key=lambda path: len(path.name))
    return sonames[0] if sonames else None


def load_backends(lib_dir: Path) -> CpuChoice:
    """Register the best CPU variant (and any other backend module) with ggml, once, before llama.cpp starts."""
    ggml_path = _ggml_path(lib_dir)
    if ggml_path is None:  # macOS, Windows: llama.cpp's own loading
        return CpuChoice(None, ())
    ggml = ctypes.CDLL(str(ggml_path))
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    if ggml.ggml_backend_reg_count():  # CPU code linked in, or loaded already
        return CpuChoice(None, ())
    variants = cpu_variants(lib_dir)
    if not variants:
        raise BackendBuildError(f"this llama-cpp-python has no CPU code in {lib_dir}; reinstall it: make setup.")
    chosen = choose(variants, os.environ.get(VARIANT_ENV))
    if not ggml.ggml_backend_load(str(chosen.path).encode()):
        raise BackendBuildError(f"ggml could not load its CPU module {chosen.path}; reinstall: make setup.")
    for path in sorted(lib_dir.glob("libggml-*.so")):
        if not path.name.startswith((_CPU_MODULE_PREFIX, *_NOT_BACKEND_MODULES)):
            ggml.ggml_backend_load(str(path).encode())  # a GPU module; NULL if it finds no device
    return CpuChoice(chosen, variants)
