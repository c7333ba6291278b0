"""The one sequence-file reader of the inference tasks (score, embed, vep, generate prompts).

    for record in iter_sequences(path, key="score.input", policy=policy):
        record.index, record.id, record.text   # text = model input under the run's text policy

Reads JSONL (`.jsonl`, `.json`, plain or gzip: one object per line with the sequence under
`text_key` and an optional `id`) and FASTA (`.fa/.fasta/.fna/.fas`, plain, gzip or bgzip: the
record id is the id). Every text goes through `TextPolicy.normalize(model=True)`: checked
against `data.charset` and upper-cased when the run trained upper-cased, exactly as training saw
it. A record the policy skips keeps its place in the numbering (`index` counts every record of
the file) and is reported through `skipped`. Any problem is one UserError naming the file and
the line or record.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from evo2_hydra.data.fasta import describe, is_fasta, iter_records
from evo2_hydra.data.jsonl import is_jsonl
from evo2_hydra.data.text import TextPolicy
from evo2_hydra.errors import UserError

try:  # orjson parses 3-5x faster; the standard library gives the same objects
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import loads as _loads

FORMATS = "JSONL (.jsonl[.gz]) or FASTA (.fa/.fasta/.fna/.fas[.gz])"


@dataclass
class SequenceRecord:
    """One sequence read for inference: position, id and the checked model input."""

    index: int  # 0-based position among the file's records (skipped ones included)
    id: object  # FASTA: the record id; JSONL: the `id` value (None when absent)
    text: str  # model input: checked and normalised by the text policy
    where: str  # "file:line" or "file: record N ('id')", for messages


def is_sequence_file(path: str) -> bool:
    """Whether a path names a JSONL or FASTA file."""
    return is_jsonl(path) or is_fasta(path)


def _jsonl_lines(path: str) -> Iterator[tuple[int, bytes]]:
    try:
        with open(path, "rb") as raw:
            magic = raw.read(2)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    compressed = magic == b"\x1f\x8b"
    if path.endswith(".gz") and not compressed:
        raise UserError(f"{path}: named .gz but is not gzip-compressed")
    try:
        with (gzip.open if compressed else open)(path, "rb") as f:
            yield from enumerate(f, start=1)
    except (OSError, EOFError, zlib.error) as err:
        detail = getattr(err, "strerror", None) or str(err)
        raise UserError(f"{path}: cannot read ({detail})") from None


def _jsonl_records(path: str, text_key: str, setting: str) -> Iterator[tuple[object, str, str]]:
    """(id, text, where) per non-blank line."""
    for lineno, line in _jsonl_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = _loads(line)
        except ValueError as err:  # JSONDecodeError and invalid UTF-8
            raise UserError(f"{where}: not valid JSON ({getattr(err, 'msg', err)})") from None
        text = obj.get(text_key) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise UserError(
                f"{where}: expected an object with a string '{text_key}' "
                f"(set {setting} for another field)"
            )
        yield obj.get("id"), text, where


def iter_sequences(
    path: str | Path,
    *,
    key: str,
    policy: TextPolicy,
    text_key: str = "text",
    min_length: int = 1,
    skipped: list[str] | None = None,
) -> Iterator[SequenceRecord]:
    """Records of a JSONL or FASTA file as model input (see the module docstring).

    `key` names the setting the path came from (e.g. `score.input`) for messages; records of
    fewer than `min_length` characters are an error; records the policy skips are appended to
    `skipped` (as their location and problem).
    """
    path = str(path)
    if not Path(path).is_file():
        raise UserError(f"{key}={path}: no such file")
    if is_fasta(path):
        source = (
            (record.id, record.sequence, describe(path, record)) for record in iter_records(path)
        )
    elif is_jsonl(path):
        section = key.rsplit(".", 1)[0] if "." in key else key
        source = _jsonl_records(path, text_key, f"{section}.text_key")
    else:
        raise UserError(f"{key}={path}: expected {FORMATS}")
    index = -1
    for record_id, text, where in source:
        index += 1
        if len(text) < min_length:
            raise UserError(
                f"{where}: sequence of {len(text)} characters; expected at least {min_length}"
            )
        normalized = policy.normalize(text, where, model=True)
        if normalized is None:
            if skipped is not None:
                skipped.append(f"{where}: {policy.problem(text)}")
            continue
        yield SequenceRecord(index, record_id, normalized, where)
    if index < 0:
        raise UserError(f"{path}: no sequences")


def read_sequences(path: str | Path, **kwargs) -> tuple[list[SequenceRecord], list[str]]:
    """All records (checked before any work starts) and the locations the policy skipped."""
    skipped: list[str] = []
    records = list(iter_sequences(path, skipped=skipped, **kwargs))
    return records, skipped
