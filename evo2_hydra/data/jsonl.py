r"""Streaming JSONL reading and per-chunk encoding to tokens, with line-numbered problems.

The input is read in newline-aligned chunks of about 1 MiB. A chunk of plain documents is parsed
by a single orjson call (its lines joined into one JSON array) and its texts joined into one token
buffer in one go, an EOD being a "\x00" separator; anything unusual in a chunk sends it through
the line-by-line path, which gives the same bytes plus the exact line number of each problem. Either
way the work is a handful of C-level passes per chunk (never per character in Python), and chunks
are independent, which lets `preprocess` farm them out to worker processes.
"""

from __future__ import annotations

import contextlib
import gzip
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

try:  # orjson parses 3-5x faster; the standard library gives the same objects
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import loads as _loads

from evo2_hydra.data.encode import DocumentEncoder, EncodedChunk, EncodeSettings, encode_plain
from evo2_hydra.errors import UserError

__all__ = ["Chunk", "EncodedChunk", "EncodeSettings", "encode_chunk", "is_jsonl", "iter_chunks"]

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


def is_jsonl(path: str) -> bool:
    """Whether a path names a JSONL file (.jsonl or .jsonl.gz)."""
    return path.endswith(JSONL_SUFFIXES)


@dataclass
class Chunk:
    """A newline-aligned piece of a JSONL file, with its position for line numbers."""

    path: str
    data: bytes  # whole lines
    consumed: int  # input bytes (compressed for .gz) read from the file when this chunk was cut


class _Progress:
    """File position of the raw (possibly compressed) input, for the progress bar."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw

    def tell(self) -> int:
        return self.raw.tell()


def _open(path: str) -> tuple[BinaryIO, _Progress]:
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by iter_chunks
    except OSError as err:
        raise UserError(f"{path}: cannot open input ({err.strerror})") from None
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
    return stream, _Progress(raw)


def plan_ranges(path: str, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """(start, end) byte ranges of about `chunk_bytes`, each ending just after a newline.

    Only for uncompressed files: worker processes then read their own ranges, so the input never
    passes through a pipe.
    """
    size = input_size(path)
    with open(path, "rb") as f:
        start = 0
        while start < size:
            end = min(start + chunk_bytes, size)
            f.seek(end)
            while end < size:
                block = f.read(1 << 16)
                if not block:
                    end = size
                    break
                newline = block.find(b"\n")
                if newline >= 0:
                    end += newline + 1
                    break
                end += len(block)
            yield start, end
            start = end


def read_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def iter_chunks(path: str, chunk_bytes: int = 8 << 20) -> Iterator[Chunk]:
    """Newline-aligned chunks of `path` (streaming: at most ~2 chunks in memory)."""
    stream, progress = _open(path)
    carry = b""
    try:
        while True:
            try:
                block = stream.read(chunk_bytes)
            except (OSError, EOFError) as err:  # e.g. a truncated or corrupt .gz
                raise UserError(f"{path}: cannot read input ({err})") from None
            if not block:
                if carry:
                    yield Chunk(path, carry, progress.tell())
                return
            data = carry + block if carry else block
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one very long line: keep reading until it ends
                carry = data
                continue
            carry = data[cut:]
            yield Chunk(path, data[:cut], progress.tell())
    finally:
        stream.close()
        progress.raw.close()


def prefetch(chunks: Iterator[Chunk], depth: int = 2) -> Iterator[Chunk]:
    """Read ahead in a background thread (file reads and zlib release the GIL, so reading the
    next chunk overlaps with encoding this one). Errors surface in the consumer.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for chunk in chunks:
                while not stop.is_set():
                    try:
                        items.put(chunk, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            items.put(err)

    thread = threading.Thread(target=produce, name="jsonl-reader", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                items.get_nowait()
            thread.join(timeout=0.05)
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _describe(value) -> str:
    return "null" if value is None else type(value).__name__


def _encode_whole_chunk(chunk: Chunk, settings: EncodeSettings) -> EncodedChunk | None:
    """The fast path for a chunk where every line is a plain, good, ASCII document.

    The chunk's lines become one JSON array (newlines cannot occur inside JSON strings, so
    replacing them by commas is exact) parsed by a single orjson call; `encode_plain` joins the
    texts in one go. Anything unusual (a bad or blank line, a character the text policy does not
    expect, a class not in the mapping, a window to cut, a document to truncate or reject)
    returns None and the caller takes the line-by-line path, which produces the same tokens and
    the exact line numbers.
    """
    data = chunk.data
    body = data[:-1] if data.endswith(b"\n") else data
    try:
        objs = _loads(b"[" + body.replace(b"\n", b",") + b"]")
        texts = [obj[settings.text_key] for obj in objs]
        tokens = (
            [settings.condition_tokens[obj[settings.condition_field]] for obj in objs]
            if settings.condition_field is not None
            else None
        )
    except (ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError
        return None
    encoded = encode_plain(texts, tokens, settings)
    if encoded is None:
        return None
    joined, lengths = encoded
    return EncodedChunk(
        path=chunk.path,
        tokens=joined,
        lengths=lengths,
        problems=[],
        input_bytes=len(data),
        lines=body.count(b"\n") + 1,
        records=len(texts),
    )


def _condition_token(obj: dict, settings: EncodeSettings) -> tuple[bytes, str | None]:
    """(the conditioning token's byte, or a problem) for one JSONL object."""
    cond_field = settings.condition_field
    if cond_field is None:
        return b"", None
    if cond_field not in obj:
        return b"", (
            f"no '{cond_field}' key (data.condition.field; "
            f"data.condition.field=null uses sequences as they are)"
        )
    value = obj[cond_field]
    name = value if type(value) is str else None
    if type(value) is int:
        name = str(value)
    mapped = settings.condition_tokens.get(name) if name is not None else None
    if mapped is None:
        known = ", ".join(sorted(settings.condition_tokens)) or "none"
        return b"", f"{cond_field}={value!r} is not in data.condition.tokens (known: {known})"
    token = mapped.encode("utf-8")
    if len(token) != 1:
        return b"", (
            f"{cond_field}={value!r} maps to {mapped!r}, which is "
            f"{len(token)} bytes; a conditioning token must be one byte"
        )
    return token, None


def encode_chunk(chunk: Chunk, settings: EncodeSettings) -> EncodedChunk:
    """Tokens of every document in `chunk`; bad lines become (line, problem) entries."""
    fast = _encode_whole_chunk(chunk, settings)
    if fast is not None:
        return fast
    encoder = DocumentEncoder(settings)
    key = settings.text_key
    loads = _loads
    data = chunk.data
    view = memoryview(data)  # lines are parsed in place, without copying them out
    size = len(data)
    pos = 0
    i = -1
    while pos < size and not encoder.stopped:
        i += 1
        end = data.find(b"\n", pos)
        if end < 0:
            end = size
        start, pos = pos, end + 1
        if start == end:
            continue  # a blank line carries no document
        problem = None
        try:
            obj = loads(view[start:end])
        except ValueError as err:  # JSONDecodeError and invalid UTF-8
            if data[start:end].isspace():
                continue
            detail = f"{err.msg} at column {err.colno}" if hasattr(err, "colno") else str(err)
            problem = f"malformed JSON: {detail}"
        else:
            if type(obj) is not dict:
                problem = f"expected a JSON object with a '{key}' key, got a {_describe(obj)}"
            elif key not in obj:
                problem = f"no '{key}' key (data.text_key)"
            else:
                text = obj[key]
                if type(text) is not str:
                    problem = f"'{key}' is a {_describe(text)}, expected a string"
                elif not text:
                    problem = f"empty sequence in '{key}'"
        token = b""
        if problem is None:
            token, problem = _condition_token(obj, settings)
        if problem is not None:
            encoder.problem(i, problem)
            continue
        encoder.add(text, token, i)
    return encoder.finish(chunk.path, size, i + 1)


def input_size(path: str) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0
