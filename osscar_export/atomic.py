"""Atomic file writes: an artifact is either complete at its final path or absent.

Folders (``atomic_dir``) are staged beside their destination and published under a lock, so
concurrent publishers of one destination never see each other's half-done renames, and a
destination that appeared while a job ran is not replaced unless the caller allows it
(docs/design.md, "Export"). A staging folder stays locked by the process that made it; one whose
lock is free belongs to a process that died (SIGKILL, power loss) and is swept.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# renameat2(2) flags (linux/fs.h).
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


class DestinationExists(FileExistsError):
    """``atomic_dir``'s destination holds something it was not allowed to replace."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes 0600 files; artifacts get the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _flock(fd: int, blocking: bool) -> bool:
    """Lock ``fd`` exclusively; False when another open file holds it (non-blocking only). On a
    filesystem without flock (some network mounts) publishing goes unlocked, relying on renameat2,
    and the sweep treats every folder as live: it removes nothing it cannot prove dead."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
            return blocking
        raise
    return True


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the lock of ``folder`` itself (flock on the folder, so no lock file is left behind):
    every publish, staging and sweep beside a destination happens under its parent's lock."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _flock(fd, blocking=True)
        yield
    finally:
        os.close(fd)  # releases the lock


def _staging_pattern(path: Path) -> re.Pattern[str]:
    """Names of ``path``'s staging folders: ``.NAME.staging-PID-XXXXXXXX`` (``.old`` once it holds
    the replaced contents); the pid tells people which job made one, the lock tells the sweep."""
    return re.compile(rf"\.{re.escape(path.name)}\.staging-\d+-[a-z0-9_]+(\.old)?")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sweep(path: Path) -> list[Path]:
    """Remove ``path``'s staging folders that no live process holds (caller holds the parent's lock)."""
    removed = []
    pattern = _staging_pattern(path)
    for entry in path.parent.iterdir():
        if not pattern.fullmatch(entry.name) or not entry.is_dir() or entry.is_symlink():
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # replaced contents, removed by their publisher outside the lock
            continue
        try:
            stale = _flock(fd, blocking=False)
        finally:
            os.close(fd)
        if stale:
            _remove(entry)
            removed.append(entry)
    return removed


def sweep_staging(path: str | os.PathLike) -> list[Path]:
    """Remove the staging folders of ``path`` left by processes that died before publishing
    (a SIGKILL skips every ``finally``); returns what was removed. Live jobs' folders stay."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    with _locked(path.parent):
        return _sweep(path)


def _rename(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False where the C library or the filesystem lacks it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _publish(staging: Path, path: Path, may_replace: Callable[[Path], bool]) -> None:
    """Move ``staging`` to ``path`` (caller holds the parent's lock). An absent or empty ``path``
    is taken; anything else only when ``may_replace(path)``, and then its contents end up at
    ``staging`` (or ``staging.old``) for the caller to remove."""
    if os.path.lexists(path) and not _is_empty_dir(path):
        if not may_replace(path):
            raise DestinationExists(errno.EEXIST, "exists and may not be replaced", str(path))
        if not _rename(staging, path, _RENAME_EXCHANGE):
            os.rename(path, staging.with_name(staging.name + ".old"))
            os.rename(staging, path)
        return
    try:  # publishers of this tool hold the lock; these renames also refuse what anything else made meanwhile
        if os.path.lexists(path) or not _rename(staging, path, _RENAME_NOREPLACE):
            os.rename(staging, path)  # over an empty folder: atomic, ENOTEMPTY if it filled meanwhile
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise DestinationExists(e.errno, "appeared while publishing", str(path)) from e
        raise


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, may_replace: Callable[[Path], bool] = lambda _: True) -> Iterator[Path]:
    """Yield a staging folder beside ``path``; on success it becomes ``path``.

    An existing non-empty ``path`` (or a file there) is replaced only if ``may_replace(path)``,
    asked at publish time under the lock; otherwise ``DestinationExists`` is raised and nothing
    is touched. Stale staging folders of ``path`` are swept first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):  # a sweep never sees a staging folder between mkdtemp and its lock
        _sweep(path)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-{os.getpid()}-", dir=path.parent))
        fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
        _flock(fd, blocking=True)
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700 folders
        yield staging
        with _locked(path.parent):
            _publish(staging, path, may_replace)
    finally:
        _remove(staging)  # the unpublished staging folder, or the replaced contents
        _remove(staging.with_name(staging.name + ".old"))
        os.close(fd)
