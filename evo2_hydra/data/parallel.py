"""Chunk encoding in worker processes without pushing token data through pipes.

A pipe round trip costs more than parsing (measured ~0.5 GB/s here), so: workers read their own
byte range of an uncompressed input (the main process only finds newline-aligned cut points), and
write their tokens into a shared-memory slot the main process then writes to the .bin directly.
Only small metadata (document lengths, problems) is pickled. A fixed set of slots bounds memory.
Spawned workers share the parent's resource tracker, so the parent's unlink is the only cleanup.
.gz inputs are decompressed by the main process and sent to workers as bytes (decompression is
slower than the pipe anyway).
"""

from __future__ import annotations

import multiprocessing
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from evo2_hydra.data.jsonl import (
    Chunk,
    EncodedChunk,
    EncodeSettings,
    encode_chunk,
    iter_chunks,
    plan_ranges,
    read_range,
)
from evo2_hydra.data.tokenizer import DISK_DTYPE


@dataclass
class ChunkTask:
    """A byte range of an input file for one worker process to encode."""

    path: str
    start: int
    end: int
    data: bytes | None  # None: the worker reads [start, end) of `path` itself
    slot: str  # shared-memory block to put the tokens in
    slot_bytes: int


@dataclass
class Encoded:
    """An encoded chunk whose tokens are either in `chunk.tokens` or in a shared slot."""

    chunk: EncodedChunk
    tokens: (
        np.ndarray
    )  # uint8 tokens, or uint16 already widened (a view, valid until the next chunk)
    consumed: int
    index: int  # which input file


_ATTACHED: dict[str, shared_memory.SharedMemory] = {}


def encode_task(task: ChunkTask, settings: EncodeSettings) -> EncodedChunk:
    """Worker side: read, encode, put the tokens into the slot; return the metadata.

    Contiguous packing: the worker already widens to the on-disk uint16, so the main process only
    writes the slot to the .bin. Padded packing: uint8 (the main process lays out the rows).
    """
    data = task.data if task.data is not None else read_range(task.path, task.start, task.end)
    encoded = encode_chunk(Chunk(task.path, data, task.end), settings)
    dtype = DISK_DTYPE if settings.max_length is None else np.dtype(np.uint8)
    count = len(encoded.tokens)
    if count * dtype.itemsize <= task.slot_bytes:
        shm = _ATTACHED.get(task.slot)
        if shm is None:
            shm = _ATTACHED[task.slot] = shared_memory.SharedMemory(name=task.slot)
        out = np.ndarray((count,), dtype=dtype, buffer=shm.buf)
        np.copyto(out, np.frombuffer(encoded.tokens, dtype=np.uint8))
        del out
        encoded.tokens = count  # type: ignore[assignment] - the data is in the slot
    return encoded  # an oversized chunk (one huge line) travels through the pipe instead


def _tokens(
    encoded: EncodedChunk, slot: shared_memory.SharedMemory, settings: EncodeSettings
) -> np.ndarray:
    if isinstance(encoded.tokens, int):
        dtype = DISK_DTYPE if settings.max_length is None else np.dtype(np.uint8)
        return np.frombuffer(slot.buf, dtype=dtype, count=encoded.tokens)
    return np.frombuffer(encoded.tokens, dtype=np.uint8)


def _tasks(inputs: list[str], chunk_bytes: int) -> Iterator[tuple[int, int, int, bytes | None]]:
    for index, path in enumerate(inputs):
        if path.endswith(".gz"):
            for chunk in iter_chunks(path, chunk_bytes):
                yield index, 0, chunk.consumed, chunk.data
        else:
            for start, end in plan_ranges(path, chunk_bytes):
                yield index, start, end, None


def encode_parallel(
    inputs: list[str], settings: EncodeSettings, workers: int, chunk_bytes: int
) -> Iterator[Encoded]:
    """Encoded chunks of all inputs, in input order, encoded by `workers` processes."""
    n_slots = 2 * workers
    # Tokens never outnumber input bytes; uint16 doubles that; twice again for a long last line.
    slot_bytes = 4 * chunk_bytes
    slots = [shared_memory.SharedMemory(create=True, size=slot_bytes) for _ in range(n_slots)]
    free = deque(range(n_slots))
    in_flight: deque = deque()
    # fork starts in milliseconds, but a parent that imported torch has threads fork does not
    # carry over safely: then spawn.
    context = multiprocessing.get_context("spawn" if "torch" in sys.modules else "fork")
    executor = ProcessPoolExecutor(workers, mp_context=context)
    try:
        tasks = _tasks(inputs, chunk_bytes)
        exhausted = False
        previous_slot = None
        while True:
            while free and not exhausted:
                item = next(tasks, None)
                if item is None:
                    exhausted = True
                    break
                index, start, end, data = item
                slot = free.popleft()
                task = ChunkTask(inputs[index], start, end, data, slots[slot].name, slot_bytes)
                in_flight.append((index, slot, end, executor.submit(encode_task, task, settings)))
            if not in_flight:
                return
            index, slot, consumed, future = in_flight.popleft()
            encoded = future.result()
            # The consumer is done with the previous slot once it asks for the next chunk.
            if previous_slot is not None:
                free.append(previous_slot)
            previous_slot = slot
            # No local reference to the slot view: when the consumer drops the chunk, the slot can
            # be closed (a live view makes SharedMemory.close fail).
            yield Encoded(encoded, _tokens(encoded, slots[slot], settings), consumed, index)
    finally:
        for _, _, _, future in in_flight:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
        for shm in slots:
            try:
                shm.close()
            except BufferError:  # a view is still alive somewhere; unlink regardless
                pass
            shm.unlink()
