"""Output directories that appear whole or not at all, and never replace a user's files or a source.

A command writes into a hidden temporary directory beside its target and renames it into place only
when everything (export, verification, checksums, manifest) is done. A failure or Ctrl-C leaves the
target as it was. A non-empty target is refused unless ``overwrite`` is given. What appears has the permissions the
user's umask gives new files (the temporary directory and files start private).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import OutputPathError, StorageFullError

STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output_dir(target: str | Path, overwrite: bool = False, sources: Sequence[str | Path] = ()) -> Path:
    """Raise OutputPathError unless ``target`` can become a new directory: not a file, not a source (or
    inside one, or holding one), empty unless ``overwrite``, in a writable parent. Returns the target."""
    target = Path(target)
    resolved = target.resolve()
    for source in sources:
        source_path = Path(source).resolve()
        if _is_within(resolved, source_path) or _is_within(source_path, resolved):
            raise OutputPathError(
                f"the output {target} is (or overlaps) the input {source}: choose another output directory; "
                "paligemma-edge never writes into its source."
            )
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"the output {target} is a file; give a directory path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputPathError(f"the output {target} exists and is not empty; pass --overwrite to replace it.")
    parent = resolved.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputPathError(f"cannot create {parent} for the output {target}: {error.strerror}.") from error
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write the output {target}: {parent} is not writable.")
    return target


@contextlib.contextmanager
def atomic_output_dir(
    target: str | Path, overwrite: bool = False, sources: Sequence[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` in one rename."""
    target = check_output_dir(target, overwrite, sources)
    work = Path(tempfile.mkdtemp(dir=target.resolve().parent, prefix=f".{target.name}.partial-"))
    try:
        with storage_full_as_typed_error(work, target):
            yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _move_into_place(work, target)


def _tree_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


@contextlib.contextmanager
def storage_full_as_typed_error(work: str | Path, target: str | Path) -> Iterator[None]:
    """Turn a write that ran out of room under ``work`` (disk, quota, file-size limit) into a StorageFullError
    that says how much was written and how much is free; any other error passes through unchanged."""
    try:
        yield
    except (OSError, StorageFullError) as error:
        # a StorageFullError here came from an output nested inside ``work`` (a scratch step): the user's
        # output is ``target``, so the message names it
        cause = error.__cause__ if isinstance(error, StorageFullError) else error
        if not isinstance(cause, OSError) or cause.errno not in STORAGE_FULL_ERRNOS:
            raise
        work = Path(work)
        written = _tree_bytes(work) if work.is_dir() else 0
        free = shutil.disk_usage(work if work.exists() else work.parent).free
        raise StorageFullError(
            f"writing {target} stopped: {os.strerror(cause.errno)} after {written / 1e9:.2f} GB "
            f"({free / 1e9:.2f} GB free on that file system); nothing was left at {target}. Free some space "
            "(or choose an output on another disk) and run the command again."
        ) from cause


def publish_dir(work: str | Path, target: str | Path, overwrite: bool = False) -> Path:
    """Move a finished directory (made beside ``target``) into place, with the checks of `check_output_dir`."""
    target = check_output_dir(target, overwrite)
    _move_into_place(Path(work), target)
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode the user's umask gives a new file (0o644 under the usual umask 022)."""
    return 0o666 & ~_umask()


def share_as_new_files(directory: Path) -> None:
    """Give ``directory`` and everything in it the modes the umask gives new directories and files (an executable
    file stays one): `tempfile` makes its directories and files private (0o700, 0o600), so an export made by one
    account could not be read by a server running as another."""
    mask = _umask()
    for path in (directory, *directory.rglob("*")):
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def _move_into_place(work: Path, target: Path) -> None:
    share_as_new_files(work)
    if not target.exists():
        os.rename(work, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)  # only an empty directory, or one the user asked to overwrite
    os.rename(work, target)
    shutil.rmtree(old, ignore_errors=True)


def check_output_file(path: str | Path) -> Path:
    """A file output (a drawing, a JSON report) must go into an existing, writable directory."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory; give a file path.")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {path}: the directory {parent} does not exist.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {path}: {parent} is not writable.")
    return path
