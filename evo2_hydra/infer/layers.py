"""Embedding layer names as the evo2 package (vortex module tree) names them (vortex
`vortex/model/model.py`, `vortex/model/layers.py`).

| name              | tensor (`[B, L, D]`)                                                   |
|-------------------|------------------------------------------------------------------------|
| `embedding_layer` | the input embeddings                                                   |
| `blocks.N.mlp.l3` | block N's MLP output before the residual add (`blocks.N.mlp` is the same) |
| `blocks.N`        | block N's output: the residual stream after the MLP add (BioNeMo's     |
|                   | `--embedding-layer N`)                                                 |
| `norm`            | the final-normed hidden state (the input of the tied output layer)     |
"""

from __future__ import annotations

import re

from evo2_hydra.config import ModelConfig
from evo2_hydra.errors import UserError

BLOCK_RE = re.compile(r"^blocks\.(\d+)(\.mlp(\.l3)?)?$")


def valid_names(cfg: ModelConfig) -> str:
    """The layer names embed.layers accepts for this model, for error messages."""
    last = cfg.num_layers - 1
    return (
        f"embedding_layer, blocks.0 .. blocks.{last}, blocks.0.mlp.l3 .. blocks.{last}.mlp.l3 "
        "(or blocks.N.mlp), norm"
    )


def canonical_layer(name: str, cfg: ModelConfig, key: str = "embed.layers") -> str:
    """The capture name for `name` (`blocks.N.mlp` -> `blocks.N.mlp.l3`); UserError if unknown."""
    if name in ("embedding_layer", "norm"):
        return name
    match = BLOCK_RE.match(name)
    if match and int(match.group(1)) < cfg.num_layers:
        return f"blocks.{match.group(1)}" + (".mlp.l3" if match.group(2) else "")
    raise UserError(
        f"{key}: unknown layer {name!r} for model={cfg.name} ({cfg.num_layers} blocks); "
        f"valid: {valid_names(cfg)}"
    )


def resolve_layers(names: list[str], cfg: ModelConfig) -> dict[str, str]:
    """Requested name -> capture name, in request order; duplicates refused."""
    if not names:
        raise UserError(
            f"task=embed needs embed.layers (valid for model={cfg.name}: {valid_names(cfg)})"
        )
    out: dict[str, str] = {}
    for name in names:
        name = str(name)
        if name in out:
            raise UserError(f"embed.layers: {name!r} is listed twice")
        out[name] = canonical_layer(name, cfg)
    return out
