"""Where the bytes of a memory-mapped checkpoint's tensors lie in its file.

`torch.load(path, mmap=True)` maps the whole file once and makes every storage a slice of that
one mapping, so `address - mapping start` is a tensor's offset in the file. A conversion that
writes a tensor unchanged can then copy it file to file inside the kernel (copy_file_range(2),
what `cp` does) instead of reading it through the mapping and writing it back from user space
(checkpoint/bulk_io.py).

The same block can hand out *row concatenations for writing* (`concat_rows`): NeMo's
`linear_fc1` is savanna's `w1` and `w2` stacked, and forming it in memory costs more than copying
both from the file. The placeholder tensor returned has the result's shape and dtype, but only
its first bytes are filled in (the rest is never touched, so it costs no RAM); a writer asking
`segments()` for exactly its bytes gets the parts' bytes instead. Only writers use it
(checkpoint/bulk_io.py), CRC32s of it come from its parts (`crc32_of`), and a partial read through
`segments()` is an error.

The copies read the file, so they rely on the mapped tensors never being changed in place (torch
maps the file copy-on-write: a changed page would no longer be what the file holds). Conversions
only ever read their sources; `tests/test_convert_bulk_io.py` checks every target's files are
the same with and without the copies.

Registration only happens inside `tracking_mapped_files()` (each conversion runs in one). A
registered mapping or placeholder is kept alive, and its file open, until that block ends, so
none of its addresses can be handed to other memory while they are being looked up.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evo2_hydra.io_utils import crc32

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MappedFile:
    """A memory-mapped file: where its bytes start in this process, its size and descriptor."""

    start: int  # address of the file's byte 0 in this process
    size: int  # bytes of the file (and of the mapping)
    fd: int  # the file, open for reading, for copy_file_range
    path: str
    keepalive: torch.UntypedStorage  # any storage of the mapping holds the whole mapping


HEAD = 64  # bytes of a placeholder that are filled in (see MappedFiles.placeholder)

# Where bytes come from: (fd, offset, nbytes) in a file, or a buffer in memory.
Segment = tuple[int, int, int] | memoryview


class MappedFiles:
    """The mappings and placeholders registered in one `tracking_mapped_files()` block."""

    def __init__(self) -> None:
        self._files: list[MappedFile] = []
        self._starts: list[int] = []
        # placeholder address -> (placeholder, its parts): the placeholder is kept alive here
        self._placeholders: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self._lock = threading.Lock()

    def add(self, mapped: MappedFile) -> None:
        with self._lock:
            i = bisect.bisect(self._starts, mapped.start)
            self._files.insert(i, mapped)
            self._starts.insert(i, mapped.start)

    def locate(self, address: int, nbytes: int) -> tuple[int, int] | None:
        """(fd, file offset) of `nbytes` at `address` if all of them lie in one registered file."""
        with self._lock:
            i = bisect.bisect(self._starts, address) - 1
            if i < 0:
                return None
            mapped = self._files[i]
        offset = address - mapped.start
        if offset + nbytes > mapped.size:
            return None
        return mapped.fd, offset

    def placeholder(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        result = torch.empty(shape, dtype=parts[0].dtype)
        # The head holds the real first bytes: torch's zip writer peeks at the first 8 bytes of
        # every buffer it writes (a buffer that starts like a zip data descriptor is folded
        # into the file's serialization id), so they must be what the file will hold.
        head = b"".join(bytes(_memory_of(p)[:HEAD]) for p in parts)[:HEAD]
        _memory_of(result)[: len(head)] = head
        with self._lock:
            self._placeholders[result.data_ptr()] = (result, parts)
        return result

    def parts_of(self, address: int, nbytes: int) -> tuple[torch.Tensor, ...] | None:
        """The parts of the placeholder at exactly (`address`, `nbytes`); refuses partial reads."""
        with self._lock:
            for start, (result, parts) in self._placeholders.items():
                end = start + result.nbytes
                if start == address and nbytes == result.nbytes:
                    return parts
                if address < end and start < address + nbytes:
                    raise RuntimeError(
                        "a placeholder from concat_rows was read partially; its memory holds "
                        "no values (only whole writes of it are supported)"
                    )
        return None

    def segments(self, address: int, nbytes: int) -> list[Segment] | None:
        """Where the `nbytes` at `address` come from, if not (only) from that memory."""
        parts = self.parts_of(address, nbytes)
        if parts is None:
            where = self.locate(address, nbytes)
            return [(where[0], where[1], nbytes)] if where is not None else None
        out: list[Segment] = []
        for part in parts:
            n = part.nbytes
            where = self.locate(part.data_ptr(), n)
            out.append((where[0], where[1], n) if where is not None else _memory_of(part))
        return out

    def close(self) -> None:
        with self._lock:
            for mapped in self._files:
                os.close(mapped.fd)
            self._files.clear()
            self._starts.clear()
            self._placeholders.clear()

    def __len__(self) -> int:
        return len(self._files)


_active: MappedFiles | None = None


@contextlib.contextmanager
def tracking_mapped_files() -> Iterator[MappedFiles]:
    """Within this block, checkpoints loaded with `safe_load(mmap=True)` are registered."""
    global _active
    outer, registry = _active, MappedFiles()
    _active = registry
    try:
        yield registry
    finally:
        _active = outer
        registry.close()


def segments(address: int, nbytes: int) -> list[Segment] | None:
    """Where a write of `nbytes` at `address` should take its bytes from (None: that memory)."""
    registry = _active
    return registry.segments(address, nbytes) if registry is not None else None


def concat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(parts)` along dim 0, as a placeholder for writing when a block is active.

    Row concatenation of contiguous tensors is their bytes one after another, which is what a
    writer asking `segments()` gets. Outside a block (or for non-contiguous parts), torch.cat.
    """
    registry = _active
    if registry is None or len(parts) < 2 or not all(p.is_contiguous() for p in parts):
        return torch.cat(parts)
    return registry.placeholder(tuple(parts))


def crc32_of(tensor: torch.Tensor, crc: int = 0) -> int:
    """CRC32 (zlib's) of a tensor's bytes (row-major), placeholders included (from their parts)."""
    registry = _active
    if tensor.is_contiguous() and registry is not None:
        parts = registry.parts_of(tensor.data_ptr(), tensor.nbytes)
        if parts is not None:
            for part in parts:
                crc = crc32_of(part, crc)
            return crc
    if tensor.numel() == 0:
        return crc
    return crc32(_memory_of(tensor.contiguous()), crc)


def _memory_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _storages(obj: Any) -> Iterator[torch.UntypedStorage]:
    if isinstance(obj, torch.Tensor):
        yield obj.untyped_storage()
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _storages(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _storages(value)


def register_loaded_checkpoint(path: str | Path, obj: Any) -> bool:
    """Register the mapping behind `obj` (just loaded from `path` with mmap) if a block is active.

    The mapping's start is found from the zip records: each storage is the record `data/<key>`
    at a known file offset, and one start address must explain every storage at once (and the
    bytes there must read the same through the file). Anything else (a load that did not map
    the file, an unexpected layout) registers nothing: the writers then copy from memory.
    """
    if _active is None:
        return False
    storages = {s.data_ptr(): s for s in _storages(obj) if s.nbytes() > 0}
    if not storages:
        return False
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        records = {
            reader.get_record_offset(name): reader.get_record_size(name)
            for name in reader.get_all_records()
            if name.rsplit("/", 2)[-2:-1] == ["data"]
        }
    except (RuntimeError, OSError):
        return False
    size = os.path.getsize(path)
    first = min(storages)
    start = next(
        (
            first - offset
            for offset in sorted(records)
            if all(
                records.get(ptr - (first - offset), -1) >= s.nbytes() for ptr, s in storages.items()
            )
        ),
        None,
    )
    if start is None:
        log.debug("%s: storages are not one mapping of the file; no file-to-file copies", path)
        return False
    fd = os.open(path, os.O_RDONLY)
    sample = storages[first]
    n = min(4096, sample.nbytes())
    if os.pread(fd, n, first - start) != ctypes.string_at(first, n):
        os.close(fd)
        return False
    _active.add(MappedFile(start, size, fd, str(path), sample))
    return True


def tensor_crc32(tensor: torch.Tensor) -> str:
    """CRC32 of the tensor's bytes (row-major), as 8 hex digits (a `concat_rows` placeholder's
    from its parts): the checksum every manifest records.
    """
    return f"{crc32_of(tensor.detach()):08x}"
