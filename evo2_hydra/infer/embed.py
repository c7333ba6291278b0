"""`task=embed`: hidden states of sequences at named layers, pooled or per position.

    python launch.py task=embed ckpt.path=outputs/runs/evo2_tiny-ctx512 \
        embed.input=seqs.jsonl 'embed.layers=[blocks.5.mlp.l3,blocks.7]' embed.pool=mean

Layers are named as in the evo2 package (see infer/layers.py); the tensors equal what its forward
hooks capture on the same weights. Sequences are grouped by length into batches of
`embed.batch_size` (right padding never reaches a sequence: the model is causal, and pooling uses
each sequence's own positions) and run in exact chunks when long (`embed.chunk_tokens`).

Output folder (written atomically; `embed.output`, default `<run folder>/embed/<time>`):
- `embed.pool=mean|last`: `<layer>.npy`, `[N, D]` in input order (`[N, 2D]` with
  `embed.reverse_complement=true`: forward columns, then the reverse complement's, concatenated as
  the evo2 exon classifier does), and `index.jsonl` (row, index, id, length per sequence);
- `embed.pool=none`: `<layer>/<index:06d>.npy`, `[L, D]` per sequence (and `<index:06d>_rc.npy`,
  the reverse complement in its own order), plus `index.jsonl`;
- `embed.json`: the settings, the model and the checkpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from evo2_hydra.config import Dtype, EmbedConfig, EmbedPool, ModelConfig, RunConfig, SaveDtype
from evo2_hydra.data.records import SequenceRecord
from evo2_hydra.data.text import policy_for_checkpoint
from evo2_hydra.errors import UserError
from evo2_hydra.infer import common
from evo2_hydra.infer.layers import resolve_layers
from evo2_hydra.infer.shard import merge_jsonl, move_tree, rank_and_world, run_sharded
from evo2_hydra.model import StripedHyena2
from evo2_hydra.model.chunked import chunk_spans, forward_chunk, new_cache

log = logging.getLogger(__name__)


def layer_file(name: str) -> str:
    """File name of one layer's embeddings."""
    return f"{name}.npy"


class Pooler:
    """Collects one batch's captured chunks into per-sequence results for each layer."""

    def __init__(self, layers: dict[str, str], lengths: list[int], pool: EmbedPool) -> None:
        self.wanted = {capture: name for name, capture in layers.items()}
        self.lengths = lengths
        self.pool = pool
        self.start = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.last: dict[str, list] = {c: [None] * len(lengths) for c in self.wanted}
        self.pieces: dict[str, list[list[torch.Tensor]]] = {
            c: [[] for _ in lengths] for c in self.wanted
        }

    def __call__(self, capture: str, tensor: torch.Tensor) -> None:
        if capture not in self.wanted:
            return
        x = tensor.float()
        stop = self.start + x.shape[1]
        for row, length in enumerate(self.lengths):
            end = min(stop, length) - self.start  # this row's valid positions in the chunk
            if end <= 0:
                continue
            part = x[row, :end]
            if self.pool == EmbedPool.mean:
                total = part.double().sum(dim=0)
                key = capture
                if key not in self.sums:
                    self.sums[key] = torch.zeros(
                        len(self.lengths), x.shape[-1], dtype=torch.float64
                    )
                self.sums[key][row] += total.cpu()
            elif self.pool == EmbedPool.last:
                if self.start < length <= stop:
                    self.last[capture][row] = part[-1].cpu()
            else:
                self.pieces[capture][row].append(part.cpu())

    def result(self, capture: str, row: int) -> np.ndarray:
        if self.pool == EmbedPool.mean:
            return (self.sums[capture][row] / self.lengths[row]).float().numpy()
        if self.pool == EmbedPool.last:
            return self.last[capture][row].numpy()
        return torch.cat(self.pieces[capture][row], dim=0).numpy()


@torch.no_grad()
def embed_batch(
    model: StripedHyena2,
    cfg: ModelConfig,
    texts: list[str],
    layers: dict[str, str],
    pool: EmbedPool,
    chunk_tokens: int | None,
) -> Pooler:
    """Run one batch (in chunks when long) and pool the requested layers per sequence."""
    tokens = [common.tokenize(t) for t in texts]
    ids = common.pad_batch(tokens, model.embedding.weight.device)
    chunk = common.resolve_chunk(chunk_tokens, model, cfg, ids.shape[0], ids.shape[1])
    pooler = Pooler(layers, [len(t) for t in tokens], pool)
    cache = new_cache(ids.shape[1])
    for start, stop in chunk_spans(ids.shape[1], chunk):
        pooler.start = start
        forward_chunk(model, ids[:, start:stop], cache, capture=pooler, logits=False)
    return pooler


def _embed_into(
    model: StripedHyena2,
    cfg: ModelConfig,
    records: Sequence[SequenceRecord],
    settings: EmbedConfig,
    layers: dict[str, str],
    folder: Path,
) -> None:
    """Embed `records` and write this folder's arrays (rows in the order of `records`)."""
    save = np.float16 if settings.save_dtype == SaveDtype.float16 else np.float32
    pooled = settings.pool != EmbedPool.none
    rows: dict[str, list[np.ndarray | None]] = {name: [None] * len(records) for name in layers}
    position = {id(r): i for i, r in enumerate(records)}
    if not pooled:
        for name in layers:
            (folder / name).mkdir()
    bar = common.progress(len(records), "embed")
    for batch in common.batches_by_length(
        list(records), settings.batch_size, lambda r: len(r.text)
    ):
        strands = [[r.text for r in batch]]
        if settings.reverse_complement:
            from evo2_hydra.score import reverse_complement

            strands.append([reverse_complement(r.text) for r in batch])
        results = [
            embed_batch(model, cfg, texts, layers, settings.pool, settings.chunk_tokens)
            for texts in strands
        ]
        for k, record in enumerate(batch):
            for name, capture in layers.items():
                arrays = [res.result(capture, k) for res in results]
                if pooled:
                    rows[name][position[id(record)]] = np.concatenate(arrays)
                else:
                    np.save(folder / name / f"{record.index:06d}.npy", arrays[0].astype(save))
                    if len(arrays) == 2:
                        np.save(
                            folder / name / f"{record.index:06d}_rc.npy", arrays[1].astype(save)
                        )
        bar.update(len(batch))
    bar.close()
    if pooled:
        for name in layers:
            np.save(folder / layer_file(name), np.stack(rows[name]).astype(save))
    with (folder / "index.jsonl").open("w") as f:
        for record in records:
            f.write(
                json.dumps(
                    {"index": record.index, "id": record.id, "length": len(record.text.encode())}
                )
                + "\n"
            )


def _merge(layers: list[str], pooled: bool):
    def merge(shards: list[Path], target: Path) -> None:
        merge_jsonl(shards, "index.jsonl", target)
        for name in layers:
            if pooled:
                parts = [np.load(s / layer_file(name)) for s in shards]
                np.save(target / layer_file(name), np.concatenate(parts))
            else:
                move_tree(shards, name, target)
        (target / "embed.json").write_text((shards[0] / "embed.json").read_text())

    return merge


def run_embed(run: RunConfig) -> Path:
    """Embed every sequence of `embed.input`; returns the output folder."""
    settings: EmbedConfig = run.embed
    if not settings.input:
        raise UserError("task=embed needs embed.input (a JSONL or FASTA file of sequences)")
    source = common.describe(run.ckpt, run.model, run.data)
    layers = resolve_layers(list(settings.layers), source.model)  # before any weights are read
    policy, _ = policy_for_checkpoint(run.ckpt.path, run.data)  # as the run trained
    records = common.read_records(
        settings.input, settings.text_key, source.context, "embed.input", policy
    )
    _, world = rank_and_world()
    sharded = max(world, run.cluster.world_size) > 1
    output = common.output_folder(settings.output, "embed.output", "embed", source, sharded)
    dtype = torch.bfloat16 if settings.dtype == Dtype.bfloat16 else torch.float32
    manifest = {
        "task": "embed",
        "layers": layers,
        **{k: (v.value if hasattr(v, "value") else v) for k, v in asdict(settings).items()},
        "reverse_complement_layout": (
            (
                "columns [0, D) forward, [D, 2D) reverse complement"
                if settings.pool != EmbedPool.none
                else "<index>_rc.npy per sequence, in the reverse complement's own order"
            )
            if settings.reverse_complement
            else None
        ),
        "model": source.model.name,
        "hidden_size": source.model.hidden_size,
        "sequences": len(records),
        "checkpoint": source.checkpoint,
    }

    def work(items: Sequence[SequenceRecord], folder: Path) -> None:
        device = common.device_for_rank(_device(run))
        from evo2_hydra.score import load_scoring_model

        model = load_scoring_model(source.model, run.ckpt, dtype, device)
        with common.cpu_threads_for(device, source.model):
            _embed_into(model, source.model, items, settings, layers, folder)
        (folder / "embed.json").write_text(json.dumps(manifest, indent=1, default=str) + "\n")

    out = run_sharded(
        run,
        "embed",
        output,
        records,
        work,
        _merge(list(layers), settings.pool != EmbedPool.none),
        run_embed,
    )
    log.info("wrote embeddings of %d sequences (%s) to %s", len(records), ", ".join(layers), out)
    return out


def _device(run: RunConfig) -> torch.device:
    from evo2_hydra.score import pick_device

    return pick_device(run.cluster.device)
