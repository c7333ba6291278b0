"""`BulkFile`: the write-only file every conversion writes tensor bytes through.

Measured on this project's 2-core CI machine (2 GB of bf16 tensors, warm page cache), three
things kept a conversion several times slower than `cp` of the same bytes:
- reading a tensor through the source's memory mapping and writing it back from user space,
  where `cp` copies inside the kernel: a tensor that leaves the conversion unchanged (most of
  them, for every target) is now copied file to file with copy_file_range(2), located in the
  source file by `checkpoint/mapped.py`;
- single write() calls of tens of MB, which ran at 0.5-1 GB/s where the same bytes in 1 MiB
  pieces ran at 2-2.8 GB/s: everything else is written in 1 MiB pieces;
- letting ext4 allocate blocks page by page as the bytes arrive: each large write's range is
  allocated first with fallocate(2), which made the same copies ~20% faster (0.71 s instead of
  0.91 s for the 2 GB of records of an evo2_1b checkpoint).
The bytes in the file are the same whichever way they got there. (Splitting one copy between
two threads did not help: two concurrent copy_file_range calls took as long as one.)

`BulkFile` is what torch's zip writer (`torch._C.PyTorchFileWriter(file)`), DCP's file streams
and the zarr chunk writer are given; they call `write(memoryview)` with the tensor's own memory,
and `mapped.segments()` says where those bytes come from: a registered file (copied), the parts
of a `concat_rows` placeholder (each copied or written), or nowhere else (written from memory).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from pathlib import Path

import numpy as np

from evo2_hydra.checkpoint import mapped

PIECE = 1 << 20  # bytes per write()/copy_file_range() call
SMALL = 64 << 10  # writes below this are gathered in memory (zip headers, pickles)
# copy_file_range fails with these where the kernel or file systems cannot copy between the two
# files (old kernels, different file systems, special files): then the bytes go through memory.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


class _Totals:
    """Bytes written by every BulkFile of this process (`totals()`), for logs and benchmarks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.written = 0
        self.copied = 0

    def add(self, written: int, copied: int) -> None:
        with self.lock:
            self.written += written
            self.copied += copied


_totals = _Totals()


def totals() -> tuple[int, int]:
    """(bytes written by BulkFiles in this process, of which copied file to file)."""
    with _totals.lock:
        return _totals.written, _totals.copied


def address_of(buffer: memoryview) -> int:
    """Address of a buffer's first byte in this process (0 for an empty buffer)."""
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data) if buffer.nbytes else 0


_libc_fallocate = None


def _fallocate():
    """libc's fallocate(fd, mode, offset, len), or None where there is none."""
    global _libc_fallocate
    if _libc_fallocate is None:
        try:
            function = ctypes.CDLL(None, use_errno=True).fallocate
            function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            function.restype = ctypes.c_int
            _libc_fallocate = function
        except (OSError, AttributeError):
            _libc_fallocate = False
    return _libc_fallocate or None


class BulkFile:
    """A binary file opened for writing (truncated), with `write`, `tell`, `flush`, `close`."""

    # Class-wide switches, off after the kernel refused once (copy_file_range is Linux only).
    kernel_copy = hasattr(os, "copy_file_range")
    preallocate = True

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._pos = 0  # bytes in the file; gathered small writes come after them
        self._small = bytearray()
        self.copied_bytes = 0  # of which copied file to file (for tests and benchmarks)

    # -- file object protocol -------------------------------------------------------------------
    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def tell(self) -> int:
        return self._pos + len(self._small)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        sources = mapped.segments(address_of(view), n) if n else None
        if sources is None and n < SMALL:
            self._small += view
            if len(self._small) >= SMALL:
                self.flush()
            return n
        self.flush()
        self._reserve(self._pos, n)
        if sources is None:
            self._write_memory(self._pos, view)
            _totals.add(n, 0)
        else:
            self._write_sources(self._pos, sources)
        self._pos += n
        return n

    def flush(self) -> None:
        if self._small:
            self._write_memory(self._pos, memoryview(self._small))
            self._pos += len(self._small)
            self._small = bytearray()

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> BulkFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the bulk path --------------------------------------------------------------------------
    def _reserve(self, pos: int, n: int) -> None:
        """Allocate the file's blocks for [pos, pos + n) in one call (mode 0: the file grows to
        pos + n, which the write that follows fills). Skipped where the file system cannot; never
        glibc's posix_fallocate, which emulates it by writing zeros.
        """
        fallocate = _fallocate() if BulkFile.preallocate else None
        if fallocate is None or fallocate(self._fd, 0, pos, n) == 0:
            return
        if ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            BulkFile.preallocate = False
        # anything else (ENOSPC): the write that follows fails and reports it

    def _write_sources(self, pos: int, sources: list[mapped.Segment]) -> None:
        for source in sources:
            if isinstance(source, memoryview):
                self._write_memory(pos, source)
                size, copied = source.nbytes, 0
            else:
                size = copied = source[2]
                self._copy(pos, *source)
            self.copied_bytes += copied
            _totals.add(size, copied)
            pos += size

    def _copy(self, pos: int, src_fd: int, src_pos: int, n: int) -> None:
        """`n` bytes of `src_fd` from `src_pos` to this file at `pos`, in the kernel if it can."""
        done = 0
        if BulkFile.kernel_copy:
            try:
                while done < n:
                    step = os.copy_file_range(
                        src_fd, self._fd, min(PIECE, n - done), src_pos + done, pos + done
                    )
                    if step == 0:
                        raise OSError(errno.EIO, f"{self.path}: the source file ended early")
                    done += step
                return
            except OSError as err:
                if err.errno not in _NO_KERNEL_COPY:
                    raise
                BulkFile.kernel_copy = False  # and go on through memory from where it stopped
        while done < n:
            chunk = os.pread(src_fd, min(PIECE, n - done), src_pos + done)
            if not chunk:
                raise OSError(errno.EIO, f"{self.path}: the source file ended early")
            self._write_memory(pos + done, memoryview(chunk))
            done += len(chunk)

    def _write_memory(self, pos: int, view: memoryview) -> None:
        n, done = view.nbytes, 0
        while done < n:
            done += os.pwrite(self._fd, view[done : done + PIECE], pos + done)
