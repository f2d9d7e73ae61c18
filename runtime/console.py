"""What a command prints: this project's progress bars, messages and results; other libraries' warnings and logs
only with ``--verbose`` (their errors always).

Our own messages are log records of the ``paligemma_edge`` loggers, printed as plain lines on stderr. A process the
command spawns (the export's torch stage) calls `configure_output()` again and inherits the choice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

VERBOSE_ENV = "PALIGEMMA_EDGE_VERBOSE"


def configure_output(verbose: bool | None = None) -> None:
    """Quiet others (default) or show everything (``verbose``; None: as the parent process chose)."""
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV) == "1"
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    ours = logging.getLogger("paligemma_edge")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    root = logging.getLogger()
    if not root.handlers:  # now, before onnxruntime's quantization tools import: their basicConfig(INFO) is then moot
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.ERROR)
    if verbose:
        os.environ.setdefault("PALIGEMMA_EDGE_LLAMA_LOG", "1")
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers' own handler, read at its import
    warnings.filterwarnings("ignore")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Other libraries' loggers (``loggers``, by name) show only errors while we call them, unless ``--verbose``."""
    if verbose():
        yield
        return
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """A native library's own writes to the process's stderr (file descriptor 2) are dropped while we call it,
    unless ``--verbose``; its errors still reach us as exceptions."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
