"""`task=score`: log-likelihood of sequences under a savanna checkpoint.

    python launch.py task=score model=evo2_7b ckpt=savanna_evo2_7b_base ckpt.path=CKPT \
        score.input=seqs.jsonl score.output=scores/ [score.logits=true] [score.dtype=bfloat16]

Input: JSONL, one object per line with the sequence under `score.text_key` (optional `id`).
Tokens are the UTF-8 bytes of the sequence as given (Evo 2's CharLevelTokenizer, no BOS).
Output folder (written atomically): `scores.jsonl`, one row per input line in order with
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
import torch.nn.functional as F

from evo2_hydra.config import (
    CkptConfig,
    Device,
    ModelConfig,
    RunConfig,
    ScoreConfig,
    ScoreDtype,
)
from evo2_hydra.errors import UserError
from evo2_hydra.io_utils import atomic_dir
from evo2_hydra.model import StripedHyena2, build_model, load_into_model

log = logging.getLogger(__name__)

PAD_ID = 1  # CharLevelTokenizer pad; right padding never influences earlier positions (causal)
COMPLEMENT = str.maketrans("ACGTNacgtn", "TGCANtgcan")
CONTEXT_SUFFIXES = ("mixer.mixer.filter.h", "mixer.mixer.filter.decay", "mixer.mixer.filter.t")


@dataclass
class Record:
    index: int
    id: object
    text: str


def read_sequences(path: Path, text_key: str, max_len: int) -> list[Record]:
    """Parse and validate every line before any work; errors name the file and line."""
    if not path.is_file():
        raise UserError(f"score.input={path}: no such file")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            text = obj.get(text_key) if isinstance(obj, dict) else None
            if not isinstance(text, str) or len(text) < 2:
                raise UserError(
                    f"{path}:{lineno}: expected an object with a string '{text_key}' of at least "
                    "2 characters (set score.text_key for another field)"
                )
            if len(text.encode("utf-8")) > max_len:
                raise UserError(
                    f"{path}:{lineno}: sequence of {len(text.encode('utf-8'))} tokens exceeds "
                    f"ckpt.context={max_len}"
                )
            records.append(Record(len(records), obj.get("id"), text))
    if not records:
        raise UserError(f"{path}: no sequences")
    return records


def tokenize(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def reverse_complement(text: str) -> str:
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
    sums: list[float]  # summed log-likelihood per sequence (nats, positions 1..L-1)
    log_probs: list[np.ndarray]  # per sequence `[L-1]` float32: log p(token_i | tokens_<i), i >= 1
    logits: list[np.ndarray] | None  # per sequence `[L, vocab]` float32, when asked for


@torch.no_grad()
def score_batch(model: StripedHyena2, texts: list[str], keep_logits: bool = True) -> BatchScores:
    """One forward pass over right-padded sequences (causal: padding never reaches them)."""
    tokens = [tokenize(t) for t in texts]
    longest = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), longest), PAD_ID, dtype=torch.long)
    for row, seq in enumerate(tokens):
        ids[row, : len(seq)] = torch.tensor(seq)
    ids = ids.to(model.embedding.weight.device)
    logits = model(ids).float()
    logprobs = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    scores = BatchScores([], [], [] if keep_logits else None)
    for row, seq in enumerate(tokens):
        positions = logprobs[row, : len(seq) - 1]
        scores.sums.append(positions.double().sum().item())
        scores.log_probs.append(positions.cpu().numpy())
        if keep_logits:
            scores.logits.append(logits[row, : len(seq)].cpu().numpy())
    return scores


@dataclass
class ScoreOutputs:
    """What to write besides scores.jsonl, and where (folders inside the output being built)."""

    logits_dir: Path | None = None  # `[L, vocab]` float32 logits per sequence
    log_probs_dir: Path | None = None  # `[L-1]` float32 per-position log-probabilities


def _save(folder: Path, name: str, array: np.ndarray) -> str:
    np.save(folder / name, array.astype(np.float32))
    return f"{folder.name}/{name}"


def _score_all(model, records, batch_size, outputs: ScoreOutputs, rc: bool) -> list[dict]:
    rows = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        fwd = score_batch(
            model, [r.text for r in batch], keep_logits=outputs.logits_dir is not None
        )
        rc_scores = (
            score_batch(model, [reverse_complement(r.text) for r in batch], keep_logits=False)
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
    """Score every sequence of `score.input`; returns the output folder."""
    score: ScoreConfig = run.score
    if not score.input:
        raise UserError("task=score needs score.input (a JSONL file of sequences)")
    output = Path(score.output) if score.output else Path(run.output_dir) / "score"
    if output.exists() and any(output.iterdir()):
        raise UserError(
            f"score.output={output} already exists and is not empty; choose a new folder"
        )
    records = read_sequences(Path(score.input), score.text_key, run.ckpt.context)
    dtype = torch.bfloat16 if score.dtype == ScoreDtype.bfloat16 else torch.float32
    model = load_scoring_model(run.model, run.ckpt, dtype, pick_device(run.cluster.device))

    if output.exists():
        output.rmdir()  # an empty folder (e.g. made by Hydra) is replaced atomically below
    with atomic_dir(output) as tmp:
        outputs = ScoreOutputs(
            logits_dir=tmp / "logits" if score.logits else None,
            log_probs_dir=tmp / "log_probs" if score.log_probs else None,
        )
        for folder in (outputs.logits_dir, outputs.log_probs_dir):
            if folder is not None:
                folder.mkdir()
        rows = _score_all(model, records, score.batch_size, outputs, score.reverse_complement)
        with (tmp / "scores.jsonl").open("w") as f:
            for row in rows:
                f.write(json_line(row, Path(score.input)) + "\n")
    log.info("wrote %d scores to %s", len(rows), output / "scores.jsonl")
    return output
