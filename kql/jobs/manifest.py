"""The output folder of a multi-image query: its manifest, its lock and its
result files.

The manifest is ``manifest.jsonl``: one JSON object per line, one line per
image attempt (``"status": "ok"`` or ``"failed"``), appended as each image
finishes. JSON Lines rather than Parquet or SQLite because:

- appending one line is the natural unit of progress for a job that may be
  killed at any moment: each line is written with one ``write`` and flushed
  to disk before the next image is counted as done, so a crash leaves at
  worst a torn *last* line, which has no newline, never parses, and is cut
  off before the next run appends (:meth:`Manifest.repair`);
- rewriting a whole file per image (the temp-file-and-rename way) would cost
  O(images²) bytes over a large backlog; Parquet cannot be appended in place
  and needs pyarrow; SQLite is crash-safe too but binary, so a clinic's
  ``grep failed manifest.jsonl`` or ``pandas.read_json(..., lines=True)``
  would need a client.

The heatmap (``.npy``) and overlay (``.png``) files are written whole or not
at all (:func:`kql.result.write_atomic`) *before* the image's manifest line,
and the line records their SHA-256, so a rerun trusts a result only when the
line, the files and their hashes all agree (:func:`valid`).
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator, Optional

from kql.errors import ExecutionError, PlanError

MANIFEST = "manifest.jsonl"
LOCK = ".kql.lock"
_TMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # kql.result.write_atomic's temporary files


def sha256_bytes(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> Optional[str]:
    """The file's SHA-256, or None when it cannot be read."""
    import hashlib
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def read_records(path: str) -> Iterator[dict]:
    """The complete records of a manifest, in order. A line that is torn
    (no newline: the writer died in it) or not a JSON object is skipped."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def valid(record: dict, folder: str, query_key: str, image_sha256: str) -> bool:
    """Whether ``record`` is a finished result of this query for this image
    content whose files are on disk, whole and unchanged."""
    if record.get("status") != "ok" or record.get("query_key") != query_key:
        return False
    if record.get("sha256") != image_sha256:
        return False
    for key in ("heatmap", "overlay"):
        name = record.get(key)
        if not isinstance(name, str) or os.path.basename(name) != name:
            return False
        if sha256_file(os.path.join(folder, name)) != record.get(key + "_sha256"):
            return False
    return True


class OutputFolder:
    """An ``INTO`` folder held by one job: locked, cleaned of temporary files
    a killed job left, and with its manifest open for appending.

    Use as a context manager; the lock (``fcntl.flock`` on ``.kql.lock``) is
    released on exit, and by the kernel if the process dies.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.manifest_path = os.path.join(folder, MANIFEST)
        self._lock_fd: Optional[int] = None
        self._manifest = None

    def __enter__(self) -> "OutputFolder":
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as e:
            raise ExecutionError(f"cannot create folder '{self.folder}': {e.strerror or e}") from e
        self._lock()
        try:
            for name in os.listdir(self.folder):
                if _TMP.match(name):     # a write a killed job never finished
                    try:
                        os.unlink(os.path.join(self.folder, name))
                    except OSError:
                        pass
            self.repair()
            self._manifest = open(self.manifest_path, "ab")
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._manifest is not None:
            self._manifest.close()
            self._manifest = None
        self._unlock()

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no protection against a second job
            return
        fd = os.open(os.path.join(self.folder, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise PlanError(f"another job is writing into '{self.folder}' (it holds "
                            f"'{os.path.join(self.folder, LOCK)}'); wait for it or choose another "
                            f"INTO folder") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)     # closing releases the flock
            self._lock_fd = None

    def repair(self) -> None:
        """Cut a torn last line off the manifest, so the next append starts a line."""
        try:
            with open(self.manifest_path, "rb+") as f:
                size = f.seek(0, os.SEEK_END)
                if size == 0:
                    return
                f.seek(size - 1)
                if f.read(1) == b"\n":
                    return
                # find the last newline; everything after it is a partial record
                pos = size
                while pos > 0:
                    step = min(1 << 16, pos)
                    f.seek(pos - step)
                    chunk = f.read(step)
                    i = chunk.rfind(b"\n")
                    if i >= 0:
                        f.truncate(pos - step + i + 1)
                        return
                    pos -= step
                f.truncate(0)
        except FileNotFoundError:
            return

    def append(self, record: dict) -> None:
        """Add one record as one line, flushed to disk before returning."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            self._manifest.write(line)
            self._manifest.flush()
            os.fsync(self._manifest.fileno())
        except OSError as e:
            raise ExecutionError(f"cannot write '{self.manifest_path}': {e.strerror or e}") from e

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)
