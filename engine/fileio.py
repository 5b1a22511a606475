"""Atomic, durable file replacement for checkpoints, models and poison sets."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["publish", "fsync_dir", "default_mode", "sha256_file", "ExclusiveLock", "FileInUseError"]


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


class FileInUseError(RuntimeError):
    """Another process is writing the same output (a second run of the same job)."""


class ExclusiveLock:
    """A one-writer lock on an output file, held while one process writes it.

    Two runs writing the same results log, checkpoint or poison would interleave their rows or
    overwrite each other's state; the second one gets :class:`FileInUseError` naming the first's
    process id instead. The lock is keyed on the file itself, not on the name it was given: the path
    is resolved (symbolic links, ``..``), so a second run through a link to the same file is refused
    too. It is a ``filelock.FileLock`` (``flock`` on POSIX) on ``<resolved path>.lock``, released on
    :meth:`release`, on exit of a ``with`` block, or when the process dies (the kernel drops it), so
    a crash never leaves a lock that blocks the next run. A clean release removes the lock file.
    """

    def __init__(self, path: str | os.PathLike):
        self.target = Path(path)
        self.path = Path(str(Path(os.path.abspath(path)).resolve()) + ".lock")
        self._lock = None

    def acquire(self) -> ExclusiveLock:
        import filelock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.path), timeout=0, is_singleton=False)
        try:
            lock.acquire()
        except filelock.Timeout:
            try:
                owner = self.path.read_text().strip() or "unknown"
            except OSError:
                owner = "unknown"
            real = self.path.with_suffix("")
            where = self.target if Path(os.path.abspath(self.target)) == real else f"{self.target} (that is {real})"
            raise FileInUseError(
                f"{where} is being written by another process (pid {owner}); wait for it to finish or stop it first"
            ) from None
        try:  # the owner's pid, for the message above (a second open: the flock stays on filelock's descriptor)
            self.path.write_text(str(os.getpid()))
        except OSError:
            pass
        self._lock = lock
        return self

    def release(self) -> None:
        if self._lock is not None:
            try:  # removed while still held: a process waiting on this inode sees it unlinked and retries
                self.path.unlink()
            except OSError:
                pass
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ExclusiveLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
