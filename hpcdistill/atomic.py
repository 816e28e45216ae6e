"""Atomic file replacement: the one way every file that others may be reading is written.

Data goes to a hidden temporary file in the same directory, is fsync'ed, then os.replace()d onto
the final name (atomic on POSIX), and the directory is fsync'ed so the rename itself is durable.
A reader, on a parallel filesystem or not, sees the old file or the complete new one, never a part.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path):
    """Yield a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
