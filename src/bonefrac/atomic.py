"""Files written whole or not at all: a crash, a kill -9 or a full disk never leaves half a file behind.

    with atomic_open(path, "w") as handle: ...   write through a handle
    write_atomic(path, text_or_bytes)            write a whole text or bytes at once

Both write to a temporary file in the same folder (same file system, so the rename is atomic), flush and fsync it,
then `os.replace` it over `path` and fsync the folder. A reader sees the old file or the new one, never a mixture:
what a run's files (run.py), an export (export.py) and every report, CSV and plot bonefrac writes for a user rely on.
The temporary file is removed when the write fails.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

# mkstemp creates files readable by the owner only; a finished file gets the mode open() would have given it.
# Read once, at import (os.umask can only be read by setting it).
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", *, encoding: str | None = None,
                newline: str | None = None) -> Iterator[IO]:
    """A handle ("w" text or "wb" bytes) whose content replaces `path` only when the block ends without an error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        text = {"encoding": encoding or "utf-8", "newline": newline} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, _FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically; return the path."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as handle:
        handle.write(data)
    return Path(path)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
