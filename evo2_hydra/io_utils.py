"""Atomic file and folder writes: write under a temporary name in the same folder, then rename.

A process killed mid-write leaves at most a `.tmp-*` leftover, never a half-written file under the
final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:  # zlib-ng computes zlib's CRC32 (same values) about 6x faster: manifests checksum every byte
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - a dependency; zlib is the fallback
    from zlib import crc32

__all__ = ["atomic_dir", "atomic_file", "crc32", "file_lock", "write_text_atomic"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create 0600/0700; give finished outputs the usual umask permissions."""
    os.chmod(path, mode & ~_current_umask())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _apply_umask(tmp, 0o666)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; rename it onto `path` if the block succeeds.

    With `overwrite`, an existing folder at `path` is replaced only after the new one is complete.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}.", dir=final.parent))
    try:
        yield tmp
        _apply_umask(tmp, 0o777)
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} already exists")
            old = final.with_name(f".old-{final.name}.{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed): one process at a time builds a cache
    entry that several ranks, sweep points or Slurm jobs ask for at once."""
    lock = Path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # no lock support on this file system: the atomic rename still protects
            pass
        yield
