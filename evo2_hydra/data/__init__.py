"""Everything between a user's sequences and the batches the model trains on.

    prepare_data(data, context, cache_dir)        JSONL -> cached BIN/IDX (or given BIN/IDX prefixes)
    build_train_stream(data, prepared, ...)       endless, sharded, resumable training batches
    build_eval_batches(data, prepared, ...)       a fixed list of validation batches
    lm_loss(logits, batch)                        fp32 cross-entropy with the configured loss weights

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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'evo2_hydra.data' has no attribute {name!r}")
