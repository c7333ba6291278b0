"""`task=generate`: sample sequences from a checkpoint, optionally after a conditioning token.

    python launch.py task=generate ckpt.path=outputs/runs/evo2_tiny-ctx512 \
        generate.condition=A generate.n=8 generate.length=200 generate.temperature=0.8 generate.top_k=4

`ckpt.path` takes one of our run folders (or a step folder in it), a savanna checkpoint in any
layout, or a vortex `.pt` (imported by the conversion package). From our checkpoints the run's saved
config supplies the architecture, the context (`ckpt.context`), whether documents ended with EOD
(`data.append_eod`) and the conditioning mapping (`conditions.json` next to the weights); for other
files these come from the command line (`model=`, `ckpt.context`, `data.*`).

The model sees `condition token + prompt` and samples `generate.length` new tokens (fewer when it
emits EOD and was trained with EOD). Only printable ASCII bytes (32..126, plus EOD where it stops)
are sampled or accepted in prompts: Evo 2's data are ASCII, and the other byte values are never
trained. Output folder (written atomically): `generations.fasta` (the new tokens of each sequence)
and `generations.jsonl` (one row per sequence with the prompt, condition, settings and checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from evo2_hydra.config import (
    CkptConfig,
    DataConfig,
    Dtype,
    GenerateConfig,
    ModelConfig,
    RunConfig,
)
from evo2_hydra.data.text import TextPolicy, policy_for_checkpoint, upper_ids
from evo2_hydra.errors import UserError
from evo2_hydra.io_utils import atomic_dir
from evo2_hydra.model import StripedHyena2
from evo2_hydra.model.chunked import prefill_chunked
from evo2_hydra.model.decode import decode_step, prefill, repeat_batch
from evo2_hydra.outputs import check_new_output, default_output
from evo2_hydra.score import load_scoring_model, pick_device

log = logging.getLogger(__name__)

EOD = 0  # CharLevelTokenizer end of document
PRINTABLE = range(32, 127)  # the byte values prompts may hold and sampling may produce


# ------------------------------------------------------------------------------ sampling


def allowed_tokens(vocab_size: int, stop_at_eod: bool) -> torch.Tensor:
    """Bool mask `[vocab]` of the tokens sampling may pick."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[PRINTABLE.start : PRINTABLE.stop] = True
    mask[EOD] = stop_at_eod
    return mask


def sample_next(
    logits: torch.Tensor,
    settings: GenerateConfig,
    allowed: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """One token per row of `logits [B, V]` (float32, CPU): greedy at temperature 0, else
    temperature, then top-k, then top-p (nucleus) filtering, then a draw from `generator`.
    """
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    if settings.temperature == 0 or settings.top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits / settings.temperature
    if settings.top_k > 0:
        kth = torch.topk(logits, min(settings.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # drop a token when the more likely ones already hold top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= settings.top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass
class Generated:
    """One generated sequence: its new tokens and whether it stopped at EOD."""

    tokens: list[int]  # new tokens, EOD excluded
    stopped_at_eod: bool


@torch.no_grad()
def generate_tokens(
    model: StripedHyena2,
    prompt_ids: list[int],
    n: int,
    length: int,
    choose: Callable[[torch.Tensor], torch.Tensor],
    *,
    cached: bool = True,
    stop_token: int | None = None,
    chunk_tokens: int = 0,
) -> list[Generated]:
    """Continue `prompt_ids` in `n` parallel sequences by up to `length` tokens.

    `choose(logits [n, V] float32 CPU) -> [n]` picks each next token. With `cached`, the prompt is
    prefilled once and each token is one `decode_step`; otherwise the whole prefix is re-run per
    token (the reference the cached path is tested against). A sequence that emits `stop_token`
    is finished; the batch stops when all are. `chunk_tokens` > 0 prefills a longer prompt in
    exact chunks of that many tokens (bounded memory; model/chunked.py).
    """
    device = model.embedding.weight.device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device).expand(n, -1)
    if cached:  # the prompt is shared: prefill it once, then copy the states n times
        if chunk_tokens and chunk_tokens < ids.shape[1]:
            cache, last = prefill_chunked(model, ids[:1], ids.shape[1] + length, chunk_tokens)
        else:
            cache, logits = prefill(model, ids[:1], ids.shape[1] + length)
            last = logits[:, -1]
        cache = repeat_batch(cache, n)
        last = last.expand(n, -1)
    else:
        last = model(ids)[:, -1]
    chosen: list[torch.Tensor] = []
    done = torch.zeros(n, dtype=torch.bool)
    for step in range(length):
        token = choose(last.float().cpu())
        chosen.append(token)
        if stop_token is not None:
            done |= token == stop_token
        if done.all() or step == length - 1:
            break
        if cached:
            last = decode_step(model, token.to(device), cache)
        else:
            ids = torch.cat((ids, token.to(device)[:, None]), dim=1)
            last = model(ids)[:, -1]
    out = []
    for row in torch.stack(chosen, dim=1).tolist():
        if stop_token is not None and stop_token in row:
            out.append(Generated(row[: row.index(stop_token)], True))
        else:
            out.append(Generated(row, False))
    return out


# ------------------------------------------------------------------------------ what the checkpoint says


@dataclass
class GenerationSource:
    """The checkpoint and the run facts generation needs, known before any weights are read."""

    model: ModelConfig
    context: int  # ckpt.context the run trained at (tokens)
    append_eod: bool  # whether training documents ended with EOD
    conditions: dict[str, str]  # class name -> single-byte token
    facts_from: str  # where model/context/EOD/mapping came from
    checkpoint: dict = field(default_factory=dict)  # what the output records about the weights


def describe_source(ckpt: CkptConfig, model: ModelConfig, data: DataConfig) -> GenerationSource:
    """Locate `ckpt.path` and collect model, context, EOD use and conditioning mapping."""
    if not ckpt.path:
        raise UserError(
            "task=generate needs ckpt.path (a run folder, a savanna checkpoint or a vortex .pt)"
        )
    from evo2_hydra.checkpoint import locate_checkpoint
    from evo2_hydra.checkpoint.run_dir import read_saved_run

    location = locate_checkpoint(ckpt.path)
    record = {
        "path": str(ckpt.path),
        "resolved": location.describe(),
        "iteration": location.iteration,
    }
    saved = read_saved_run(location)
    if saved is None:
        conditions = (
            {str(k): str(v) for k, v in data.condition.tokens.items()}
            if data.condition.enabled
            else {}
        )
        return GenerationSource(
            model, ckpt.context, data.append_eod, conditions, "the command line", record
        )
    saved_model = saved.model()
    if saved_model.name != model.name:
        log.info(
            "using the run's model %s (saved in %s), not model=%s",
            saved_model.name,
            saved.config_path,
            model.name,
        )
    context, append_eod = saved.context, saved.append_eod
    record["run_config"] = str(saved.config_path)
    return GenerationSource(
        model=saved_model,
        context=ckpt.context if context is None else context,
        append_eod=data.append_eod if append_eod is None else append_eod,
        conditions=saved.conditions(),
        facts_from=str(saved.config_path),
        checkpoint=record,
    )


# ------------------------------------------------------------------------------ input checks


def check_prompt(prompt: str, where: str = "generate.prompt") -> list[int]:
    """Token ids of a prompt; a character outside printable ASCII is an error naming its position."""
    for position, char in enumerate(prompt):
        if ord(char) not in PRINTABLE:
            raise UserError(
                f"{where}: character {char!r} at position {position} is outside the "
                "vocabulary (printable ASCII, byte values 32..126)"
            )
    return list(prompt.encode("ascii"))


def conditioned_prompt(
    settings: GenerateConfig,
    source: GenerationSource,
    policy: TextPolicy | None = None,
    prompt: str | None = None,
    where: str = "generate.prompt",
) -> list[int]:
    """Token ids the model is fed: the condition's token (if any), then the prompt (`prompt`, or
    else generate.prompt), as the run's text policy makes model input (upper-cased when it
    trained upper-cased).
    """
    text = settings.prompt if prompt is None else prompt
    ids = check_prompt(text, where)
    if policy is not None:
        normalized = policy.normalize(text, where, model=True)
        if normalized is None:  # data.alphabet=skip: a single prompt cannot be left out
            raise UserError(f"{where}: {policy.problem(text)}")
        ids = list(normalized.encode("ascii"))
    if settings.condition is not None:
        if not source.conditions:
            raise UserError(
                f"generate.condition={settings.condition}: the checkpoint declares no "
                f"conditioning mapping (read from {source.facts_from})"
            )
        if settings.condition not in source.conditions:
            known = ", ".join(sorted(source.conditions))
            raise UserError(
                f"generate.condition={settings.condition} is not in the run's conditioning "
                f"mapping (known: {known}; read from {source.facts_from})"
            )
        token = list(source.conditions[settings.condition].encode("utf-8"))
        # training upper-cases every input token, the conditioning token included
        ids = (upper_ids(token) if policy is not None and policy.upper else token) + ids
    if not ids:
        raise UserError(
            "generate.prompt is empty and no generate.condition is given: nothing to start from"
        )
    total = len(ids) + settings.length
    if total > source.context:
        raise UserError(
            f"generate.length={settings.length}: prompt ({len(ids)} tokens) + length = {total} "
            f"exceeds the model's context ckpt.context={source.context} (from {source.facts_from})"
        )
    return ids


def prompt_list(
    settings: GenerateConfig, source: GenerationSource, policy: TextPolicy
) -> list[tuple[object, str, list[int]]]:
    """(prompt id, prompt text, token ids) for generate.prompt, or for each record of the
    generate.prompts file (JSONL or FASTA, read by `evo2_hydra.data.records`).
    """
    if not settings.prompts:
        return [(None, settings.prompt, conditioned_prompt(settings, source, policy))]
    if settings.prompt:
        raise UserError("give generate.prompt or generate.prompts (a file), not both")
    from evo2_hydra.data.records import read_sequences

    records, skipped = read_sequences(settings.prompts, key="generate.prompts", policy=policy)
    if skipped:
        log.warning("generate.prompts: skipped %d prompts, e.g. %s", len(skipped), skipped[0])
    return [
        (r.id, r.text, conditioned_prompt(settings, source, policy, r.text, r.where))
        for r in records
    ]


# ------------------------------------------------------------------------------ the task


def _output_folder(settings: GenerateConfig, run: RunConfig) -> Path:
    if settings.output:
        return check_new_output(Path(settings.output), "generate.output")
    # the checkpoint's own run folder (or one named after it), a fresh folder per call
    return default_output(run.ckpt.path, run.paths.output_root, "generations")


def _fasta(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        cond = f" condition={row['condition']}" if row["condition"] is not None else ""
        lines.append(f">{row['id']}{cond} tokens={row['length']} stop={row['stop']}")
        text = row["text"]
        lines += [text[i : i + 80] for i in range(0, len(text), 80)] or [""]
    return "\n".join(lines) + "\n"


SMALL_MODEL_WIDTH = 1024  # below this hidden size, one token's ops are too small to split


@contextlib.contextmanager
def cpu_threads(requested: int, hidden_size: int) -> Iterator[None]:
    """Token-by-token decoding of a small model is dominated by thread hand-offs (evo2_tiny: 880
    tokens/s on 1 thread, 53 on 2, same machine): auto (0) uses 1 thread for narrow models.
    The previous setting is restored afterwards (the caller may be a longer-lived process).
    """
    before = torch.get_num_threads()
    threads = requested or (1 if hidden_size < SMALL_MODEL_WIDTH else 0)
    if threads:
        torch.set_num_threads(threads)
        log.info("CPU decoding on %d thread(s) (generate.cpu_threads)", threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def secondary_rank() -> int:
    """This process's rank when it is one of several tasks (e.g. cluster=slurm starts one per
    GPU); 0 otherwise. Generation is one process's work: the others must not write the output.
    """
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def run_generate(run: RunConfig) -> Path | None:
    """Sample `generate.n` sequences; returns the output folder (None on ranks other than 0)."""
    settings: GenerateConfig = run.generate
    rank = secondary_rank()
    if rank:
        log.info("rank %d: generation runs on rank 0 only; nothing to do here", rank)
        return None
    source = describe_source(run.ckpt, run.model, run.data)
    policy, _ = policy_for_checkpoint(run.ckpt.path, run.data)
    prompts = prompt_list(settings, source, policy)  # every input check before loading weights
    output = _output_folder(settings, run)
    device = pick_device(run.cluster.device)
    dtype = torch.bfloat16 if settings.dtype == Dtype.bfloat16 else torch.float32
    model = load_scoring_model(source.model, run.ckpt, dtype, device)
    allowed = allowed_tokens(source.model.vocab_size, stop_at_eod=source.append_eod)
    generator = torch.Generator().manual_seed(settings.seed)
    stop = EOD if source.append_eod else None
    log.info(
        "generating %d x %d tokens on %s (%s, %s)",
        settings.n,
        settings.length,
        device,
        "cached" if settings.cached else "uncached",
        dtype,
    )

    threads = (
        cpu_threads(settings.cpu_threads, source.model.hidden_size)
        if device.type == "cpu"
        else contextlib.nullcontext()
    )
    from evo2_hydra.infer.common import resolve_chunk

    longest = max(len(ids) for _, _, ids in prompts)
    chunk = resolve_chunk(settings.chunk_tokens, model, source.model, 1, longest)
    started = time.perf_counter()
    generated: list[Generated] = []
    prompt_of: list[tuple[object, str]] = []  # (prompt id, prompt text) per generated sequence
    with threads:
        for prompt_id, prompt_text, prompt_ids in prompts:
            for start in range(0, settings.n, settings.batch_size):
                batch = min(settings.batch_size, settings.n - start)
                generated += generate_tokens(
                    model,
                    prompt_ids,
                    batch,
                    settings.length,
                    lambda logits: sample_next(logits, settings, allowed, generator),
                    cached=settings.cached,
                    stop_token=stop,
                    chunk_tokens=chunk,
                )
                prompt_of += [(prompt_id, prompt_text)] * batch
    seconds = time.perf_counter() - started
    new_tokens = sum(len(g.tokens) + g.stopped_at_eod for g in generated)
    log.info("%d tokens in %.2f s (%.1f tokens/s)", new_tokens, seconds, new_tokens / seconds)

    record_settings = {**asdict(settings), "dtype": settings.dtype.value, "device": str(device)}
    rows = []
    for i, g in enumerate(generated):
        rows.append(
            {
                "index": i,
                "id": f"gen_{i:06d}",
                "condition": settings.condition,
                "condition_token": source.conditions.get(settings.condition)
                if settings.condition is not None
                else None,
                "prompt": prompt_of[i][1],
                **({"prompt_id": prompt_of[i][0]} if settings.prompts else {}),
                "text": bytes(g.tokens).decode("ascii"),
                "length": len(g.tokens),
                "stop": "eod" if g.stopped_at_eod else "length",
                "settings": record_settings,
                "checkpoint": source.checkpoint,
            }
        )
    if output.is_dir():
        output.rmdir()  # an empty folder (checked above) is replaced atomically below
    with atomic_dir(output) as tmp:
        (tmp / "generations.fasta").write_text(_fasta(rows))
        with (tmp / "generations.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    log.info("wrote %d sequences to %s", len(rows), output)
    return output
