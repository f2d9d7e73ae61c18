"""`label`'s output file as a journal: records appended and flushed to disk as images finish, so nothing finished
is lost to Ctrl-C, SIGKILL or a power cut, and `--resume` continues where the file ends — without duplicates or
gaps. One job writes a file at a time (an exclusive lock on it)."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..runtime.errors import OutputPathError


class Journal:
    """JSON Lines at ``path``: with ``resume``, the records already there are kept (a last line cut short by a
    kill is dropped) and `done` holds their ids; a file that exists otherwise is refused unless ``overwrite``."""

    def __init__(self, path: str | Path, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        if self.path.is_dir():
            raise OutputPathError(f"{self.path} is a directory; give the JSONL file to write.")
        if self.path.exists() and not (resume or overwrite):
            raise OutputPathError(
                f"{self.path} exists: --resume continues that job, --overwrite starts it again (and replaces it)."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")  # noqa: SIM115 (appended to until close; its lock is the job's)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise OutputPathError(f"another label job is writing {self.path}.") from None
        self.done: set[str] = set()  # ids of the records in the file
        if resume:
            self.done = {record["id"] for record in self._recover()}
        else:  # --overwrite: the old records go, the new ones start an empty file
            self._file.truncate(0)

    def _recover(self) -> list[dict]:
        """The whole records of the file; a trailing line a kill cut short is cut off the file."""
        self._file.seek(0)
        data = self._file.read()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            self._file.truncate(len(whole))
        records = []
        for number, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or "id" not in record:
                raise OutputPathError(f"{self.path}:{number} is not a label record; is it the file of this job?")
            records.append(record)
        return records

    def records(self) -> Iterator[dict]:
        """Every record in the file (read back: a COCO file is made from them at the end)."""
        with open(self.path, encoding="utf-8") as file:
            for line in file:
                yield json.loads(line)

    def append(self, records: list[dict]) -> None:
        """Write the records and flush them to disk: when this returns, they survive a kill."""
        if not records:
            return
        lines = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
        self._file.write(lines.encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.update(record["id"] for record in records)

    def close(self) -> None:
        self._file.close()  # and with it the lock

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
