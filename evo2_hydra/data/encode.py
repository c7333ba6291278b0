"""Documents -> token bytes: the text policy, windows, reverse complements, conditioning tokens.

Shared by the JSONL and FASTA readers, so the same sequences give the same bytes whatever file
they came in. A document is one record's text (case kept: the loss weights lowercase labels);
each becomes one or more stored documents:

    [conditioning token] + window (+ its reverse complement, as its own document) + [EOD]

Windows (`data.window`, `data.stride`): a text longer than `window` tokens is cut at starts
0, stride, 2·stride, ... into windows of `window` tokens while they fit; consecutive windows
overlap by `window - stride` tokens (none when stride = window; a gap when stride > window). The
rest, if any of it is not yet covered, becomes one shorter last window (dropped with
`keep_partial_window=false`). A text of at most `window` tokens is one document as it is.

Reverse complement (`data.reverse_complement`): `both` stores each window and then its reverse
complement; `random` stores one of the two, chosen by hashing `reverse_complement_seed` with the
window's bytes, so the choice depends on nothing else (not the chunking, worker count or file
order) and a preprocess gives the same bytes every time. A/C/G/T/U/N and IUPAC codes are
complemented in their own case (U -> A); other characters are kept as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from evo2_hydra.data.text import TextPolicy

EOD_PIECE = b"\x00"
COMPLEMENT = bytes.maketrans(
    b"ACGTUNRYSWKMBDHVacgtunryswkmbdhv", b"TGCAANYRSWMKVHDBtgcaanyrswmkvhdb"
)
MAX_REPORTED = 10


def reverse_complement(seq: bytes) -> bytes:
    """Reverse complement of a byte sequence (IUPAC codes and case kept)."""
    return seq.translate(COMPLEMENT)[::-1]


def _mix64(x: int) -> int:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    x &= 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def flip_window(seq: bytes, seed: int) -> bool:
    """reverse_complement=random: whether this window is stored reverse-complemented."""
    from evo2_hydra.io_utils import crc32

    return bool(_mix64(crc32(seq) ^ _mix64(seed + 0x9E3779B97F4A7C15)) & 1)


def window_spans(
    n: int, window: int | None, stride: int | None, keep_partial: bool
) -> list[tuple[int, int]]:
    """[start, end) of each window of a text of `n` tokens (see the module docstring)."""
    if window is None or n <= window:
        return [(0, n)]
    step = stride or window
    spans = [(start, start + window) for start in range(0, n - window + 1, step)]
    tail = spans[-1][0] + step
    if keep_partial and tail < n and spans[-1][1] < n:
        spans.append((tail, n))
    return spans


@dataclass(frozen=True)
class EncodeSettings:
    """Everything that decides the tokens of one document (picklable for worker processes)."""

    text_key: str = "text"
    append_eod: bool = True
    max_length: int | None = None  # padded mode: longest document in tokens (= ckpt.context)
    truncate: bool = False  # cut documents longer than max_length instead of reporting them
    condition_field: str | None = None
    condition_tokens: dict[str, str] = field(default_factory=dict)
    condition_header_regex: str | None = None  # FASTA: the class name from the header
    condition_by_id: dict[str, str] | None = None  # FASTA: record id -> class name (the TSV)
    stop_at_first_problem: bool = (
        True  # data.on_error=fail: nothing after the first problem matters
    )
    policy: TextPolicy = field(default_factory=TextPolicy)
    window: int | None = None  # tokens per window (resolved: never 0 here)
    stride: int | None = None
    keep_partial_window: bool = True
    reverse_complement: str = "none"  # none | both | random
    reverse_complement_seed: int = 1234

    @property
    def plain(self) -> bool:
        """No per-document transformation: the texts go to disk as they are."""
        return self.reverse_complement == "none"

    def fits_window(self, longest: int) -> bool:
        return self.window is None or longest <= self.window

    @property
    def header_pattern(self) -> re.Pattern | None:
        return re.compile(self.condition_header_regex) if self.condition_header_regex else None


@dataclass
class EncodedChunk:
    """One encoded chunk of input: token bytes, document lengths and what was skipped."""

    path: str
    tokens: bytes  # all documents' token bytes, EOD pieces included, unpadded
    lengths: np.ndarray  # int32 tokens per document (conditioning token and EOD included)
    # (line within the chunk, or a full location string, what is wrong)
    problems: list[tuple[int | str, str]]
    input_bytes: int
    lines: int  # lines in the chunk (the caller turns chunk-relative line numbers into absolute)
    truncated: int = 0
    records: int = 0  # input records that produced documents
    windowed: int = 0  # records cut into several windows
    alphabet_skipped: int = 0  # records left out by data.alphabet=skip
    alphabet_kept: int = 0  # records kept with unexpected characters (data.alphabet=keep)
    alphabet_examples: list[tuple[int | str, str]] = field(default_factory=list)
    fatal: tuple[int | str, str] | None = None  # stops the run whatever data.on_error says


class DocumentEncoder:
    """Collects the documents of one chunk: `add(text, token, location)` per input record."""

    def __init__(self, settings: EncodeSettings):
        self.settings = settings
        self.pieces: list[bytes] = []
        self.lengths: list[int] = []
        self.problems: list[tuple[int | str, str]] = []
        self.truncated = 0
        self.records = 0
        self.windowed = 0
        self.alphabet_skipped = 0
        self.alphabet_kept = 0
        self.alphabet_examples: list[tuple[int | str, str]] = []
        self.fatal: tuple[int | str, str] | None = None
        self.eod = 1 if settings.append_eod else 0

    @property
    def stopped(self) -> bool:
        return self.fatal is not None or (
            bool(self.problems) and self.settings.stop_at_first_problem
        )

    def problem(self, location: int | str, message: str) -> None:
        self.problems.append((location, message))

    def add(self, text: str, token: bytes, location: int | str) -> None:
        """One record's text (checked against the policy here) with its conditioning token."""
        settings = self.settings
        policy = settings.policy
        if not policy.accepts(text):
            action, detail = policy.verdict(text)
            if action == "error":
                self.fatal = (location, detail)
                return
            if len(self.alphabet_examples) < MAX_REPORTED:
                self.alphabet_examples.append((location, detail))
            if action == "skip":
                self.alphabet_skipped += 1
                return
            self.alphabet_kept += 1
        try:
            body = text.encode("utf-8")
        except UnicodeEncodeError as err:
            self.problem(location, f"not valid Unicode ({err.reason})")
            return
        spans = window_spans(
            len(body), settings.window, settings.stride, settings.keep_partial_window
        )
        if spans != [(0, len(body))]:
            self.windowed += 1
        max_length = settings.max_length
        documents = []
        for start, end in spans:
            piece = body if end - start == len(body) else body[start:end]
            if settings.reverse_complement == "both":
                documents += [piece, reverse_complement(piece)]
            elif settings.reverse_complement == "random" and flip_window(
                piece, settings.reverse_complement_seed
            ):
                documents.append(reverse_complement(piece))
            else:
                documents.append(piece)
        for piece in documents:
            length = len(token) + len(piece) + self.eod
            if max_length is not None and length > max_length:
                if not settings.truncate:
                    self.problem(
                        location,
                        f"sequence of {length} tokens (conditioning token and EOD included) is "
                        f"longer than ckpt.context={max_length} in padded packing; "
                        "set data.truncate=true to cut it or data.window=0 to cut it into windows",
                    )
                    return
                piece = piece[: max_length - len(token) - self.eod]
                length = max_length
                self.truncated += 1
            if token:
                self.pieces.append(token)
            self.pieces.append(piece)
            if self.eod:
                self.pieces.append(EOD_PIECE)
            self.lengths.append(length)
        self.records += 1

    def finish(self, path: str, input_bytes: int, lines: int) -> EncodedChunk:
        return EncodedChunk(
            path=path,
            tokens=b"".join(self.pieces),
            lengths=np.asarray(self.lengths, dtype=np.int32),
            problems=self.problems,
            input_bytes=input_bytes,
            lines=lines,
            truncated=self.truncated,
            records=self.records,
            windowed=self.windowed,
            alphabet_skipped=self.alphabet_skipped,
            alphabet_kept=self.alphabet_kept,
            alphabet_examples=self.alphabet_examples,
            fatal=self.fatal,
        )


def encode_plain(
    texts: list[str], tokens: list[str] | None, settings: EncodeSettings
) -> tuple[bytes, np.ndarray] | None:
    r"""The fast path: every text good under the policy, no window to cut, no transformation.

    One join builds the whole buffer (EOD as a "\x00" separator). None when anything needs the
    per-document path (which gives the same bytes, and the exact location of each problem).
    """
    if not texts or not settings.plain or not all(type(t) is str and t for t in texts):
        return None
    lengths = np.fromiter((len(t) for t in texts), np.int32, len(texts))
    if not settings.fits_window(int(lengths.max())):
        return None
    if not settings.policy.accepts("".join(texts)):  # ASCII only: characters are bytes
        return None
    eod = "\x00" if settings.append_eod else ""
    if tokens is not None:
        if not all(type(t) is str and len(t) == 1 and t.isascii() for t in tokens):
            return None
        joined = "".join(
            [piece for triple in zip(tokens, texts, [eod] * len(texts)) for piece in triple]
        )
        lengths += 1
    else:
        joined = eod.join(texts) + eod
    lengths += len(eod)
    if settings.max_length is not None and lengths.max() > settings.max_length:
        return None
    return joined.encode("ascii"), lengths
