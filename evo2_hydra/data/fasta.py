"""FASTA reading: .fa/.fasta/.fna (and .gz, bgzip) through pyfastx, checked before it parses.

pyfastx's streaming `Fastx` reader was picked by measurement (benchmarks/bench_fasta_parsers.py,
docs/data.md): on 100 MB of wrapped FASTA (1-10 kb records) it parsed 1426 MB/s where needletail
gave 362, Biopython's SimpleFastaParser 124 and dnaio 117; on gzip 97 vs 91/48/57 MB/s.
It also writes nothing next to the input (no index files) and handles multi-record, wrapped
lines, CRLF and multi-member gzip (bgzip).

What it does silently, measured on 2.3.1 and checked here instead: a NUL byte ends its line (the
rest of the line is dropped), text before the first '>' is dropped, a truncated or corrupt gzip
ends the file early without an error, and a file named .gz that is not gzip is read as plain text.
`check_file` makes one pass over the bytes first (memchr-speed for plain files; the decompression
for gzip, which also verifies every member's CRC) and turns each of these into one line naming the
file and line. Records then come with their number, so every later message can name them.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from evo2_hydra.errors import UserError

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fas")
COMPRESSED_SUFFIXES = (".gz", ".bgz")
GZIP_MAGIC = b"\x1f\x8b"
BLOCK = 8 << 20

try:  # zlib-ng decompresses gzip ~2x faster with the same checks; the standard library otherwise
    from zlib_ng import gzip_ng as _gzip
except ImportError:  # pragma: no cover
    _gzip = gzip


def is_fasta(path: str) -> bool:
    """Whether a path names a FASTA file (.fa/.fasta/.fna, optionally compressed)."""
    name = path.lower()
    for ext in COMPRESSED_SUFFIXES:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return name.endswith(FASTA_SUFFIXES)


@dataclass
class FastaRecord:
    """One FASTA record: its number, id, description and sequence."""

    number: int  # 1-based record number in the file
    id: str  # the header up to the first whitespace
    description: str  # the rest of the header line
    sequence: str  # lines joined, as in the file (case kept)

    @property
    def header(self) -> str:
        return f"{self.id} {self.description}" if self.description else self.id


def describe(path: str, record: FastaRecord) -> str:
    """`path: record 3 ('chr2')`, the location every message about a record uses."""
    return f"{path}: record {record.number} ({record.id!r})"


def _line_of(consumed_lines: int, block: bytes, offset: int) -> int:
    return consumed_lines + block.count(b"\n", 0, offset) + 1


def check_file(path: str) -> int:
    """One pass over the bytes: readable, gzip when it says so (and intact), starts with a
    header, holds no NUL byte. Returns the (uncompressed) size; raises UserError naming the
    file (and line).
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    compressed = magic == GZIP_MAGIC
    if path.lower().endswith(COMPRESSED_SUFFIXES) and not compressed:
        raise UserError(f"{path}: named {Path(path).suffix} but is not gzip-compressed")
    opener = _gzip.open if compressed else open
    lines = size = 0
    first = None
    try:
        with opener(path, "rb") as f:
            while block := f.read(BLOCK):
                size += len(block)
                if first is None:
                    stripped = block.lstrip()
                    if stripped:
                        first = stripped[:1]
                        if first != b">":
                            what = "a FASTQ record" if first == b"@" else f"{first!r}"
                            line = _line_of(0, block, len(block) - len(stripped))
                            raise UserError(
                                f"{path}:{line}: expected a FASTA header starting with '>', "
                                f"found {what}"
                            )
                nul = block.find(b"\x00")
                if nul >= 0:
                    raise UserError(
                        f"{path}:{_line_of(lines, block, nul)}: NUL byte (byte 0 = the EOD "
                        "token); a FASTA file holds text only"
                    )
                lines += block.count(b"\n")
    except (OSError, EOFError, zlib.error) as err:  # truncated or corrupt gzip, read errors
        detail = getattr(err, "strerror", None) or str(err)
        raise UserError(f"{path}: cannot read the gzip stream ({detail})") from None
    if first is None:
        raise UserError(f"{path}: no FASTA records (the file is empty)")
    return size


def iter_records(path: str, *, checked: bool = False) -> Iterator[FastaRecord]:
    """Records of `path` in file order. An empty id is an error here; an empty sequence is
    yielded (the caller decides: preprocessing may skip it, scoring cannot).
    """
    import pyfastx

    if not checked:
        check_file(path)
    number = 0
    try:
        for name, sequence, comment in pyfastx.Fastx(
            path, format="fasta", uppercase=False, comment=True
        ):
            number += 1
            if not name:
                raise UserError(
                    f"{path}: record {number}: a '>' with no id (expected '>ID [description]')"
                )
            yield FastaRecord(number, name, comment or "", sequence)
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: record {number + 1}: not valid UTF-8 ({err.reason} at byte {err.start})"
        ) from None
    except RuntimeError as err:  # pyfastx's own errors
        raise UserError(f"{path}: record {number + 1}: cannot parse ({err})") from None


# ------------------------------------------------------------------------------ preprocessing


def _condition_token(record: FastaRecord, settings, pattern) -> tuple[bytes, str | None]:
    """(the conditioning token's byte, or a problem) of one record: from its header
    (data.condition.header_regex) or its id (data.condition.tsv).
    """
    if pattern is not None:
        match = pattern.search(record.header)
        if match is None:
            return b"", (
                f"header {record.header[:80]!r} does not match data.condition.header_regex="
                f"{settings.condition_header_regex!r}"
            )
        name = match.group(1)
        source = "data.condition.header_regex"
    elif settings.condition_by_id is not None:
        name = settings.condition_by_id.get(record.id)
        if name is None:
            return b"", "id not in data.condition.tsv"
        source = "data.condition.tsv"
    else:
        return b"", None
    mapped = settings.condition_tokens.get(name)
    if mapped is None:
        known = ", ".join(sorted(settings.condition_tokens)) or "none"
        return (
            b"",
            f"class {name!r} (from {source}) is not in data.condition.tokens (known: {known})",
        )
    return mapped.encode("utf-8"), None


def encode_fasta(path: str, settings, chunk_bytes: int = 1 << 20):
    """EncodedChunks of a FASTA file, about `chunk_bytes` of sequence each, in record order.

    Records of a chunk go through `encode_plain` in one join when nothing needs per-record work,
    else one by one through `DocumentEncoder`, which gives the same bytes.
    """
    from evo2_hydra.data.encode import DocumentEncoder, EncodedChunk, encode_plain

    total = check_file(path)
    pattern = settings.header_pattern
    conditioned = pattern is not None or settings.condition_by_id is not None
    reported = 0

    def encode(batch: list[FastaRecord], last: bool) -> EncodedChunk:
        nonlocal reported
        estimate = sum(len(r.sequence) + len(r.id) + len(r.description) + 3 for r in batch)
        input_bytes = total - reported if last else min(estimate, total - reported)
        reported += input_bytes
        fast = None
        if not conditioned and all(r.sequence for r in batch):
            fast = encode_plain([r.sequence for r in batch], None, settings)
        if fast is not None:
            tokens, lengths = fast
            return EncodedChunk(path, tokens, lengths, [], input_bytes, 0, records=len(batch))
        encoder = DocumentEncoder(settings)
        for record in batch:
            location = describe(path, record)
            if not record.sequence:
                encoder.problem(location, "empty sequence (a header with no sequence lines)")
            else:
                token, problem = _condition_token(record, settings, pattern)
                if problem is not None:
                    encoder.problem(location, problem)
                else:
                    encoder.add(record.sequence, token, location)
            if encoder.stopped:
                break
        return encoder.finish(path, input_bytes, 0)

    batch: list[FastaRecord] = []
    size = 0
    for record in iter_records(path, checked=True):
        batch.append(record)
        size += len(record.sequence)
        if size >= chunk_bytes:
            yield encode(batch, False)
            batch, size = [], 0
    yield encode(batch, True)
