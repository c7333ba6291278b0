"""What the inference tasks (embed, vep; score's chunking) share: input records, output folders,
the model, and running token sequences through it in chunks.

Input reading goes through the data package's one sequence reader (`evo2_hydra.data.records`:
JSONL or FASTA, the run's text policy).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from evo2_hydra.config import CkptConfig, DataConfig, ModelConfig
from evo2_hydra.data.records import SequenceRecord, read_sequences
from evo2_hydra.data.text import TextPolicy
from evo2_hydra.errors import UserError
from evo2_hydra.infer.memory import choose_chunk_tokens, keep_cpu_heap_flat
from evo2_hydra.model import StripedHyena2
from evo2_hydra.model.chunked import Capture, chunk_spans, forward_chunk, new_cache

log = logging.getLogger(__name__)

PAD_ID = 1  # CharLevelTokenizer pad; right padding never reaches earlier positions (causal)


# ------------------------------------------------------------------------------ input


def read_records(
    path: str | Path,
    text_key: str,
    max_len: int,
    key: str,
    policy: TextPolicy | None = None,
    min_length: int = 1,
) -> list[SequenceRecord]:
    """Every sequence of `key`'s input (JSONL or FASTA, plain or gzip) as model input under the
    run's text policy (`policy_for_checkpoint`), validated before any work; errors name the file
    and line or record (`evo2_hydra.data.records`). `min_length`: 2 where a score needs a
    next-token prediction.
    """
    records, skipped = read_sequences(
        path, key=key, policy=policy or TextPolicy(), text_key=text_key, min_length=min_length
    )
    if skipped:
        log.warning(
            "%s: skipped %d sequences with characters outside data.charset "
            "(data.alphabet=skip), e.g. %s",
            key,
            len(skipped),
            skipped[0],
        )
    for r in records:
        if len(r.text.encode("utf-8")) > max_len:
            raise UserError(
                f"{r.where}: sequence of {len(r.text.encode('utf-8'))} tokens exceeds "
                f"ckpt.context={max_len}"
            )
    if not records:
        raise UserError(f"{path}: no sequences left ({key})")
    return records


def tokenize(text: str) -> list[int]:
    """Evo 2's CharLevelTokenizer: the UTF-8 bytes of the text as given."""
    return list(text.encode("utf-8"))


# ------------------------------------------------------------------------------ model and outputs


@dataclass
class Source:
    """The model a task runs, and where its facts came from."""

    model: ModelConfig
    context: int
    run_folder: Path | None  # one of our run folders, when ckpt.path is (in) one
    checkpoint: dict


def describe(ckpt: CkptConfig, model: ModelConfig, data: DataConfig) -> Source:
    """Model and context from our run's saved config when `ckpt.path` is one of our runs, else
    from the command line (as `task=generate` reads them).
    """
    from evo2_hydra.generate import describe_source

    src = describe_source(ckpt, model, data)
    return Source(src.model, src.context, run_folder_of(ckpt.path), src.checkpoint)


def run_folder_of(path: str | None) -> Path | None:
    """The run folder when `path` is one of our runs (a folder with checkpoints/ whose step
    folders carry configs/config.yaml), or a step folder / file inside one.
    """
    if not path:
        return None
    from evo2_hydra.checkpoint import locate_checkpoint
    from evo2_hydra.checkpoint.layout import RUN_CHECKPOINT_SUBDIR

    location = locate_checkpoint(path)
    step = location.step_dir
    if step is None or step.parent.name != RUN_CHECKPOINT_SUBDIR:
        return None
    if not (step / "configs" / "config.yaml").is_file():
        return None
    return step.parent.parent


def output_folder(
    explicit: str | None, key: str, task: str, source: Source, sharded: bool = False
) -> Path:
    """`explicit` (must not exist or be empty), else `<run folder>/<task>/<time>` for our runs.

    Several processes (`sharded`) need an explicit folder: they all write into it, and a re-run
    into the same folder resumes; there the merge itself refuses an existing output.
    """
    if sharded and not explicit:
        raise UserError(
            f"task={task} with several processes needs {key}: the folder every rank shares "
            "(a re-run with the same folder resumes the unfinished shards)"
        )
    if explicit:
        out = Path(explicit)
        if sharded:
            return out
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"{key}={out} already exists and is not empty; choose a new folder")
        return out
    if source.run_folder is None:
        raise UserError(
            f"task={task} needs {key} (ckpt.path is not one of our run folders, so there is no "
            "run folder to write into)"
        )
    base = source.run_folder / task / time.strftime("%Y%m%d-%H%M%S")
    out, k = base, 0
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def device_for_rank(device: torch.device) -> torch.device:
    """One GPU per local rank when several processes share a node."""
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def cpu_threads_for(device: torch.device, cfg: ModelConfig) -> Iterator[None]:
    """On the CPU, one thread for narrow models (hidden size below 1024: their ops are too small to
    split; 2 threads ran a 200-token evo2_tiny forward ~30x slower on a busy 2-core machine, as
    generate.cpu_threads found for decoding); the previous setting is restored afterwards.
    """
    before = torch.get_num_threads()
    if device.type == "cpu" and cfg.hidden_size < 1024:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def progress(total: int, desc: str):
    """A tqdm bar on stderr (off on secondary ranks and when EVO2_NO_PROGRESS=1)."""
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="seq", disable=os.environ.get("EVO2_NO_PROGRESS") == "1"
    )


# ------------------------------------------------------------------------------ running sequences


def pad_batch(tokens: list[list[int]], device: torch.device) -> Tensor:
    """Right-pad token lists with PAD into one [B, L] tensor on `device`."""
    longest = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), longest), PAD_ID, dtype=torch.long)
    for row, seq in enumerate(tokens):
        ids[row, : len(seq)] = torch.tensor(seq)
    return ids.to(device)


def resolve_chunk(
    setting: int | None, model: StripedHyena2, cfg: ModelConfig, batch: int, length: int
) -> int:
    """Tokens per chunk: the configured value (0 = never chunk), or automatic (None). Chunking
    on the CPU fixes the allocator's mmap threshold (`memory.keep_cpu_heap_flat`).
    """
    param = model.embedding.weight
    if setting is None:
        setting = choose_chunk_tokens(cfg, batch, length, param.dtype, param.device)
    if setting and setting < length and param.device.type == "cpu":
        keep_cpu_heap_flat()
    return setting


def run_chunks(
    model: StripedHyena2,
    ids: Tensor,
    chunk_tokens: int,
    *,
    capture: Capture | None = None,
    logits: bool = True,
) -> Iterator[tuple[int, int, Tensor | None]]:
    """Yield `(start, stop, logits [B, stop-start, V])` chunk by chunk (exact, see chunked.py)."""
    cache = new_cache(ids.shape[1])
    for start, stop in chunk_spans(ids.shape[1], chunk_tokens):
        yield (
            start,
            stop,
            forward_chunk(model, ids[:, start:stop], cache, capture=capture, logits=logits),
        )


def next_token_log_probs(logits: Tensor, ids: Tensor, start: int, stop: int) -> Tensor:
    """`[B, n]` float32 log p(ids[:, i+1] | ids[:, :i+1]) for positions start..stop-1 that have a
    next token (the last position of the sequence has none).
    """
    end = min(stop, ids.shape[1] - 1)
    if end <= start:
        return logits.new_zeros(ids.shape[0], 0)
    scores = torch.log_softmax(logits[:, : end - start].float(), dim=-1)
    return scores.gather(-1, ids[:, start + 1 : end + 1, None])[..., 0]


def sequence_log_probs(model: StripedHyena2, ids: Tensor, chunk_tokens: int) -> Tensor:
    """`[B, L-1]` float32 per-position log-probabilities of tokens 1..L-1, in chunks."""
    parts = [
        next_token_log_probs(logits, ids, start, stop)
        for start, stop, logits in run_chunks(model, ids, chunk_tokens)
    ]
    return torch.cat(parts, dim=1)


def batches_by_length(records: list, size: int, length: Callable[[object], int]) -> list[list]:
    """Groups of up to `size` records of similar length (little padding), longest first."""
    ordered = sorted(records, key=length, reverse=True)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]
