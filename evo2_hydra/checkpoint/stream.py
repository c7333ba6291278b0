"""Write `torch.save`-compatible files one tensor at a time, so a conversion never holds the model.

`torch.save(dict)` needs every tensor alive at once. A conversion that casts or transforms tensors
would then own the whole model in anonymous memory. `TorchSaveStream` writes each tensor's bytes
into the zip archive as soon as it is produced (the tensor can be freed right after) and pickles
the object tree last, with light references in place of tensors. The file is byte-for-byte the
layout `torch.save` writes (zip records `data/<key>`, `data.pkl`, `byteorder`, 64-byte aligned
storages), so `torch.load(..., weights_only=True, mmap=True)` reads it like any other.

Also here: `conversion_progress` (one tqdm bar per conversion, in bytes).
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from evo2_hydra.checkpoint.bulk_io import BulkFile
from evo2_hydra.checkpoint.mapped import tensor_crc32

# dtype -> the legacy typed-storage class torch.save records (what torch.load maps back to a dtype).
_STORAGE_TYPES = {
    torch.float32: torch.FloatStorage,
    torch.float64: torch.DoubleStorage,
    torch.float16: torch.HalfStorage,
    torch.bfloat16: torch.BFloat16Storage,
    torch.int64: torch.LongStorage,
    torch.int32: torch.IntStorage,
    torch.int16: torch.ShortStorage,
    torch.int8: torch.CharStorage,
    torch.uint8: torch.ByteStorage,
    torch.bool: torch.BoolStorage,
}


class _StorageRef:
    """Stands for a storage already written as `data/<key>`; pickled as a persistent id."""

    __slots__ = ("key", "dtype", "numel", "_crc32")

    def __init__(self, key: str, dtype: torch.dtype, numel: int, crc32: str | Future) -> None:
        self.key, self.dtype, self.numel, self._crc32 = key, dtype, numel, crc32

    @property
    def crc32(self) -> str:
        if isinstance(self._crc32, Future):
            self._crc32 = self._crc32.result()
        return self._crc32


class TensorRef:
    """A tensor whose bytes are in the archive; pickles exactly as torch.save pickles a tensor."""

    __slots__ = ("storage", "shape", "stride")

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.shape, self.stride = storage, shape, stride

    @property
    def crc32(self) -> str:
        """CRC32 of the tensor's bytes (it always owns its whole storage), 8 hex digits."""
        return self.storage.crc32

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def __reduce_ex__(self, protocol: int):
        args = (
            self.storage,
            0,
            self.shape,
            self.stride,
            False,
            collections.OrderedDict(),
        )
        return (torch._utils._rebuild_tensor_v2, args)


class BackgroundCrc32:
    """Tensor CRC32s (8 hex digits) on one background thread, while the bytes are written.

    Copies inside the kernel and zlib both release the GIL, so on two cores the checksums cost
    next to no wall time. At most `ahead` wait (each holds its tensor alive); `submit` blocks
    beyond that, so memory stays at a few tensors.
    """

    def __init__(self, ahead: int = 4) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="crc32")
        self._pending: collections.deque[Future] = collections.deque()
        self._ahead = ahead

    def submit(self, tensor: Tensor) -> Future:
        future = self._pool.submit(tensor_crc32, tensor)
        self._pending.append(future)
        while len(self._pending) > self._ahead or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()
        return future

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class TorchSaveStream:
    """`with TorchSaveStream(path) as out: ref = out.add(t) ...; out.finish(obj_with_refs)`.

    `obj` may contain real tensors too (small ones); they are written on `finish`. Bytes go
    through `BulkFile`, so a tensor unchanged from a memory-mapped source file is copied file to
    file; each tensor's CRC32 (for manifests) is computed on a second thread meanwhile.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = BulkFile(self.path)
        # No zip-level CRC32: miniz computes it at ~120 MB/s, 7x slower than the write itself.
        # torch.load does not need it (torch.serialization.set_crc32_options(False) writes the
        # same); our manifests carry a CRC32 per tensor instead, computed here with zlib.
        # Given a file object, torch names the archive's top folder `archive/`, as torch.save
        # to an open file does (given a path it uses the file's stem); torch.load takes either.
        self._zip = torch._C.PyTorchFileWriter(
            self._file, False, torch.serialization._get_storage_alignment()
        )
        self._count = 0
        # data_ptr -> (weak ref to the tensor, ref): a tensor given twice (a tied embedding) is
        # stored once. The weak ref guards against a freed tensor's address being reused.
        self._written: dict[int, tuple[weakref.ref, _StorageRef]] = {}
        self._crc = BackgroundCrc32()
        self._finished = False
        self.bytes_written = 0

    @property
    def copied_bytes(self) -> int:
        """Bytes copied file to file from a memory-mapped source (the rest went through memory)."""
        return self._file.copied_bytes

    def __enter__(self) -> TorchSaveStream:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._finished:
            return
        try:
            # Finalize the zip writer in any case (torch marks it finalized even when this
            # raises), so its destructor never writes; the caller discards the file.
            self._zip.write_end_of_file()
        except Exception:
            if exc_type is None:
                raise
            # already failing: that first error is the one to report
        finally:
            self._close()

    def _close(self) -> None:
        self._crc.close()
        self._file.close()

    def add(self, tensor: Tensor) -> TensorRef:
        """Write `tensor`'s bytes now; return the reference to put in the pickled object."""
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if tensor.dtype not in _STORAGE_TYPES:
            raise TypeError(f"cannot stream a tensor of dtype {tensor.dtype}")
        storage = tensor.untyped_storage()
        nbytes = tensor.numel() * tensor.element_size()
        whole = (
            tensor.is_contiguous() and tensor.storage_offset() == 0 and storage.nbytes() == nbytes
        )
        if not whole:
            # A view of a larger storage (h[:, :128], an MP chunk) would drag the whole storage
            # along: write only its bytes, from where they are when they are contiguous (a
            # slice of the storage keeps a memory-mapped source's address, so it is copied file
            # to file), else from a contiguous copy.
            if tensor.is_contiguous():
                start = tensor.storage_offset() * tensor.element_size()
                storage = storage[start : start + nbytes]
            else:
                tensor = tensor.contiguous()
                storage = tensor.untyped_storage()
        ref = None
        if whole and (seen := self._written.get(storage.data_ptr())) is not None:
            owner, ref = seen[0](), seen[1]
            if owner is None or owner.untyped_storage().data_ptr() != storage.data_ptr():
                ref = None
        if ref is None or ref.dtype != tensor.dtype or ref.numel != tensor.numel():
            key = str(self._count)
            self._count += 1
            crc = self._crc.submit(torch.empty(0, dtype=torch.uint8).set_(storage))
            self._zip.write_record(f"data/{key}", storage, nbytes)
            self.bytes_written += nbytes
            ref = _StorageRef(key, tensor.dtype, tensor.numel(), crc)
            if whole:
                self._written[storage.data_ptr()] = (weakref.ref(tensor), ref)
        return TensorRef(ref, tuple(tensor.shape), tuple(tensor.stride()))

    def finish(self, obj: Any) -> None:
        """Pickle `obj` (tensors in it replaced by their refs) and close the archive."""
        stream = self

        class _Pickler(pickle.Pickler):
            def persistent_id(self, item):
                if isinstance(item, _StorageRef):
                    return ("storage", _STORAGE_TYPES[item.dtype], item.key, "cpu", item.numel)
                return None

            def reducer_override(self, item):
                if isinstance(item, Tensor):
                    return stream.add(item.detach()).__reduce_ex__(2)
                return NotImplemented

        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        data = buf.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        alignment = str(torch.serialization._get_storage_alignment())
        self._zip.write_record(".storage_alignment", alignment, len(alignment))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        try:
            self._zip.write_end_of_file()
            self._finished = True
        finally:
            self._close()


def return_freed_memory_to_os() -> None:
    """Make glibc hand large freed blocks back to the OS at once.

    glibc raises its mmap threshold after a large block is freed (up to 32 MB), so the next
    tensors of that size come from the heap and stay counted as our memory after they are freed:
    a streaming conversion would look like it holds many tensors. A fixed 1 MB threshold keeps
    every tensor above it in its own mapping, unmapped on free.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (also disables the dynamic adjustment)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def conversion_progress(total: int, desc: str, unit: str = "B") -> tqdm:
    """One progress bar per conversion (on stderr), in bytes of tensors produced or in tensors."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024,
        mininterval=0.5,
        file=sys.stderr,
    )


def tensor_nbytes(t: Tensor) -> int:
    """Bytes of a tensor's data."""
    return t.numel() * t.element_size()
