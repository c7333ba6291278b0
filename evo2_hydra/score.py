"""`task=score`: log-likelihood of sequences under a savanna checkpoint.

    python launch.py task=score model=evo2_7b ckpt=savanna_evo2_7b_base ckpt.path=CKPT \
        score.input=seqs.jsonl score.output=scores/ [score.logits=true] [score.dtype=bfloat16]

Input: JSONL, one object per line with the sequence under `score.text_key` (optional `id`), or
FASTA (the record id is the id); plain or gzip (`evo2_hydra.data.records`). Each sequence goes
through the run's text policy (`evo2_hydra.data.text`: upper-cased when the run trained
upper-cased, characters outside `data.charset` per `data.alphabet`); its tokens are then the
bytes (Evo 2's CharLevelTokenizer, no BOS).
Output folder (written atomically; default: a fresh `scores/<time>/` in the checkpoint's run folder,
see evo2_hydra/outputs.py): `scores.jsonl`, one row per input line in order with
`sum_log_likelihood` = sum over positions 1..L-1 of log p(token_i | tokens_<i) in nats and
`mean_log_likelihood` = that sum / (L-1); with `score.logits=true`, `logits/{index:06d}.npy`, the
full `[L, 512]` float32 logits of each sequence; with `score.log_probs=true`,
`log_probs/{index:06d}.npy`, the `[L-1]` float32 per-position log-probabilities whose sum is
`sum_log_likelihood` (and `{index:06d}_rc.npy` for the reverse complement, in its own order, with
`score.reverse_complement=true`). `score.batch_size` sequences share one forward pass.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evo2_hydra.config import (
    CkptConfig,
    Device,
    Dtype,
    ModelConfig,
    RunConfig,
    ScoreConfig,
)
from evo2_hydra.data.text import policy_for_checkpoint
from evo2_hydra.errors import UserError
from evo2_hydra.infer.common import read_records, tokenize
from evo2_hydra.model import StripedHyena2, build_model, load_into_model
from evo2_hydra.outputs import check_new_output, default_output

log = logging.getLogger(__name__)

COMPLEMENT = str.maketrans("ACGTNacgtn", "TGCANtgcan")
CONTEXT_SUFFIXES = ("mixer.mixer.filter.h", "mixer.mixer.filter.decay", "mixer.mixer.filter.t")


def reverse_complement(text: str) -> str:
    """Reverse complement of a DNA string (IUPAC codes and case kept)."""
    return text.translate(COMPLEMENT)[::-1]


def pick_device(device: Device) -> torch.device:
    """cluster.device: auto = cuda when visible, else cpu."""
    if device == Device.cuda and not torch.cuda.is_available():
        raise UserError("cluster.device=cuda but no CUDA device is visible")
    if device == Device.cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def load_scoring_model(
    model_cfg: ModelConfig, ckpt: CkptConfig, dtype: torch.dtype, device: torch.device
) -> StripedHyena2:
    """Load `ckpt.path` (any savanna layout) strictly into a model of the file's filter width."""
    if not ckpt.path:
        raise UserError(
            "task=score needs ckpt.path (a savanna .pt, a global_stepN folder or a folder with `latest`)"
        )
    from evo2_hydra.checkpoint import load_module_state_dict

    # finite=True: NaN/Inf weights would make every score NaN without a word
    state, _meta = load_module_state_dict(ckpt.path, trust_pickle=ckpt.trust_pickle, finite=True)
    if ckpt.interleave_legacy:
        from evo2_hydra.checkpoint.legacy import interleave_legacy_projections

        state = interleave_legacy_projections(state)
    # The filter width only shapes the state dict (the forward works for any length): take it
    # from ckpt.source_context, else from the file itself.
    widths = {tuple(v.shape)[-1] for k, v in state.items() if k.endswith(CONTEXT_SUFFIXES)}
    width = ckpt.source_context or (max(widths) if widths else ckpt.context)
    model = build_model(model_cfg, width, device="meta", dtype=dtype)
    load_into_model(model, state, model_cfg, width, device=device)
    return model.eval()


@dataclass
class BatchScores:
    """Scores of one batch: summed log-likelihoods, and per-position arrays when asked for."""

    sums: list[float]  # summed log-likelihood per sequence (nats, positions 1..L-1)
    log_probs: list[np.ndarray]  # per sequence `[L-1]` float32: log p(token_i | tokens_<i), i >= 1
    logits: list[np.ndarray] | None  # per sequence `[L, vocab]` float32, when asked for


@torch.no_grad()
def score_batch(
    model: StripedHyena2,
    texts: list[str],
    keep_logits: bool = True,
    chunk_tokens: int | None = 0,
    model_cfg: ModelConfig | None = None,
) -> BatchScores:
    """One forward pass over right-padded sequences (causal: padding never reaches them).

    `chunk_tokens` > 0 runs it in exact chunks (evo2_hydra/model/chunked.py: same results, memory
    bounded by the KV cache); None decides from the device's free memory (needs `model_cfg`).
    """
    from evo2_hydra.infer.common import (
        next_token_log_probs,
        pad_batch,
        resolve_chunk,
        run_chunks,
    )

    tokens = [tokenize(t) for t in texts]
    longest = max(len(t) for t in tokens)
    ids = pad_batch(tokens, model.embedding.weight.device)
    chunk_tokens = resolve_chunk(chunk_tokens, model, model_cfg, len(tokens), longest)
    if not chunk_tokens or chunk_tokens >= longest:
        logits = model(ids).float()
        chunks = [(logits, next_token_log_probs(logits, ids, 0, longest))]
    else:
        chunks = [
            (logits.float().cpu() if keep_logits else None, next_token_log_probs(logits, ids, a, b))
            for a, b, logits in run_chunks(model, ids, chunk_tokens)
        ]
    logprobs = torch.cat([lp for _, lp in chunks], dim=1)
    logits = torch.cat([lg.cpu() for lg, _ in chunks], dim=1) if keep_logits else None
    scores = BatchScores([], [], [] if keep_logits else None)
    for row, seq in enumerate(tokens):
        positions = logprobs[row, : len(seq) - 1]
        scores.sums.append(positions.double().sum().item())
        scores.log_probs.append(positions.cpu().numpy())
        if keep_logits:
            scores.logits.append(logits[row, : len(seq)].numpy())
    return scores


@dataclass
class ScoreOutputs:
    """What to write besides scores.jsonl, and where (folders inside the output being built)."""

    logits_dir: Path | None = None  # `[L, vocab]` float32 logits per sequence
    log_probs_dir: Path | None = None  # `[L-1]` float32 per-position log-probabilities


def _save(folder: Path, name: str, array: np.ndarray) -> str:
    np.save(folder / name, array.astype(np.float32))
    return f"{folder.name}/{name}"


def _score_all(
    model, records, batch_size, outputs: ScoreOutputs, rc: bool, chunk=0, model_cfg=None
) -> list[dict]:
    rows = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        fwd = score_batch(
            model,
            [r.text for r in batch],
            keep_logits=outputs.logits_dir is not None,
            chunk_tokens=chunk,
            model_cfg=model_cfg,
        )
        rc_scores = (
            score_batch(
                model,
                [reverse_complement(r.text) for r in batch],
                keep_logits=False,
                chunk_tokens=chunk,
                model_cfg=model_cfg,
            )
            if rc
            else None
        )
        for i, record in enumerate(batch):
            n = len(tokenize(record.text)) - 1  # scored positions
            row = {"index": record.index, "id": record.id, "length": n + 1}
            if rc:
                row["forward_sum_log_likelihood"] = fwd.sums[i]
                row["reverse_complement_sum_log_likelihood"] = rc_scores.sums[i]
                total = (fwd.sums[i] + rc_scores.sums[i]) / 2
            else:
                total = fwd.sums[i]
            row["sum_log_likelihood"] = total
            row["mean_log_likelihood"] = total / n
            if outputs.logits_dir is not None:
                row["logits"] = _save(outputs.logits_dir, f"{record.index:06d}.npy", fwd.logits[i])
            if outputs.log_probs_dir is not None:
                folder, name = outputs.log_probs_dir, f"{record.index:06d}"
                row["log_probs"] = _save(folder, f"{name}.npy", fwd.log_probs[i])
                if rc:  # in the reverse complement's own order
                    row["reverse_complement_log_probs"] = _save(
                        folder, f"{name}_rc.npy", rc_scores.log_probs[i]
                    )
            rows.append(row)
        log.info("scored %d/%d sequences", min(start + batch_size, len(records)), len(records))
    return rows


def json_line(row: dict, source: Path) -> str:
    """One scores.jsonl row; a NaN/Inf score is an error, never written (bare NaN is not JSON)."""
    try:
        return json.dumps(row, allow_nan=False)
    except ValueError:
        raise UserError(
            f"{source}: the score of record {row['index']} (id {row['id']!r}) is not finite; "
            "the model's outputs overflowed (try score.dtype=float32)"
        ) from None


def run_score(run: RunConfig) -> Path:
    """Score every sequence of `score.input`; returns the output folder.

    With several processes (`cluster.tasks=N` or a Slurm job of N tasks) each scores a contiguous
    share of the input and the outputs are merged in input order (evo2_hydra/infer/shard.py).
    """
    from evo2_hydra.infer.common import device_for_rank
    from evo2_hydra.infer.shard import merge_jsonl, move_tree, rank_and_world, run_sharded

    score: ScoreConfig = run.score
    if not score.input:
        raise UserError("task=score needs score.input (a JSONL or FASTA file of sequences)")
    sharded = max(rank_and_world()[1], run.cluster.world_size) > 1
    if sharded and not score.output:
        raise UserError(
            "task=score with several processes needs score.output: the folder every rank shares "
            "(a re-run with the same folder resumes the unfinished shards)"
        )
    if sharded:
        output = Path(score.output)
    elif score.output:
        output = check_new_output(Path(score.output), "score.output")
    else:  # the checkpoint's own run folder (or one named after it), a fresh folder per call
        output = default_output(run.ckpt.path, run.paths.output_root, "scores")
    policy, policy_from = policy_for_checkpoint(run.ckpt.path, run.data)
    log.info("text policy (from %s): %s", policy_from, policy.to_dict())
    records = read_records(
        score.input, score.text_key, run.ckpt.context, "score.input", policy, min_length=2
    )
    dtype = torch.bfloat16 if score.dtype == Dtype.bfloat16 else torch.float32

    def work(items, tmp: Path) -> None:
        device = device_for_rank(pick_device(run.cluster.device))
        model = load_scoring_model(run.model, run.ckpt, dtype, device)
        outputs = ScoreOutputs(
            logits_dir=tmp / "logits" if score.logits else None,
            log_probs_dir=tmp / "log_probs" if score.log_probs else None,
        )
        for folder in (outputs.logits_dir, outputs.log_probs_dir):
            if folder is not None:
                folder.mkdir()
        rows = _score_all(
            model,
            list(items),
            score.batch_size,
            outputs,
            score.reverse_complement,
            chunk=score.chunk_tokens,
            model_cfg=run.model,
        )
        with (tmp / "scores.jsonl").open("w") as f:
            for row in rows:
                f.write(json_line(row, Path(score.input)) + "\n")

    def merge(shards: list[Path], target: Path) -> None:
        merge_jsonl(shards, "scores.jsonl", target)
        for sub in ("logits", "log_probs"):
            move_tree(shards, sub, target)

    run_sharded(run, "score", output, records, work, merge, run_score)
    log.info("wrote %d scores to %s", len(records), output / "scores.jsonl")
    return output
