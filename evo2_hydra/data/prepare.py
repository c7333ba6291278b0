"""prepare_data: turn data.input / valid_input / test_input into BIN/IDX datasets, with caching.

JSONL and FASTA inputs are preprocessed once per (file content, settings) into
`{cache_dir}/jsonl/{name}-{key}/`, where key hashes the file's bytes and every setting that changes
the tokens. The content hash is remembered per (path, inode, size, mtime, ctime): rewriting a file
changes its ctime even when its size and mtime are put back (`touch -d`), so an edited file is
hashed again, never served stale. A second run or every job of a sweep finds the folder and reuses it. Several processes
(ranks, Slurm jobs) calling at once are safe: the first takes a file lock and builds the folder
under a temporary name, then renames it into place; the others wait for the lock and find it done
(and without working locks, e.g. some network file systems, the rename still makes the result whole).
BIN/IDX prefixes are used as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evo2_hydra.config import DataConfig, Packing
from evo2_hydra.data.indexed import MMapIndexedDataset, is_indexed_prefix, strip_extension
from evo2_hydra.data.preprocess import (
    check_summary,
    is_sequence_file,
    load_conditions,
    output_prefix_for,
    preprocess_to_prefix,
    resolved_window,
)
from evo2_hydra.errors import UserError
from evo2_hydra.io_utils import atomic_dir, file_lock, write_text_atomic

log = logging.getLogger("evo2_hydra.data")

CACHE_VERSION = 2  # bump when the encoding changes, so old cache folders are not reused


@dataclass
class DatasetSpec:
    """One BIN/IDX dataset of a split, with its blending weight and document range."""

    prefix: str  # BIN/IDX prefix (without .bin/.idx)
    weight: float | None = None  # blending weight; None = in proportion to its size
    documents: tuple[int, int] | None = None  # [lo, hi) document range (data.split); None = all


@dataclass
class PreparedData:
    """The prepared train/valid/test datasets and the run's conditioning tokens."""

    train: list[DatasetSpec]
    valid: list[DatasetSpec] = field(default_factory=list)
    test: list[DatasetSpec] = field(default_factory=list)
    condition_tokens: dict[str, str] = field(default_factory=dict)  # class name -> token
    condition_field: str | None = None
    index_dir: str | None = None  # where index maps go when the data folder is read-only

    def to_dict(self) -> dict:
        return asdict(self)


def parse_split(split: str) -> list[float]:
    """savanna's split string ("969,30,1" or "969/30/1") as three fractions."""
    sep = "/" if "/" in split else ","
    try:
        parts = [float(p) for p in split.split(sep) if p.strip()]
    except ValueError:
        raise UserError(
            f"data.split={split!r}: expected up to three numbers, e.g. 969,30,1"
        ) from None
    if not parts or len(parts) > 3 or min(parts) < 0 or sum(parts) <= 0:
        raise UserError(f"data.split={split!r}: expected up to three non-negative numbers")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_documents(n_docs: int, split: str) -> list[tuple[int, int]]:
    """[lo, hi) document ranges for train/valid/test (savanna `data_utils.py` rounding)."""
    bounds = [0]
    for fraction in parse_split(split):
        bounds.append(bounds[-1] + int(round(fraction * float(n_docs))))
    overshoot = bounds[-1] - n_docs
    bounds = [bounds[0]] + [b - overshoot for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


# ---------------------------------------------------------------------------------------------
# Content-hash cache of preprocessed JSONL


def file_digest(path: str, cache_dir: Path) -> str:
    """sha256 of the file's bytes, memoised by (path, device, inode, size, mtime, ctime) so reruns
    skip re-reading. ctime is set by the kernel on every write and cannot be set back by the
    user (`touch -d` changes mtime only), so a rewritten file never matches its old entry.
    """
    stat = os.stat(path)
    stamp = "\0".join(
        str(v)
        for v in (
            os.path.abspath(path),
            stat.st_dev,
            stat.st_ino,
            stat.st_size,
            stat.st_mtime_ns,
            stat.st_ctime_ns,
        )
    )
    memo = cache_dir / "hashes" / (hashlib.sha256(stamp.encode()).hexdigest()[:32] + ".txt")
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    value = digest.hexdigest()
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo, value + "\n")
    return value


def encoding_settings(data: DataConfig, context: int, cache_dir: Path | None = None) -> dict:
    """Every setting that changes the tokens written for a JSONL or FASTA file."""
    cond = data.condition
    window = resolved_window(data, context)
    return {
        "version": CACHE_VERSION,
        "packing": data.packing.value,
        "context": context if data.packing == Packing.padded else None,
        "append_eod": data.append_eod,
        "text_key": data.text_key,
        "condition_field": cond.field,
        "condition_header_regex": cond.header_regex,
        "condition_tsv": file_digest(cond.tsv, cache_dir)
        if cond.tsv is not None and cache_dir is not None and Path(cond.tsv).is_file()
        else cond.tsv,
        "condition_tokens": dict(sorted(cond.tokens.items())) if cond.enabled else {},
        "truncate": data.truncate,
        "on_error": data.on_error.value,
        "alphabet": data.alphabet.value,
        "charset": data.charset.value,
        "window": window,
        "stride": data.stride if window is not None else None,
        "keep_partial_window": data.keep_partial_window if window is not None else None,
        "reverse_complement": data.reverse_complement.value,
        "reverse_complement_seed": data.reverse_complement_seed
        if data.reverse_complement.value == "random"
        else None,
    }


def cached_preprocess(path: str, data: DataConfig, context: int, cache_dir: Path) -> str:
    """BIN/IDX prefix of `path` preprocessed with `data`'s settings (built once, then reused)."""
    settings = encoding_settings(data, context, cache_dir)
    key_source = json.dumps({"file": file_digest(path, cache_dir), **settings}, sort_keys=True)
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    stem = Path(path).name.split(".")[0] or "data"
    folder = cache_dir / "jsonl" / f"{stem}-{key}"
    prefix = output_prefix_for(str(folder / "data"), data.text_key)
    with file_lock(cache_dir / "jsonl" / f".{stem}-{key}.lock"):
        if folder.is_dir():
            check_summary(prefix)  # sizes agree with the pair (a tampered cache is an error)
            log.info("data: reusing %s (cached preprocessing of %s)", folder, path)
            return prefix
        log.info("data: preprocessing %s into %s", path, folder)
        try:
            with atomic_dir(folder) as tmp:
                tmp_prefix = output_prefix_for(str(tmp / "data"), data.text_key)
                summary = preprocess_to_prefix(data, [path], tmp_prefix, context)
                log.info("%s", summary.report().replace(str(tmp), str(folder)))
                write_text_atomic(
                    tmp / "settings.json",
                    json.dumps({"input": os.path.abspath(path), **settings}, indent=2) + "\n",
                )
        except FileExistsError:  # another process finished first (no working locks)
            pass
    return prefix


# ---------------------------------------------------------------------------------------------


def _resolve(
    paths: list[str], key: str, data: DataConfig, context: int, cache_dir: Path
) -> list[str]:
    prefixes = []
    for path in paths:
        if is_sequence_file(path):
            if not Path(path).is_file():
                raise UserError(f"data.{key}: {path} does not exist")
            prefixes.append(cached_preprocess(path, data, context, cache_dir))
        elif is_indexed_prefix(path):
            prefix = strip_extension(path)
            MMapIndexedDataset(prefix)  # checks the header and the .bin size now, not mid-run
            check_summary(prefix)  # our own preprocessing: the summary describes this pair
            prefixes.append(prefix)
        else:
            raise UserError(
                f"data.{key}: {path} is neither JSONL (.jsonl[.gz]), FASTA (.fa/.fasta/.fna"
                f"[.gz]) nor a BIN/IDX prefix (expected {path}.bin and {path}.idx)"
            )
    return prefixes


def prepare_data(data: DataConfig, context: int, cache_dir: str) -> PreparedData:
    """Resolve train/valid/test datasets (preprocessing JSONL through the cache)."""
    cache = Path(cache_dir)
    train_paths = DataConfig.as_list(data.input)
    if not train_paths:
        raise UserError(
            "data.input: no training data given (a JSONL or FASTA file, or a BIN/IDX prefix)"
        )
    if data.weights is not None and len(data.weights) != len(train_paths):
        raise UserError(
            f"data.weights has {len(data.weights)} entries for {len(train_paths)} data.input paths"
        )
    train_prefixes = _resolve(train_paths, "input", data, context, cache)
    weights = list(data.weights) if data.weights is not None else [None] * len(train_prefixes)
    valid_paths = DataConfig.as_list(data.valid_input)
    test_paths = DataConfig.as_list(data.test_input)

    if valid_paths:  # separate inputs: train on all documents of data.input
        train = [DatasetSpec(p, w) for p, w in zip(train_prefixes, weights)]
        valid = [DatasetSpec(p) for p in _resolve(valid_paths, "valid_input", data, context, cache)]
        test = [DatasetSpec(p) for p in _resolve(test_paths, "test_input", data, context, cache)]
    else:  # carve valid/test out of each input with data.split
        train, valid, test = [], [], []
        for prefix, weight in zip(train_prefixes, weights):
            ranges = split_documents(len(MMapIndexedDataset(prefix)), data.split)
            for specs, (lo, hi), w in zip((train, valid, test), ranges, (weight, None, None)):
                if hi > lo:
                    specs.append(DatasetSpec(prefix, w, (lo, hi)))
        if test_paths:
            test = [
                DatasetSpec(p) for p in _resolve(test_paths, "test_input", data, context, cache)
            ]
        if not train:
            raise UserError(f"data.split={data.split!r} leaves no training documents")

    tokens: dict[str, str] = {}
    for prefix in train_prefixes:  # mappings stored with BIN/IDX data (ours or an earlier run)
        tokens.update(load_conditions(prefix))
    if data.condition.enabled:
        tokens.update({str(k): str(v) for k, v in data.condition.tokens.items()})
    return PreparedData(
        train=train,
        valid=valid,
        test=test,
        condition_tokens=tokens,
        condition_field=data.condition.field,
        index_dir=str(cache / "indexmaps"),
    )
