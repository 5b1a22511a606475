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


def _identity_lock_path(target: Path) -> Path | None:
    """The lock keyed on an existing file's identity (device, inode), shared by every name of it (hard links)."""
    import tempfile

    try:
        st = os.stat(target)
    except OSError:
        return None
    return Path(tempfile.gettempdir()) / "pacd-engine-locks" / f"{st.st_dev}-{st.st_ino}.lock"


class ExclusiveLock:
    """A one-writer lock on an output file, held while one process writes it.

    Two runs writing the same results log, checkpoint or poison would interleave their rows or
    overwrite each other's state; the second one gets :class:`FileInUseError` naming the first's
    process id instead. The lock is keyed on the file itself, not on the name it was given: the path
    is resolved (symbolic links, ``..``), and once the file exists (:meth:`acquire` on an existing
    file, :meth:`bind` after creating it) also its identity (device and inode: hard links), so a
    second run through another name of the same file is refused too. Each is a ``filelock.FileLock``
    (``flock`` on POSIX): on ``<resolved path>.lock`` and on ``<tmp>/pacd-engine-locks/<dev>-<inode>.lock``,
    released on :meth:`release`, on exit of a ``with`` block, or when the process dies (the kernel drops
    it), so a crash never leaves a lock that blocks the next run. A clean release removes the lock files.
    A lock file that cannot be created is an OSError naming it.
    """

    def __init__(self, path: str | os.PathLike):
        self.target = Path(path)
        self.path = Path(str(Path(os.path.abspath(path)).resolve()) + ".lock")
        self._locks: list = []

    def _take(self, path: Path, where: str) -> None:
        import filelock

        try:  # a lock file that cannot be made (read-only folder, /proc) is that, not "another process"
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o666))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot create the lock file ({exc.strerror})", str(path)) from None
        lock = filelock.FileLock(str(path), timeout=0, is_singleton=False)
        try:
            lock.acquire()
        except filelock.Timeout:
            try:
                owner = path.read_text().strip() or "unknown"
            except OSError:
                owner = "unknown"
            raise FileInUseError(
                f"{where} is being written by another process (pid {owner}); wait for it to finish or stop it first"
            ) from None
        try:  # the owner's pid, for the message above (a second open: the flock stays on filelock's descriptor)
            path.write_text(str(os.getpid()))
        except OSError:
            pass
        self._locks.append((path, lock))

    def acquire(self) -> ExclusiveLock:
        real = self.path.with_suffix("")
        where = self.target if Path(os.path.abspath(self.target)) == real else f"{self.target} (that is {real})"
        self._take(self.path, str(where))
        try:
            self.bind()
        except BaseException:
            self.release()
            raise
        return self

    def bind(self) -> None:
        """Also lock the file's identity (device, inode) once it exists: call after creating it (a no-op if it does
        not exist, or is already bound to it)."""
        ident = _identity_lock_path(self.target)
        if ident is None or any(p == ident for p, _ in self._locks):
            return
        self._take(ident, f"{self.target} (the same file under another name)")

    def release(self) -> None:
        while self._locks:
            path, lock = self._locks.pop()
            try:  # removed while still held: a process waiting on this inode sees it unlinked and retries
                path.unlink()
            except OSError:
                pass
            lock.release()

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
