"""What every probe shares: its command line (``--threads``, ``--json``), the machine line of its report, timing,
CPU sessions of hand-built graphs, loading an export, and turning a user's mistake into one line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

from ...runtime import cpu
from ..machine import run_times

QUARTILES = {"p25": 25, "median": 50, "p75": 75}


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A probe's command line: its module docstring's first paragraph as the description, and the shared options."""
    parsed = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parsed.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    parsed.add_argument("--json", action="store_true", help="print the report as JSON")
    return parsed


def machine(threads: int | None) -> dict[str, Any]:
    """The machine line of a probe's report (bench's `machine_info` without psutil)."""
    import os

    import onnxruntime

    return {**cpu.describe(), "threads": threads or os.cpu_count(), "onnxruntime": onnxruntime.__version__}


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    return median(run_times(fn, repeats, warmup))


def session(model: bytes, threads: int | None, config: dict[str, str] | None = None):
    """An onnxruntime CPU session of a serialized graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def load_export(path: Path, threads: int | None):
    """An export as the product runs it (checksums skipped: a probe reads, it does not judge)."""
    from ...runtime.model import PaliGemma

    return PaliGemma.load(path, threads=threads, verify_checksums=False)


def run(args: argparse.Namespace, measure: Callable[[], dict], text: Callable[[dict], str]) -> None:
    """Measure, then print the report as JSON or as text; a typed error (a wrong path, say) is one line."""
    from ...runtime.errors import PaliGemmaEdgeError

    try:
        report = {"machine": machine(args.threads), **measure()}
    except PaliGemmaEdgeError as error:
        sys.exit(f"error: {error}")
    print(json.dumps(report, indent=1) if args.json else text(report))
