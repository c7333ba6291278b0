"""Atomic file and folder writes: write under a temporary name in the same folder, then rename.

A process killed mid-write leaves at most a `.tmp-*` leftover, never a half-written file under the
final name. Temporary names carry the writer's PID and host (`.tmp-NAME.pid123-host.XXXX`, and
`.old-NAME.pid123-host` for what a rename set aside), so `remove_stale_temporaries` can delete
the leftovers of writers that died and leave those of writers still running.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:  # zlib-ng computes zlib's CRC32 (same values) about 6x faster: manifests checksum every byte
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - a dependency; zlib is the fallback
    from zlib import crc32

__all__ = [
    "atomic_dir",
    "atomic_file",
    "crc32",
    "file_lock",
    "old_name",
    "remove_stale_temporaries",
    "write_text_atomic",
]

log = logging.getLogger(__name__)

# `.tmp-NAME.pid<PID>-<HOST>.<random>` (mkstemp/mkdtemp) or `.old-NAME.pid<PID>-<HOST>`.
_OWNER_RE = re.compile(r"^\.(?:tmp|old)-.*\.pid(\d+)-([A-Za-z0-9_-]+)(?:\.[A-Za-z0-9_]+)?$")


def _host() -> str:
    """This machine's short host name, in the characters a temporary name may hold."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"


def _owner_tag() -> str:
    return f"pid{os.getpid()}-{_host()}"


def _tmp_prefix(final: Path) -> str:
    return f".tmp-{final.name}.{_owner_tag()}."


def old_name(final: Path) -> Path:
    """Where a rename sets `final` aside before deleting it (carries this writer's PID and host)."""
    return final.with_name(f".old-{final.name}.{_owner_tag()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Delete the `.tmp-NAME.*` / `.old-NAME.*` leftovers in `folder` whose writer is gone.

    Only names that carry a PID and this host's name, where that PID is no longer running, are
    removed; a live writer's temporaries, another host's and names without an owner stay. Each
    removal is logged; returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    host = _host()
    for path in sorted([*folder.glob(f".tmp-{name}.*"), *folder.glob(f".old-{name}.*")]):
        match = _OWNER_RE.match(path.name)
        if match is None or match.group(2) != host or _alive(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        log.warning("removed %s, left behind by a writer that died (PID %s)", path, match.group(1))
    return removed


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
    fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(final), dir=final.parent)
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
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
    try:
        yield tmp
        _apply_umask(tmp, 0o777)
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} already exists")
            old = old_name(final)
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
