"""Model-parallel sharding of savanna state dicts: which dim each key splits on
(savanna `tools/7b/conversion/params.py`).

An MP size must divide every partitioned dimension: hidden size, attention heads (whole heads per
rank), every filter group count, the MLP width and the vocabulary (`check_mp_size`).

A key not matching any suffix below is replicated on every rank (norms, `filter.t`, `inv_freq`,
`dense.bias`); `_extra_state` entries (TE metadata) are taken from rank 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from evo2_hydra.config import ModelConfig
from evo2_hydra.errors import UserError

# key suffix -> partition dim
PARTITION_DIMS: dict[str, int] = {
    "word_embeddings.weight": 0,
    "mixer.dense_projection.weight": 0,
    "mixer.hyena_proj_conv.short_conv_weight": 0,
    "mixer.mixer.conv_bias": 0,
    "mixer.mixer.filter.h": 0,
    "mixer.mixer.filter.decay": 0,
    "mixer.mixer.filter.gamma": 0,
    "mixer.mixer.filter.R": 0,
    "mixer.mixer.filter.p": 0,
    "mixer.mixer.short_conv.short_conv_weight": 0,
    "mixer.dense.weight": 1,
    "mlp.w1.weight": 0,
    "mlp.w2.weight": 0,
    "mlp.w3.weight": 1,
}


def partition_dim(key: str) -> int | None:
    """The dim `key` is split along across MP ranks, or None when it is replicated."""
    for suffix, dim in PARTITION_DIMS.items():
        if key == suffix or key.endswith("." + suffix):
            return dim
    return None


def merge_mp(shards: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """Concatenate MP shards (rank order) into the MP=1 state dict."""
    if len(shards) == 1:
        return dict(shards[0])
    merged: dict[str, object] = {}
    for key, first in shards[0].items():
        dim = partition_dim(key)
        if dim is None or not isinstance(first, Tensor):
            merged[key] = first
        else:
            merged[key] = torch.cat([shard[key] for shard in shards], dim=dim)  # type: ignore[misc]
    return merged


def split_mp(state: Mapping[str, object], mp: int) -> list[dict[str, object]]:
    """Split an MP=1 state dict into `mp` shards (contiguous chunks, as savanna's resharding tool)."""
    if mp == 1:
        return [dict(state)]
    shards: list[dict[str, object]] = [{} for _ in range(mp)]
    for key, value in state.items():
        dim = partition_dim(key)
        if dim is None or not isinstance(value, Tensor):
            for shard in shards:
                shard[key] = value
            continue
        if value.shape[dim] % mp:
            raise ValueError(
                f"{key}: dim {dim} of {tuple(value.shape)} is not divisible by MP={mp}"
            )
        for shard, chunk in zip(shards, torch.chunk(value, mp, dim=dim)):
            shard[key] = chunk.clone()
    return shards


def merged_shapes(
    shard_shapes: Sequence[Mapping[str, tuple[int, ...]]],
) -> dict[str, tuple[int, ...]]:
    """Shapes of the merged state dict, from the shards' shapes only (reads no tensor data)."""
    merged = {}
    for key, shape in shard_shapes[0].items():
        dim = partition_dim(key)
        if dim is None or len(shard_shapes) == 1:
            merged[key] = tuple(shape)
        else:
            out = list(shape)
            out[dim] = sum(s[key][dim] for s in shard_shapes)
            merged[key] = tuple(out)
    return merged


def valid_mp_sizes(cfg: ModelConfig) -> list[int]:
    """Model-parallel sizes that divide every partitioned dimension of this model."""
    dims = _partitioned_dims(cfg)
    return [
        m for m in range(1, cfg.num_attention_heads + 1) if all(v % m == 0 for v in dims.values())
    ]


def _partitioned_dims(cfg: ModelConfig) -> dict[str, int]:
    return {
        "num_attention_heads": cfg.num_attention_heads,
        "hidden_size": cfg.hidden_size,
        "hcs_groups": cfg.hcs_groups,
        "hcm_groups": cfg.hcm_groups,
        "hcl_groups": cfg.hcl_groups,
        "mlp_inner_size": cfg.mlp_inner_size,
        "vocab_size": cfg.vocab_size,
    }


def check_mp_size(cfg: ModelConfig, mp: int) -> None:
    """Refuse an MP size that does not split every partitioned dimension evenly."""
    bad = {k: v for k, v in _partitioned_dims(cfg).items() if v % mp}
    if bad:
        name, value = next(iter(bad.items()))
        others = (
            f" (also {', '.join(f'{k}={v}' for k, v in list(bad.items())[1:])})"
            if len(bad) > 1
            else ""
        )
        raise UserError(
            f"target.mp={mp}: model={cfg.name} has {name}={value}, not divisible by {mp}{others}; "
            f"model-parallel sizes that divide heads, hidden size, groups, MLP and vocabulary: "
            f"{valid_mp_sizes(cfg)}"
        )
