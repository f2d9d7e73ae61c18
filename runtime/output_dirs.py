"""Output directories that appear whole or not at all, and never replace a user's files or a source.

A command writes into a hidden temporary directory beside its target (``.NAME.partial-*``) and renames it into
place only when everything (export, verification, checksums, manifest) is done. A failure or Ctrl-C leaves the
target as it was. A non-empty target is refused unless ``overwrite`` is given, and a target that appears while the
command runs (another command writing the same output) is never replaced: the second one fails. What appears has the
permissions the user's umask gives new files (the temporary directory and files start private).

A partial directory is owned by its process through an exclusive lock on ``.NAME.partial-*.lock`` beside it; a
process killed outright (SIGKILL, power loss) leaves both behind, and the next command writing into the same parent
directory finds the lock free and removes them, saying so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import OutputPathError, StorageFullError

log = logging.getLogger(__name__)
STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# numpy's ndarray.tofile reports a write the OS cut short without an errno (the GGUF writer and onnx_ir use it)
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written|problem writing element")
PARTIAL_MARK = ".partial-"
LOCK_SUFFIX = ".lock"


def is_storage_full(error: BaseException) -> bool:
    """A write that ran out of room: a full disk, a quota or a file-size limit (also when only the message says)."""
    if not isinstance(error, OSError):
        return False
    return error.errno in STORAGE_FULL_ERRNOS or (error.errno is None and bool(_SHORT_WRITE.search(str(error))))


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
def owned_partial(target: Path) -> Iterator[Path]:
    """A new, locked ``.NAME.partial-*`` directory beside ``target`` (stale ones of killed processes removed first).
    It is removed on the way out unless it was moved away (published)."""
    parent = target.resolve().parent
    remove_stale_partials(parent)
    work = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}{PARTIAL_MARK}"))
    lock = work.with_name(work.name + LOCK_SUFFIX)
    descriptor = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already when published
        lock.unlink(missing_ok=True)
        os.close(descriptor)


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the partial directories in ``parent`` whose owner is gone (their lock is free); returns them. A partial
    directory without a lock file (an older paligemma-edge's) is named, not removed."""
    removed: list[Path] = []
    try:
        entries = [entry for entry in parent.iterdir() if entry.name.startswith(".") and PARTIAL_MARK in entry.name]
    except OSError:
        return removed
    for entry in entries:
        if entry.name.endswith(LOCK_SUFFIX) or not entry.is_dir() or entry.is_symlink():
            continue
        lock = entry.with_name(entry.name + LOCK_SUFFIX)
        if not lock.is_file():
            log.warning("%s is a partial output of an interrupted run (no owner recorded); remove it by hand", entry)
            continue
        try:
            descriptor = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while its owner lives
        except OSError:
            os.close(descriptor)
            continue
        try:
            size = _tree_bytes(entry)
            shutil.rmtree(entry, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed.append(entry)
            log.info("removed %s: a partial output (%.2f GB) left by an interrupted run", entry, size / 1e9)
        finally:
            os.close(descriptor)
    return removed


@contextlib.contextmanager
def atomic_output_dir(
    target: str | Path, overwrite: bool = False, sources: Sequence[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` in one rename."""
    target = check_output_dir(target, overwrite, sources)
    replacing = target.exists()  # an empty directory, or one the user asked to overwrite
    with owned_partial(target) as work:
        with storage_full_as_typed_error(work, target):
            yield work
        _move_into_place(work, target, replacing)


def _tree_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


@contextlib.contextmanager
def storage_full_as_typed_error(work: str | Path, target: str | Path) -> Iterator[None]:
    """Turn a write that ran out of room under ``work`` (disk, quota, file-size limit) into a StorageFullError
    that says how much was written and how much is free; any other error passes through unchanged."""
    try:
        yield
    except (OSError, OutputPathError) as error:
        # a StorageFullError here came from an output nested inside ``work`` (a scratch step), an OutputPathError
        # from a single file that could not be written: the user's output is ``target``, so the message names it
        cause = error if isinstance(error, OSError) else error.__cause__
        if cause is None or not is_storage_full(cause):
            raise
        assert isinstance(cause, OSError)
        work = Path(work)
        written = _tree_bytes(work) if work.is_dir() else 0
        free = shutil.disk_usage(work if work.exists() else work.parent).free
        reason = os.strerror(cause.errno) if cause.errno else "a write was cut short"
        raise StorageFullError(
            f"writing {target} stopped: {reason} after {written / 1e9:.2f} GB "
            f"({free / 1e9:.2f} GB free on that file system); nothing was left at {target}. Free some space "
            "(or choose an output on another disk) and run the command again."
        ) from cause


def publish_dir(work: str | Path, target: str | Path, overwrite: bool = False) -> Path:
    """Move a finished directory (made beside ``target``) into place, with the checks of `check_output_dir`."""
    target = check_output_dir(target, overwrite)
    _move_into_place(Path(work), target, replacing=target.exists())
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


def _move_into_place(work: Path, target: Path, replacing: bool) -> None:
    """Rename ``work`` to ``target``. A new target is created exclusively: if something appeared there meanwhile
    (another command writing the same output), it stays and this output is refused."""
    share_as_new_files(work)
    if not replacing:
        try:
            os.rename(work, target)  # onto nothing, or an empty directory; never onto another's files
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise OutputPathError(
                f"{target} appeared while this command was writing it (another command writing the same output?); "
                "it was left as it is and this command's output was discarded. Choose another output or run again."
            ) from error
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
