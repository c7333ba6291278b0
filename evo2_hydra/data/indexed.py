r"""savanna's MMapIndexedDataset (.bin/.idx) format: a streaming writer and a memory-mapped reader.

Byte layout (savanna `savanna/data/indexed_dataset.py`, all little-endian):
  .idx  magic b"MMIDIDX\x00\x00" | version <Q = 1 | dtype code <B | n_items <Q | n_docs+1 <Q |
        sizes int32[n_items] | pointers int64[n_items] (byte offset of each item in .bin) |
        doc_idx int64[n_docs+1]
  .bin  the token arrays of all items, concatenated.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from evo2_hydra.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # = 34


def data_file_path(prefix: str | Path) -> Path:
    """The .bin file of a BIN/IDX prefix."""
    return Path(f"{prefix}.bin")


def index_file_path(prefix: str | Path) -> Path:
    """The .idx file of a BIN/IDX prefix."""
    return Path(f"{prefix}.idx")


def strip_extension(path: str) -> str:
    """Accept `x`, `x.bin` or `x.idx` for the prefix `x`."""
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def is_indexed_prefix(path: str) -> bool:
    """Whether a path (with or without .bin/.idx) names an existing BIN/IDX pair."""
    prefix = strip_extension(path)
    return data_file_path(prefix).is_file() and index_file_path(prefix).is_file()


def write_index(
    idx_path: str | Path, sizes: np.ndarray, doc_idx: np.ndarray, dtype=np.uint16
) -> None:
    """Write an .idx file for items of `sizes` tokens (pointers derived from sizes)."""
    dtype = np.dtype(dtype)
    sizes = np.asarray(sizes, dtype="<i4")
    pointers = np.zeros(len(sizes), dtype="<i8")
    if len(sizes) > 1:
        np.cumsum(sizes[:-1], dtype="<i8", out=pointers[1:])
    pointers *= dtype.itemsize
    with open(idx_path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODE_OF_DTYPE[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes())
        f.write(pointers.tobytes())
        f.write(np.asarray(doc_idx, dtype="<i8").tobytes())


class MMapIndexedDataset:
    """Read-only view of a .bin/.idx pair; arrays are np.memmap views (nothing is copied)."""

    def __init__(self, prefix: str | Path):
        self.prefix = strip_extension(str(prefix))
        idx_path = index_file_path(self.prefix)
        try:
            header = idx_path.open("rb").read(HEADER_BYTES)
        except OSError as err:
            raise UserError(f"{idx_path}: cannot read the index ({err.strerror})") from None
        if len(header) < HEADER_BYTES or header[: len(MAGIC)] != MAGIC:
            raise UserError(f"{idx_path}: not an MMapIndexedDataset index (bad magic)")
        (version,) = struct.unpack_from("<Q", header, 9)
        (code,) = struct.unpack_from("<B", header, 17)
        n_items, n_doc_idx = struct.unpack_from("<QQ", header, 18)
        if version != VERSION or code not in DTYPE_CODES:
            raise UserError(f"{idx_path}: unsupported version {version} or dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        offset = HEADER_BYTES
        self.sizes = index[offset : offset + 4 * n_items].view("<i4")
        offset += 4 * n_items
        self.pointers = index[offset : offset + 8 * n_items].view("<i8")
        offset += 8 * n_items
        self.doc_idx = index[offset : offset + 8 * n_doc_idx].view("<i8")
        bin_path = data_file_path(self.prefix)
        expected = (
            int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n_items else 0
        )
        actual = bin_path.stat().st_size if bin_path.exists() else -1
        if actual < expected:
            raise UserError(f"{bin_path}: {actual} bytes, the index needs {expected}")
        # An empty file cannot be memory-mapped; no items means nothing to read anyway.
        self.tokens = (
            np.memmap(bin_path, mode="r", dtype=self.dtype)
            if actual > 0
            else np.zeros(0, self.dtype)
        )

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    def get(self, item: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of `item` from `offset` (a view into the memory map)."""
        start = int(self.pointers[item]) // self.dtype.itemsize + offset
        end = start - offset + int(self.sizes[item]) if length is None else start + length
        return self.tokens[start:end]
