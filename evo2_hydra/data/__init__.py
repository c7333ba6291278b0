"""Everything between a user's sequences and the batches the model trains on.

    prepare_data(data, context, cache_dir)        JSONL/FASTA -> cached BIN/IDX (or given prefixes)
    build_train_stream(data, prepared, ...)       endless, sharded, resumable training batches
    build_eval_batches(data, prepared, ...)       a fixed list of validation batches
    lm_loss(logits, batch)                        fp32 cross-entropy with the configured loss weights
    TextPolicy, policy_for_checkpoint             what a sequence may hold, what the model sees
    iter_sequences / read_sequences               the inference tasks' JSONL/FASTA reader

Submodules are imported lazily so preprocessing worker processes never import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "prepare_data": "evo2_hydra.data.prepare",
    "PreparedData": "evo2_hydra.data.prepare",
    "DatasetSpec": "evo2_hydra.data.prepare",
    "build_train_stream": "evo2_hydra.data.stream",
    "build_eval_batches": "evo2_hydra.data.stream",
    "lm_loss": "evo2_hydra.data.loss",
    "MMapIndexedDataset": "evo2_hydra.data.indexed",
    "run_preprocess": "evo2_hydra.data.preprocess",
    "TextPolicy": "evo2_hydra.data.text",
    "policy_for_checkpoint": "evo2_hydra.data.text",
    "iter_sequences": "evo2_hydra.data.records",
    "read_sequences": "evo2_hydra.data.records",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'evo2_hydra.data' has no attribute {name!r}")
