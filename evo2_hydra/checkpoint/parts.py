"""Multi-part checkpoint files (`NAME.pt.part0..N`, as the 40B releases are published) read as one.

The parts are the bytes of one `torch.save` zip file cut into pieces (huggingface.co
`arcinstitute/*` file lists). Other tools join them into a new file first (another 82-225 GB on
disk: ArcInstitute/evo2 `evo2/utils.py`, BioNeMo's savanna importers); here they are
read in place, memory-mapped, and nothing is written:

- The zip directory is read through `ConcatReader`, a read-only file object over the parts one
  after another (`os.pread` on each part), so torch's own zip reader finds every record and
  its offset in the joined byte stream.
- Tensor data is not read through it: each part is memory-mapped once (the same private mapping
  `torch.load(mmap=True)` makes of a single file), and `PartsStorage` hands torch's loader each
  storage as a slice of the part mapping that holds it. A storage that straddles a part boundary
  (at most one per boundary) is the only thing copied into memory.
- One contiguous mapping of all parts is impossible in general: mmap places a file at page
  boundaries, and the parts' sizes are not multiples of the page size (41,126,745,847 bytes).

The load itself is torch's (`torch.serialization._load` with the weights-only unpickler and the
allowlist of safe_load.py), given `PartsStorage` where it would use the one file's mapping; only
torch 2.13 (pinned) is tested. Part mappings are registered for file-to-file copies
(checkpoint/mapped.py) like a single file's.

Sizes: every part present (numbered without gaps) and non-empty, and the zip directory consistent
with the joined length (a part missing at the end, truncated or padded moves the directory off
its recorded offset, and torch's reader refuses it). Against the Hub's recorded sizes, see hub.py.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evo2_hydra.errors import UserError

log = logging.getLogger(__name__)

PART_RE = re.compile(r"^(?P<base>.+)\.part(?P<n>\d+)$")


@dataclass(frozen=True)
class PartSet:
    """The parts of one checkpoint file, in order."""

    base: Path  # NAME.pt (the joined file's name; not on disk)
    parts: tuple[Path, ...]
    sizes: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def describe(self) -> str:
        return f"{self.base}.part0..{len(self.parts) - 1} ({len(self.parts)} parts, {self.total} bytes)"


def part_base(path: Path) -> Path | None:
    """NAME.pt for `NAME.pt.partK`, or for `NAME.pt` itself when only its parts exist."""
    m = PART_RE.match(path.name)
    if m:
        return path.with_name(m.group("base"))
    if not path.exists() and path.with_name(path.name + ".part0").is_file():
        return path
    return None


def part_set(path: str | Path) -> PartSet | None:
    """The part set `path` names (NAME.pt with parts, or any of its parts), checked; else None.

    Raises:
        UserError: a part missing between others, or an empty part.
    """
    path = Path(path)
    base = part_base(path)
    if base is None:
        return None
    numbers = {}
    if base.parent.is_dir():
        for f in base.parent.iterdir():
            m = PART_RE.match(f.name)
            if m and m.group("base") == base.name:
                numbers[int(m.group("n"))] = f
    if not numbers:
        raise UserError(f"{base}.part0: no such file (no part of {base.name} found)")
    missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
    if missing:
        raise UserError(
            f"{base}.part{missing[0]}: missing (found parts {sorted(numbers)}; "
            f"a multi-part checkpoint needs every part 0..{max(numbers)})"
        )
    parts = tuple(numbers[n] for n in range(len(numbers)))
    sizes = tuple(p.stat().st_size for p in parts)
    for p, size in zip(parts, sizes):
        if size == 0:
            raise UserError(f"{p}: empty part (incomplete download?)")
    return PartSet(base, parts, sizes)


def part_sets_in(folder: Path) -> list[Path]:
    """The part sets in a folder, as their part0 paths."""
    return sorted(
        f
        for f in folder.iterdir()
        if (m := PART_RE.match(f.name)) and m.group("n") == "0" and m.group("base").endswith(".pt")
    )


class ConcatReader(io.RawIOBase):
    """A read-only, seekable file object over the parts' bytes one after another."""

    def __init__(self, parts: PartSet) -> None:
        self._fds = [os.open(p, os.O_RDONLY) for p in parts.parts]
        self._starts = [0]
        for size in parts.sizes:
            self._starts.append(self._starts[-1] + size)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._starts[-1]}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._starts[-1]:
            i = bisect_right(self._starts, self._pos) - 1
            n = min(len(view) - done, self._starts[i + 1] - self._pos)
            chunk = os.pread(self._fds[i], n, self._pos - self._starts[i])
            if not chunk:
                raise OSError(f"part {i} shrank while being read")
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
            self._pos += len(chunk)
        return done

    def close(self) -> None:
        if not self.closed:
            for fd in self._fds:
                os.close(fd)
        super().close()


class PartsStorage:
    """Stands in for the one-file mapping torch's loader slices storages from (see docstring)."""

    def __init__(self, parts: PartSet) -> None:
        self.parts = parts
        self.maps = [
            torch.UntypedStorage.from_file(str(p), False, size)
            for p, size in zip(parts.parts, parts.sizes)
        ]
        self.starts = [0]
        for size in parts.sizes:
            self.starts.append(self.starts[-1] + size)
        self.copied = 0  # bytes of straddling storages copied into memory

    def __getitem__(self, item: slice) -> torch.UntypedStorage:
        start, stop = item.start, item.stop
        i = bisect_right(self.starts, start) - 1
        if stop <= self.starts[i + 1]:
            return self.maps[i][start - self.starts[i] : stop - self.starts[i]]
        out = torch.UntypedStorage(stop - start)
        pos = start
        while pos < stop:
            i = bisect_right(self.starts, pos) - 1
            end = min(stop, self.starts[i + 1])
            out[pos - start : end - start].copy_(
                self.maps[i][pos - self.starts[i] : end - self.starts[i]]
            )
            pos = end
        self.copied += stop - start
        return out


def _not_one_file(parts: PartSet, err: BaseException) -> UserError:
    sizes = ", ".join(str(s) for s in parts.sizes)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    first = first.split(". This is an internal miniz error")[0]  # torch's generic advice
    return UserError(
        f"{parts.base}: its {len(parts.parts)} parts (sizes {sizes}) do not form one torch "
        f"checkpoint (a part missing at the end, truncated or of the wrong size?): {first}"
    )


def unsafe_globals(parts: PartSet) -> list[str]:
    """Globals the joined file's pickle names beyond torch's weights-only defaults."""
    with ConcatReader(parts) as reader:
        try:
            return torch.serialization.get_unsafe_globals_in_checkpoint(reader)
        except Exception as err:  # a damaged or mis-joined archive fails in many ways
            raise _not_one_file(parts, err) from err


def load_part_set(parts: PartSet, *, mmap: bool, weights_only: bool, allow: list[Any]) -> Any:
    """`torch.load` of the joined file, without joining it (see the module docstring)."""
    from torch import _weights_only_unpickler

    with ConcatReader(parts) as reader:
        try:
            zip_file = torch._C.PyTorchFileReader(reader)
        except Exception as err:
            raise _not_one_file(parts, err) from err
        pickle_module = _weights_only_unpickler if weights_only else pickle
        storage = PartsStorage(parts) if mmap else None
        with torch.serialization.safe_globals(allow):
            obj = torch.serialization._load(zip_file, "cpu", pickle_module, overall_storage=storage)
    if storage is not None:
        _register(parts, storage)
        if storage.copied:
            log.info(
                "%s: %.1f MiB of tensors straddle part boundaries and were read into memory",
                parts.base,
                storage.copied / 2**20,
            )
    return obj


def _register(parts: PartSet, storage: PartsStorage) -> None:
    """Register each part's mapping for file-to-file copies, as safe_load does for one file."""
    from evo2_hydra.checkpoint import mapped

    registry = mapped._active  # set only inside tracking_mapped_files()
    if registry is None:
        return
    for path, size, part_map in zip(parts.parts, parts.sizes, storage.maps):
        fd = os.open(path, os.O_RDONLY)
        registry.add(mapped.MappedFile(part_map.data_ptr(), size, fd, str(path), part_map))
