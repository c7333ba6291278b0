"""Training samples from BIN/IDX data: padded (one document per sample) and contiguous (GPT-style).

Both kinds return windows of `context + 1` tokens (inputs = window[:-1], labels = window[1:]) and
are endless: sample i of epoch e = i // samples_per_epoch uses that epoch's own shuffle, so a run
can ask for any sample number (resume) without touching the ones before it.

Contiguous mode follows savanna's GPT-style index (savanna `savanna/data/`, `_build_sample_idx`)
with one epoch per index: epoch e shuffles the documents with RandomState(seed + e) — epoch 0 is
exactly savanna's index for a one-epoch run — cuts windows of context+1 tokens overlapping by one
token (sample_idx), and shuffles the windows with the same RNG (shuffle_idx). The three arrays are
cached as .npy files next to the data, named as savanna names them.
"""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from evo2_hydra.data import tokenizer
from evo2_hydra.data.indexed import MMapIndexedDataset
from evo2_hydra.errors import UserError


class PaddedDataset:
    """Each sample is exactly one document (conditioning token first), right-padded with PAD.

    The window ends with an extra PAD, so the last real position's label is EOD or PAD, never a
    token of another document. Trailing PADs already in the data (savanna's padded preprocessing
    at any length) are stripped first; a document longer than the context fails unless `truncate`.
    """

    def __init__(
        self,
        indexed: MMapIndexedDataset,
        documents: np.ndarray,
        context: int,
        seed: int,
        truncate: bool = False,
    ):
        self.indexed = indexed
        self.documents = np.asarray(documents, dtype=np.int64)
        self.context = context
        self.seed = seed
        self.truncate = truncate
        self.samples_per_epoch = len(self.documents)
        if self.samples_per_epoch == 0:
            raise UserError(f"{indexed.prefix}: no documents in this split")

    @lru_cache(maxsize=2)  # noqa: B019 - a handful of datasets live for the whole run
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.RandomState(self.seed + epoch).permutation(self.samples_per_epoch)

    def sample(self, index: int) -> np.ndarray:
        epoch, within = divmod(index, self.samples_per_epoch)
        document = int(self.documents[self._order(epoch)[within]])
        tokens = self.indexed.get(document)
        real = np.flatnonzero(tokens != tokenizer.PAD)
        length = int(real[-1]) + 1 if len(real) else 0
        if length > self.context:
            if not self.truncate:
                raise UserError(
                    f"{self.indexed.prefix}: document {document} has {length} tokens, more than "
                    f"ckpt.context={self.context} (padded packing); set data.truncate=true to cut it"
                )
            length = self.context
        window = np.full(self.context + 1, tokenizer.PAD, dtype=np.int64)
        window[:length] = tokens[:length]
        return window


def build_epoch_index(
    sizes: np.ndarray, documents: np.ndarray, seq_length: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """savanna's (doc_idx, sample_idx, shuffle_idx) for one epoch over `documents`.

    Sample k covers global token positions [k·seq_length, (k+1)·seq_length] of the documents
    concatenated in doc_idx order; sample_idx[k] = (position in doc_idx, offset) of its first token,
    which is the document holding that position (what savanna's build_sample_idx loop computes).
    """
    rng = np.random.RandomState(seed)
    doc_idx = np.asarray(documents, dtype=np.int32).copy()
    rng.shuffle(doc_idx)
    lengths = np.asarray(sizes, dtype=np.int64)[doc_idx]
    starts = np.zeros(len(doc_idx) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    num_samples = int((starts[-1] - 1) // seq_length)
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    which = np.searchsorted(starts, positions, side="right") - 1
    offsets = positions - starts[which]
    index_dtype = np.int32 if starts[-1] < np.iinfo(np.int32).max else np.int64
    sample_idx = np.stack([which, offsets], axis=1).astype(index_dtype)
    shuffle_dtype = np.uint32 if num_samples < np.iinfo(np.uint32).max - 1 else np.int64
    shuffle_idx = np.arange(num_samples, dtype=shuffle_dtype)
    rng.shuffle(shuffle_idx)
    return doc_idx, sample_idx, shuffle_idx


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)  # concurrent ranks write identical files; the last rename wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class ContiguousDataset:
    """Windows of context+1 tokens over the concatenated documents (EOD between them if stored)."""

    def __init__(
        self,
        indexed: MMapIndexedDataset,
        documents: np.ndarray,
        context: int,
        seed: int,
        name: str,
        index_dir: str | None = None,
    ):
        self.indexed = indexed
        self.documents = np.asarray(documents, dtype=np.int64)
        self.context = context
        self.seed = seed
        self.name = name
        self.index_dir = index_dir
        tokens = int(np.asarray(indexed.sizes, dtype=np.int64)[self.documents].sum())
        self.samples_per_epoch = (tokens - 1) // context if tokens > 0 else 0
        if self.samples_per_epoch <= 0:
            raise UserError(
                f"{indexed.prefix}: {tokens} tokens in this split, fewer than one window of "
                f"ckpt.context+1={context + 1} tokens (contiguous packing)"
            )

    def _cache_paths(self, seed: int) -> list[Path]:
        base = (
            f"{self.indexed.prefix}_{self.name}_indexmap_{self.samples_per_epoch}ns_"
            f"{self.context}sl_{seed}s"
        )
        folder = Path(base).parent
        if not os.access(folder, os.W_OK) and self.index_dir is not None:
            folder = Path(self.index_dir)  # read-only data folder: cache elsewhere
            folder.mkdir(parents=True, exist_ok=True)
        return [
            folder / f"{Path(base).name}_{kind}_idx.npy" for kind in ("doc", "sample", "shuffle")
        ]

    @lru_cache(maxsize=2)  # noqa: B019 - a handful of datasets live for the whole run
    def _index(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        seed = self.seed + epoch
        paths = self._cache_paths(seed)
        if all(p.is_file() for p in paths):
            return tuple(np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
        arrays = build_epoch_index(self.indexed.sizes, self.documents, self.context, seed)
        try:
            for path, array in zip(paths, arrays):
                _save_npy_atomic(path, array)
        except OSError:
            pass  # caching is an optimisation; the index is rebuilt deterministically
        return arrays

    def sample(self, index: int) -> np.ndarray:
        epoch, within = divmod(index, self.samples_per_epoch)
        doc_idx, sample_idx, shuffle_idx = self._index(epoch)
        k = int(shuffle_idx[within])
        first, first_offset = (int(v) for v in sample_idx[k])
        last, last_offset = (int(v) for v in sample_idx[k + 1])
        get = self.indexed.get
        if first == last:
            parts = [get(int(doc_idx[first]), first_offset, last_offset - first_offset + 1)]
        else:
            parts = [get(int(doc_idx[first]), first_offset)]
            parts += [get(int(doc_idx[d])) for d in range(first + 1, last)]
            parts.append(get(int(doc_idx[last]), 0, last_offset + 1))
        return np.concatenate(parts).astype(np.int64)
