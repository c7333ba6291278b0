"""JSONL/FASTA -> savanna BIN/IDX (task=preprocess), byte-identical to savanna's tools/preprocess_data.py.

    python launch.py task=preprocess data.input=IN.jsonl data.output_prefix=PREFIX \
        data.packing=padded ckpt.context=4096

writes D.bin and D.idx with D = PREFIX_text_CharLevelTokenizer_document (padded ⇔ savanna's
`--enforce-sample-length ckpt.context`, contiguous ⇔ no flag, data.append_eod ⇔ `--append-eod`),
plus D_lengths.png, D_summary.json and, when conditioning tokens are configured, D_conditions.json.

Streaming: JSONL chunks go through `jsonl.encode_chunk` (in worker processes when that helps),
FASTA records through `fasta.encode_fasta` (one process: pyfastx parses faster than the encoding),
and are written in input order; memory holds a few chunks plus 4 bytes per document (lengths for
the index and the summary). The same sequences give the same bytes from either format.

All outputs are written under temporary names and renamed only when the whole input was good,
under a lock on the output prefix (a second preprocess into the same prefix waits). The summary
is removed first and renamed into place last, and records the sizes and CRC32s of the .bin/.idx
pair it describes: a summary that exists always describes the pair next to it, whatever was
killed when (`check_summary`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from evo2_hydra.config import DataConfig, OnError, Packing, RunConfig
from evo2_hydra.data import tokenizer
from evo2_hydra.data.encode import EncodeSettings
from evo2_hydra.data.fasta import encode_fasta, is_fasta
from evo2_hydra.data.indexed import is_indexed_prefix, write_index
from evo2_hydra.data.jsonl import (
    encode_chunk,
    input_size,
    is_jsonl,
    iter_chunks,
    prefetch,
)
from evo2_hydra.data.parallel import Encoded, encode_parallel
from evo2_hydra.data.text import TextPolicy
from evo2_hydra.errors import UserError
from evo2_hydra.io_utils import atomic_file, crc32, remove_stale_temporaries, write_text_atomic

log = logging.getLogger("evo2_hydra.data")

CHUNK_BYTES = 1 << 20  # small enough that a chunk's passes stay in the CPU caches
PAD_BLOCK_TOKENS = 1 << 24  # padded mode widens at most this many tokens at once
PARALLEL_MIN_BYTES = 48 << 20  # below this, worker start-up costs more than it saves
MAX_REPORTED_SKIPS = 10


def output_prefix_for(output_prefix: str, text_key: str = "text") -> str:
    """savanna's naming: {prefix}_{jsonl key}_{tokenizer name}_document."""
    return f"{output_prefix}_{text_key}_{tokenizer.NAME}_document"


def conditions_path(output_prefix: str) -> Path:
    """Where the conditioning mapping of a preprocessed prefix is written."""
    return Path(f"{output_prefix}_conditions.json")


def is_sequence_file(path: str) -> bool:
    """A file preprocessing reads (JSONL or FASTA, plain or gzip)."""
    return is_jsonl(path) or is_fasta(path)


def resolved_window(data: DataConfig, context: int) -> int | None:
    """data.window in tokens; 0 = as long as the context allows after the conditioning token and
    the EOD.
    """
    if data.window != 0:
        return data.window
    return context - int(data.condition.enabled) - int(data.append_eod)


def read_condition_tsv(path: str) -> dict[str, str]:
    """data.condition.tsv: `id<TAB>class` per line (blank lines and lines starting with # are
    skipped); one line naming file and line for anything else.
    """
    mapping: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"data.condition.tsv={path}: cannot read ({err})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0] or not fields[1]:
            raise UserError(
                f"{path}:{number}: expected two tab-separated columns, record id and class name"
            )
        if fields[0] in mapping and mapping[fields[0]] != fields[1]:
            raise UserError(f"{path}:{number}: id {fields[0]!r} is listed twice with two classes")
        mapping[fields[0]] = fields[1]
    return mapping


def encode_settings(data: DataConfig, context: int) -> EncodeSettings:
    """The settings that decide the tokens, from the data config and context."""
    cond = data.condition
    return EncodeSettings(
        text_key=data.text_key,
        append_eod=data.append_eod,
        max_length=context if data.packing == Packing.padded else None,
        truncate=data.truncate,
        condition_field=cond.field,
        condition_tokens={str(k): str(v) for k, v in cond.tokens.items()},
        condition_header_regex=cond.header_regex,
        condition_by_id=read_condition_tsv(cond.tsv) if cond.tsv is not None else None,
        stop_at_first_problem=data.on_error == OnError.fail,
        policy=TextPolicy.from_data(data),
        window=resolved_window(data, context),
        stride=data.stride,
        keep_partial_window=data.keep_partial_window,
        reverse_complement=data.reverse_complement.value,
        reverse_complement_seed=data.reverse_complement_seed,
    )


def check_inputs(inputs: list[str], settings: EncodeSettings, key: str = "data.input") -> None:
    """Every input exists, has a known format, and the conditioning settings fit its format."""
    if not inputs:
        raise UserError(f"{key}: no input files given")
    if settings.window is not None and settings.window <= 0:
        raise UserError("data.window=0 leaves no room in ckpt.context for the sequence")
    conditioned = (
        settings.condition_header_regex is not None or settings.condition_by_id is not None
    )
    for path in inputs:
        if not Path(path).is_file():
            raise UserError(f"{key}: {path} does not exist")
        if is_fasta(path):
            if settings.condition_field is not None and not conditioned:
                raise UserError(
                    f"{key}: {path} is FASTA; data.condition.field names a JSONL field: give "
                    "data.condition.header_regex or data.condition.tsv for FASTA, or "
                    "data.condition.field=null (data=jsonl) for no conditioning"
                )
        elif is_jsonl(path):
            if conditioned and settings.condition_field is None:
                raise UserError(
                    f"{key}: {path} is JSONL; data.condition.header_regex/tsv read FASTA "
                    "headers: give data.condition.field for JSONL"
                )
        else:
            raise UserError(
                f"{key}: {path} is neither JSONL (.jsonl, .jsonl.gz) nor FASTA "
                "(.fa, .fasta, .fna, .fas, optionally .gz / bgzip)"
            )


@dataclass
class PreprocessSummary:
    """What a preprocessing run did: counts, lengths, padding, truncated and skipped lines."""

    output: str  # the BIN/IDX prefix
    sequences: int = 0
    tokens: int = 0  # document tokens (conditioning tokens and EODs included, padding excluded)
    padded_tokens: int = 0  # PAD tokens added (padded packing)
    truncated: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    records: int = 0  # input records (a record cut into windows gives several sequences)
    windowed: int = 0  # records cut into windows (data.window)
    alphabet_skipped: int = 0  # records left out by data.alphabet=skip
    alphabet_kept: int = 0  # records kept with characters outside data.charset (alphabet=keep)
    alphabet_examples: list[str] = field(default_factory=list)
    text_policy: dict = field(default_factory=dict)
    pair: dict = field(default_factory=dict)  # sizes and CRC32s of the .bin/.idx written
    input_bytes: int = 0
    seconds: float = 0.0
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    def to_dict(self) -> dict:
        lengths = self.lengths
        return {
            "output": self.output,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "padded_tokens": self.padded_tokens,
            "truncated": self.truncated,
            "skipped": self.skipped,
            "skipped_examples": self.skipped_examples,
            "records": self.records,
            "windowed": self.windowed,
            "alphabet_skipped": self.alphabet_skipped,
            "alphabet_kept": self.alphabet_kept,
            "alphabet_examples": self.alphabet_examples,
            "text_policy": self.text_policy,
            "pair": self.pair,
            "length_min": int(lengths.min()) if len(lengths) else 0,
            "length_median": float(np.median(lengths)) if len(lengths) else 0.0,
            "length_max": int(lengths.max()) if len(lengths) else 0,
            "input_bytes": self.input_bytes,
            "seconds": round(self.seconds, 3),
        }

    def report(self) -> str:
        d = self.to_dict()
        rate = self.input_bytes / max(self.seconds, 1e-9) / 1e6
        lines = [
            f"wrote {self.output}.bin/.idx: {d['sequences']} sequences, {d['tokens']} tokens, "
            f"{d['padded_tokens']} padded tokens ({self.seconds:.2f} s, {rate:.1f} MB/s)",
            f"length min/median/max: {d['length_min']} / {d['length_median']:g} / "
            f"{d['length_max']} tokens",
        ]
        if len(self.lengths):
            counts, edges = np.histogram(self.lengths, bins=min(10, max(1, len(self.lengths))))
            scale = 40 / max(1, counts.max())
            for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
                lines.append(f"  {lo:9.0f}-{hi:<9.0f} {c:8d} {'#' * int(round(c * scale))}")
        if self.truncated:
            lines.append(f"truncated {self.truncated} sequences to the context")
        if self.windowed:
            lines.append(f"cut {self.windowed} of {self.records} records into windows")
        if self.skipped:
            lines.append(f"skipped {self.skipped} bad records (data.on_error=skip), e.g.:")
            lines.extend(f"  {e}" for e in self.skipped_examples)
        if self.alphabet_skipped or self.alphabet_kept:
            what = (
                f"skipped {self.alphabet_skipped} (data.alphabet=skip)"
                if self.alphabet_skipped
                else f"kept {self.alphabet_kept} (data.alphabet=keep)"
            )
            lines.append(f"{what} records with characters outside data.charset, e.g.:")
            lines.extend(f"  {e}" for e in self.alphabet_examples)
        return "\n".join(lines)


def _worker_count(workers: int, total_bytes: int) -> int:
    """data.workers, or with 0: all cores but one (at most 8) for a large input on 4+ cores.

    With fewer cores the main process (reading, widening, writing) competes with the workers
    and one process is as fast (measured on 2 cores, see benchmarks/bench_preprocess.py).
    """
    if workers > 0:
        return workers
    cores = os.cpu_count() or 1
    return 1 if total_bytes < PARALLEL_MIN_BYTES or cores < 4 else min(cores - 1, 8)


def _encoded_chunks(inputs: list[str], settings: EncodeSettings, workers: int):
    """Encoded chunks of all inputs in input order (JSONL in worker processes when workers > 1)."""
    for index, path in enumerate(inputs):
        if is_fasta(path):
            done, size = 0, input_size(path)
            for encoded in encode_fasta(path, settings, CHUNK_BYTES):
                tokens = np.frombuffer(encoded.tokens, dtype=np.uint8)
                done += encoded.input_bytes  # uncompressed: the bar is approximate for .gz
                yield Encoded(encoded, tokens, min(done, size), index)
            continue
        if workers > 1:
            for item in encode_parallel([path], settings, workers, CHUNK_BYTES):
                item.index = index
                yield item
            continue
        for chunk in prefetch(iter_chunks(path, CHUNK_BYTES)):
            encoded = encode_chunk(chunk, settings)
            tokens = np.frombuffer(encoded.tokens, dtype=np.uint8)
            yield Encoded(encoded, tokens, chunk.consumed, index)


class BinWriter:
    """Appends documents to the .bin as uint16, writing in a background thread.

    The write system call releases the GIL, so copying the previous chunk into the page cache
    overlaps with parsing the next one. Widening goes through a small ring of reused buffers (a
    fresh multi-MB array per chunk costs page faults comparable to the widening itself); a buffer
    is refilled only after its write finished.
    """

    RING = 3

    def __init__(self, file, max_length: int | None):
        self.file = file
        self.max_length = max_length
        self.buffers = [np.zeros(0, dtype=tokenizer.DISK_DTYPE) for _ in range(self.RING)]
        self.turn = 0
        self.pending: deque = deque()
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="bin-writer")
        self.padded_tokens = 0
        self.pad = memoryview(b"")

    def _scratch(self, n: int) -> np.ndarray:
        while len(self.pending) >= self.RING - 1:  # the buffer we are about to fill is free
            self.pending.popleft().result()
        buffer = self.buffers[self.turn]
        if len(buffer) < n:
            buffer = np.empty(max(n, 2 * len(buffer)), dtype=tokenizer.DISK_DTYPE)
            self.buffers[self.turn] = buffer
        return buffer[:n]

    def _submit(self, out: np.ndarray) -> None:
        self.pending.append(self.thread.submit(self.file.write, out.data))
        self.turn = (self.turn + 1) % self.RING

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if self.max_length is None and tokens.dtype == tokenizer.DISK_DTYPE:
            # Widened by a worker into shared memory that is reused after this call: write now.
            self.drain()
            self.file.write(tokens.data)
            return
        if self.max_length is None:  # contiguous: the documents as they are
            out = self._scratch(len(tokens))
            np.copyto(out, tokens)
            self._submit(out)
            return
        width = self.max_length  # padded: one row of exactly max_length per document
        if len(self.pad) != width:
            self.pad = memoryview(bytes([tokenizer.PAD]) * width)
        rows_per_block = max(1, PAD_BLOCK_TOKENS // width)
        view = memoryview(np.ascontiguousarray(tokens))
        start = 0
        for first in range(0, len(lengths), rows_per_block):
            # One join lays out the block row by row: document bytes, then PAD bytes up to width
            # (several times faster than a boolean-mask scatter into a PAD-filled array).
            pieces = []
            for length in lengths[first : first + rows_per_block].tolist():
                pieces.append(view[start : start + length])
                pieces.append(self.pad[: width - length])
                start += length
            block = np.frombuffer(b"".join(pieces), dtype=np.uint8)
            out = self._scratch(len(block))
            np.copyto(out, block)
            self._submit(out)
        self.padded_tokens += len(lengths) * width - len(tokens)

    def drain(self) -> None:
        """Wait for every queued write (re-raising a failed one)."""
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.thread.shutdown(wait=True)


def _where(path: str, first_line: int, location: int | str) -> str:
    """JSONL problems carry a line within their chunk, FASTA problems their full location."""
    return location if isinstance(location, str) else f"{path}:{first_line + location}"


def preprocess_files(
    inputs: list[str],
    output_prefix: str,
    settings: EncodeSettings,
    *,
    workers: int = 0,
    progress: bool = True,
) -> PreprocessSummary:
    """Encode `inputs` (JSONL, FASTA, plain or gzip) into one BIN/IDX pair at `output_prefix`.

    Writes `.bin` and `.idx` under temporary names and renames them into place; the caller
    holds the output lock (`preprocess_to_prefix`).
    """
    prefix = Path(output_prefix)
    remove_stale_temporaries(prefix.parent, f"{prefix.name}*")  # of a killed preprocess
    check_inputs(inputs, settings)
    summary = PreprocessSummary(output=output_prefix, text_policy=settings.policy.to_dict())
    total_bytes = sum(input_size(p) for p in inputs)
    started = time.perf_counter()
    lengths_parts: list[np.ndarray] = []
    bar = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="preprocess",
        disable=not progress,
        mininterval=0.5,
    )
    workers = _worker_count(workers, total_bytes)
    offsets = np.concatenate([[0], np.cumsum([input_size(p) for p in inputs])]).tolist()
    bin_target = Path(f"{output_prefix}.bin")
    idx_target = Path(f"{output_prefix}.idx")
    try:
        with (
            atomic_file(bin_target) as bin_tmp,
            atomic_file(idx_target) as idx_tmp,
            open(bin_tmp, "wb") as bin_file,
            contextlib.closing(_encoded_chunks(inputs, settings, workers)) as chunks,
            contextlib.closing(BinWriter(bin_file, settings.max_length)) as writer,
        ):
            first_line, current = 1, -1
            for item in chunks:
                index, encoded, consumed = item.index, item.chunk, item.consumed
                path = encoded.path
                if index != current:  # a new input file starts at line 1
                    first_line, current = 1, index
                for location, problem in encoded.problems:
                    where = _where(path, first_line, location)
                    if settings.stop_at_first_problem:
                        item = None  # release the shared-memory view before the workers stop
                        raise UserError(f"{where}: {problem}")
                    summary.skipped += 1
                    if len(summary.skipped_examples) < MAX_REPORTED_SKIPS:
                        summary.skipped_examples.append(f"{where}: {problem}")
                if encoded.fatal is not None:
                    item = None
                    raise UserError(
                        f"{_where(path, first_line, encoded.fatal[0])}: {encoded.fatal[1]}"
                    )
                for location, problem in encoded.alphabet_examples:
                    if len(summary.alphabet_examples) < MAX_REPORTED_SKIPS:
                        summary.alphabet_examples.append(
                            f"{_where(path, first_line, location)}: {problem}"
                        )
                summary.alphabet_skipped += encoded.alphabet_skipped
                summary.alphabet_kept += encoded.alphabet_kept
                summary.records += encoded.records
                summary.windowed += encoded.windowed
                writer.write(item.tokens, encoded.lengths)
                lengths_parts.append(encoded.lengths)
                summary.sequences += len(encoded.lengths)
                summary.tokens += len(item.tokens)
                del item
                summary.truncated += encoded.truncated
                summary.input_bytes += encoded.input_bytes
                first_line += encoded.lines
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{summary.sequences / elapsed:,.0f} seq/s", refresh=False)
                bar.update(min(offsets[index] + consumed, total_bytes) - bar.n)
            writer.close()  # all chunks written before the index
            summary.padded_tokens = writer.padded_tokens
            if summary.sequences == 0:
                raise UserError(f"{', '.join(inputs)}: no sequences to write")
            bin_file.flush()
            lengths = np.concatenate(lengths_parts)
            sizes = (
                np.full(len(lengths), settings.max_length, dtype=np.int64)
                if settings.max_length is not None
                else lengths
            )
            # One item per document: doc_idx = [0, 1, ..., n] as savanna's builder writes it.
            write_index(idx_tmp, sizes, np.arange(len(sizes) + 1), tokenizer.DISK_DTYPE)
            summary.pair = pair_fingerprint(bin_tmp, idx_tmp)
            _remove_summary(output_prefix)  # never a summary beside a pair it does not describe
    finally:
        bar.close()
    summary.lengths = lengths
    summary.seconds = time.perf_counter() - started
    return summary


preprocess_jsonl = preprocess_files  # the name benchmarks and older callers use


# ---------------------------------------------------------------------------- summary <-> pair


def summary_path(output_prefix: str) -> Path:
    """Where the summary of a preprocessed prefix is written."""
    return Path(f"{output_prefix}_summary.json")


@contextlib.contextmanager
def output_lock(output_prefix: str):
    """Exclusive lock on the output's folder for one preprocess (a second one into the same
    folder waits, then writes a whole pair of its own). A lock on the folder itself leaves no
    lock file beside the user's data; without lock support the renames still keep each file whole.
    """
    folder = Path(output_prefix).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _file_crc(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            value = crc32(block, value)
    return value


def pair_fingerprint(bin_path: Path, idx_path: Path) -> dict:
    """Sizes and CRC32s of a .bin/.idx pair (CRC32 at several GB/s: a small cost next to the
    encoding), so a summary can say which pair it describes.
    """
    return {
        "bin_bytes": Path(bin_path).stat().st_size,
        "idx_bytes": Path(idx_path).stat().st_size,
        "bin_crc32": _file_crc(Path(bin_path)),
        "idx_crc32": _file_crc(Path(idx_path)),
    }


def _remove_summary(output_prefix: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        summary_path(output_prefix).unlink()


def check_summary(output_prefix: str, *, crc: bool = False) -> dict | None:
    """The summary beside a BIN/IDX pair, checked against it (sizes; CRC32s with `crc`).

    None when there is no summary (savanna's data, or an older preprocess). A summary that
    disagrees with its pair is an error naming both.
    """
    path = summary_path(output_prefix)
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable preprocessing summary ({err})") from None
    pair = summary.get("pair") if isinstance(summary, dict) else None
    if not isinstance(pair, dict):
        return summary  # written before summaries recorded their pair
    now = {
        "bin_bytes": Path(f"{output_prefix}.bin").stat().st_size,
        "idx_bytes": Path(f"{output_prefix}.idx").stat().st_size,
    }
    if crc:
        now = pair_fingerprint(Path(f"{output_prefix}.bin"), Path(f"{output_prefix}.idx"))
    for key, value in now.items():
        if pair.get(key) != value:
            raise UserError(
                f"{path} describes another {output_prefix}.bin/.idx ({key} {pair.get(key)} != "
                f"{value}): the files changed after preprocessing; preprocess again"
            )
    return summary


def save_conditions(output_prefix: str, field_name: str | None, tokens: dict[str, str]) -> Path:
    """The class name -> token mapping, next to the data, so generation can prompt by name."""
    path = conditions_path(output_prefix)
    text = json.dumps({"field": field_name, "tokens": dict(tokens)}, indent=2, sort_keys=True)
    write_text_atomic(path, text + "\n")
    return path


def load_conditions(output_prefix: str) -> dict[str, str]:
    """The conditioning mapping written next to a preprocessed prefix ({} when none)."""
    path = conditions_path(output_prefix)
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text())["tokens"])


def plot_lengths(lengths: np.ndarray, path: Path, title: str) -> None:
    """Histogram of document lengths as a PNG (Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(lengths, bins=min(50, max(1, len(np.unique(lengths)))), color="#3b7dd8")
    ax.set_xlabel("document length (tokens, conditioning token and EOD included)")
    ax.set_ylabel("documents")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def preprocess_to_prefix(
    data: DataConfig,
    inputs: list[str],
    output_prefix: str,
    context: int,
    *,
    progress: bool = True,
    plot: bool = True,
) -> PreprocessSummary:
    """Preprocess `inputs` into `output_prefix` (the savanna file prefix, without extension).

    Under a lock on the prefix: the .bin/.idx pair, then the conditioning mapping and the length
    plot, then `_summary.json` last (it names the pair's sizes and CRC32s).
    """
    settings = encode_settings(data, context)
    with output_lock(output_prefix):
        summary = preprocess_files(
            inputs, output_prefix, settings, workers=data.workers, progress=progress
        )
        if data.condition.enabled:
            save_conditions(output_prefix, _condition_source(data), settings.condition_tokens)
        if plot:
            plot_lengths(
                summary.lengths, Path(f"{output_prefix}_lengths.png"), Path(output_prefix).name
            )
        write_text_atomic(
            summary_path(output_prefix), json.dumps(summary.to_dict(), indent=2) + "\n"
        )
    return summary


def _condition_source(data: DataConfig) -> str | None:
    cond = data.condition
    if cond.field is not None:
        return cond.field
    return f"header_regex:{cond.header_regex}" if cond.header_regex else f"tsv:{cond.tsv}"


def run_preprocess(run: RunConfig) -> dict:
    """task=preprocess: data.input (JSONL/FASTA files) -> data.output_prefix BIN/IDX."""
    data = run.data
    inputs = DataConfig.as_list(data.input)
    if not inputs:
        raise UserError("data.input: give the JSONL or FASTA file(s) to preprocess")
    if data.output_prefix is None:
        raise UserError("data.output_prefix: give the output prefix (files get _text_...bin/.idx)")
    for path in inputs:
        if is_indexed_prefix(path) and not is_sequence_file(path):
            raise UserError(f"data.input: {path} is already a BIN/IDX prefix")
    prefix = output_prefix_for(data.output_prefix, data.text_key)
    summary = preprocess_to_prefix(data, inputs, prefix, run.ckpt.context)
    log.info("%s", summary.report())
    return summary.to_dict()
