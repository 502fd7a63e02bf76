"""Files and directories that are replaced in one step, so an interruption never leaves half of each.

- :func:`write_file` writes a file beside its destination, syncs it and renames it into place.
- :func:`replace_directory` puts a completely written directory at a path that may hold an older
  one. On Linux the two are exchanged with ``renameat2(RENAME_EXCHANGE)``, one atomic step: at
  every instant the path holds the whole old directory or the whole new one. Elsewhere (or on a
  file system without the call) the old directory is first renamed to ``.<name>.old`` and
  :func:`recover_directory`, which every later save and load runs first, puts it back if the
  process died before the new one was in place.
- :func:`staging_directory` makes the sibling a new directory is written into, after removing the
  leftovers of earlier interrupted writes to the same path.

Python's ``os`` has no ``renameat2``; it is called through ``ctypes`` (glibc 2.28+).
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["write_file", "replace_directory", "staging_directory", "recover_directory", "fsync_directory"]

_STAGING = ".{}.saving-"  # prefix of directories being written
_OLD = ".{}.old"  # an old directory moved aside by the two-rename fallback


def fsync_directory(path: Path) -> None:
    """Make the entries of ``path`` (renames, new files) durable."""
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | Path, data: bytes, *, sync_directory: bool = True) -> None:
    """Write ``data`` to ``path`` through a synced temporary file in the same folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_directory:
        fsync_directory(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the call or the file system lacks it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"cannot exchange '{a}' and '{b}': {os.strerror(err)}")


def recover_directory(path: str | Path) -> None:
    """If an interrupted :func:`replace_directory` left ``path`` missing and its old copy aside, put it back."""
    path = Path(path)
    old = path.with_name(_OLD.format(path.name))
    if old.is_dir() and not path.exists():
        os.rename(old, path)


def staging_directory(path: str | Path) -> Path:
    """A new empty sibling of ``path`` to write into; leftovers of earlier interrupted writes are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    for leftover in path.parent.glob(_STAGING.format(path.name) + "*"):
        shutil.rmtree(leftover, ignore_errors=True)
    old = path.with_name(_OLD.format(path.name))
    if old.exists() and path.exists():
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=_STAGING.format(path.name)))


def replace_directory(staged: str | Path, path: str | Path) -> None:
    """Put the complete directory ``staged`` (from :func:`staging_directory`) at ``path``; the old one is deleted."""
    staged, path = Path(staged), Path(path)
    for f in staged.iterdir():  # the files are durable before they become visible
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    fsync_directory(staged)
    if not path.exists():
        os.rename(staged, path)
    elif _exchange(staged, path):
        shutil.rmtree(staged)  # it holds the old directory now
    else:
        old = path.with_name(_OLD.format(path.name))
        os.rename(path, old)
        os.rename(staged, path)
        shutil.rmtree(old)
    fsync_directory(path.parent)
