"""Writing files so they appear whole or not at all."""
from __future__ import annotations

import os
import uuid


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file appears whole or not at all.

    The bytes go to a temporary file in the same directory (``.<name>.<random>.tmp``),
    are flushed to disk, and the file is renamed over ``path``: a reader, or a
    rerun after a crash (even SIGKILL or a power cut), sees the old file or the
    new one, never a partial one. A failure removes the temporary file and
    raises the ``OSError``.
    """
    directory, base = os.path.split(os.fspath(path))
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
