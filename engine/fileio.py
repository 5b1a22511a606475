"""Atomic, durable file replacement for checkpoints, models and poison sets."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["publish", "fsync_dir", "default_mode"]


def default_mode() -> int:
    """The mode a new regular file gets under the current umask (0o666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry to disk (best effort: not every platform or file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished file ``tmp`` onto ``path`` atomically and durably.

    The file gets the permissions of a newly created file (writers such as safetensors create
    their output readable by the owner only), is flushed to disk, and replaces ``path`` in one
    rename, so a crash leaves either the old or the new file, never a torn one.
    """
    tmp, path = Path(tmp), Path(path)
    os.chmod(tmp, default_mode())
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent if str(path.parent) else ".")
