"""Atomic file and folder writes (write under a temporary name in the same folder, then rename)
and the exclusive lock a run or a conversion holds on its output for its whole life.

A process killed mid-write leaves at most a `.tmp-*` leftover, never a half-written file under the
final name. Temporary names carry the writer's PID and host (`.tmp-NAME.pid123-host.XXXX`, and
`.old-NAME.pid123-host` for what a rename set aside), so `remove_stale_temporaries` can delete
the leftovers of writers that died and leave those of writers still running.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from evo2_hydra.errors import UserError

try:  # zlib-ng computes zlib's CRC32 (same values) about 6x faster: manifests checksum every byte
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - a dependency; zlib is the fallback
    from zlib import crc32

__all__ = [
    "OutputLocked",
    "atomic_dir",
    "atomic_file",
    "crc32",
    "exclusive_lock",
    "file_lock",
    "old_name",
    "remove_stale_temporaries",
    "write_failure_as_os_error",
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


# Errors of a write that ran out of room: they carry no file name (write(2) has none), so the
# atomic writers add the destination's, and the CLI prints "<path>: No space left on device".
_OUT_OF_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _free_mib(folder: Path) -> float | None:
    try:
        return shutil.disk_usage(folder).free / 2**20
    except OSError:
        return None


# torch.save's C++ writer reports a failed write (a full disk) as a RuntimeError that names
# neither the file nor the cause ("[enforce fail at inline_container.cc:...] unexpected pos").
_TORCH_WRITE_FAILURES = (
    "inline_container.cc",
    "PytorchStreamWriter",
    "file write failed",
    "iostream error",
)


def write_failure_as_os_error(err: BaseException, path: str | os.PathLike) -> OSError | None:
    """The OSError that `err` (raised while writing under `path`) stands for, or None if it is
    no write failure: OSErrors get the path, torch's writer errors become ENOSPC when the disk
    there is (nearly) full, else EIO.
    """
    if isinstance(err, OSError):
        if err.filename is None and err.errno in _OUT_OF_ROOM:
            return OSError(err.errno, os.strerror(err.errno), str(path))
        return err
    if not isinstance(err, RuntimeError) or not any(m in str(err) for m in _TORCH_WRITE_FAILURES):
        return None
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = _free_mib(folder)
    if free is not None and free < 1.0:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"write failed ({str(err).splitlines()[0]})", str(path))


@contextlib.contextmanager
def _name_the_destination(final: Path, always: bool = False) -> Iterator[None]:
    """Errors of writing `final` name `final` (with `always`, also OSErrors that name another
    path, e.g. the temporary name or a parent folder).
    """
    try:
        yield
    except (OSError, RuntimeError) as err:
        if always and isinstance(err, OSError):
            in_the_way = next((p for p in final.parents if p.exists() and not p.is_dir()), None)
            if in_the_way is not None:  # mkdir says "File exists" or "Not a directory"
                raise NotADirectoryError(
                    errno.ENOTDIR, f"{in_the_way} is a file, not a folder", str(final)
                ) from err
            raise OSError(err.errno, err.strerror, str(final)) from err
        translated = write_failure_as_os_error(err, final)
        if translated is None or translated is err:
            raise
        raise translated from err


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
    with _name_the_destination(final, always=True):  # read-only, parent is a file, ...
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(final), dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _name_the_destination(final):
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
    with _name_the_destination(final, always=True):  # read-only, parent is a file, ...
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
    try:
        with _name_the_destination(final):
            yield tmp
        _apply_umask(tmp, 0o777)
        if final.exists():
            if not overwrite:
                raise FileExistsError(
                    errno.EEXIST, "already exists (written meanwhile?)", str(final)
                )
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
    """Write a text file atomically (temporary name, then rename)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed): one process at a time builds a cache
    entry that several ranks, sweep points or Slurm jobs ask for at once.
    """
    lock = Path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # no lock support on this file system: the atomic rename still protects
            pass
        yield


# ---- exclusive lock on an output (a run folder, a conversion's target) ------------------------
#
# Why a lock file created with O_EXCL rather than flock/fcntl: those are advisory locks that NFS
# emulates through lockd (lost on server or client restarts, absent on some mounts), and a run
# folder usually lives on such a shared file system. Creating a file with O_CREAT|O_EXCL is atomic
# on local file systems and on NFSv3+. The file says who holds the lock (pid, host, the process's
# start time, the Slurm job); a lock whose holder is gone is taken over:
#   - same host: the pid is not running, or is running but is another process (its start time
#     differs: the pid was reused) -> stale at once, e.g. after a SIGKILL;
#   - same Slurm job id (a requeued job, possibly on another node) -> stale: it is our own
#     previous incarnation;
#   - another host: the holder refreshes the file's mtime every HEARTBEAT_S seconds while it
#     lives; a lock not refreshed for STALE_AFTER_S is stale (a node that crashed or was fenced).

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class OutputLocked(UserError):
    """Another live process holds the lock on this output."""


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:  # no /proc (macOS): liveness only
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"
    # field 22 is starttime; the command name (field 2) may hold spaces, so count from its ')'
    return stat[stat.rindex(")") + 2 :].split()[19]


def _holder_record() -> dict:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "start_time": _process_start_time(pid),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _read_holder(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written right now, or garbage: judged by its age alone


def _stale_reason(lock: Path, holder: dict) -> str | None:
    """Why the holder is gone, or None while it may be alive."""
    me = _holder_record()
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
        started = _process_start_time(holder["pid"])
        if started is None:
            return f"pid {holder['pid']} is no longer running"
        if started != "?" and holder.get("start_time") not in (None, started):
            return f"pid {holder['pid']} now belongs to another process"
        return None
    if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return f"it was held by an earlier run of Slurm job {me['slurm_job_id']}"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return "it was released"
    if age > STALE_AFTER_S:
        return f"its holder has not refreshed it for {age:.0f} s"
    return None


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


def _try_create(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(_holder_record()))
    return True


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(lock)


@contextlib.contextmanager
def exclusive_lock(lock: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold `lock` (a file path) for the block, or raise OutputLocked naming the live holder.

    `what` names the protected thing in the message ("run folder outputs/runs/x"). Stale locks
    of dead holders are taken over (see above). Not reentrant: one holder per process and path.
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(5):
        if _try_create(lock):
            break
        holder = _read_holder(lock)
        if holder is None:
            continue  # released between our two calls
        reason = _stale_reason(lock, holder)
        if reason is None:
            raise OutputLocked(
                f"{what} is in use by {_describe(holder)} (lock file {lock}); wait for it to "
                "finish, or delete the lock file if that process is gone"
            )
        # Move the stale file aside under a unique name before deleting it: of several processes
        # taking over at once, only one rename succeeds, and none deletes a fresh holder's lock.
        aside = lock.with_name(f"{lock.name}.stale.{os.getpid()}")
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            continue
        if _read_holder(aside) != holder:  # we moved a newer holder's lock: put it back
            with contextlib.suppress(OSError):
                os.link(aside, lock)
            aside.unlink(missing_ok=True)
            continue
        aside.unlink(missing_ok=True)
        log.warning("%s: took over a stale lock (%s; %s)", what, _describe(holder), reason)
    else:
        raise OutputLocked(f"{what}: could not take the lock {lock} (contended); try again")
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True, name="lock-beat")
    beat.start()
    try:
        yield lock
    finally:
        stop.set()
        beat.join()
        if (_read_holder(lock) or {}).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
