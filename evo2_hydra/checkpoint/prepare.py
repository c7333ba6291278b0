"""Turn any accepted `ckpt.path` into a checked, resized MP=1 savanna checkpoint for finetuning.

The source is memory-mapped, checked against the model and preset, and written by the one
savanna writer (`writer.write_savanna_dir`, the same as `convert.py target=savanna`): legacy
projections interleaved and the MLP zero-padded on request, context-dependent tensors resized,
MP shards merged; the result is `OUT/global_step1/mp_rank_00_model_states.pt` + `OUT/latest`,
cached by source and settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from evo2_hydra.checkpoint.adapters import IMPORTED_FROM
from evo2_hydra.checkpoint.layout import CheckpointLocation, locate_checkpoint
from evo2_hydra.checkpoint.legacy import mlp_width, padded_mlp_shape
from evo2_hydra.checkpoint.loader import load_shards, shard_shapes
from evo2_hydra.checkpoint.mapped import tracking_mapped_files
from evo2_hydra.checkpoint.mp import merged_shapes
from evo2_hydra.checkpoint.resize import context_width, is_context_key
from evo2_hydra.checkpoint.writer import write_savanna_dir
from evo2_hydra.config import CkptConfig, ModelConfig
from evo2_hydra.errors import UserError
from evo2_hydra.io_utils import atomic_dir, file_lock

log = logging.getLogger(__name__)

PREPARED_MARKER = "prepared.json"
# Bump when the prepared layout changes, so cached base checkpoints are rebuilt.
PREPARE_FORMAT = 2  # 2: written by the one savanna writer (writer.py)


def check_checkpoint(
    shapes: Mapping[str, tuple[int, ...]],
    where: str,
    ckpt: CkptConfig,
    model: ModelConfig,
    *,
    check_source_context: bool = True,
) -> int | None:
    """Check the (merged) shapes against the model and the preset; return the MLP pad width or None.

    Raises:
        UserError: naming `where` and the key: another model size, another MLP width, a filter
            width that is not the preset's source context, missing or unexpected keys.
    """
    from evo2_hydra.model import check_state_dict

    width = context_width(shapes, where)
    pad_to = None
    found = mlp_width(shapes)
    if found is not None and found[1] < model.mlp_inner_size and ckpt.pad_mlp:
        pad_to = model.mlp_inner_size
        shapes = {k: padded_mlp_shape(k, s, pad_to) for k, s in shapes.items()}
    try:
        check_state_dict(model, width or ckpt.context, shapes)
    except UserError as err:
        hint = ""
        if found is not None and found[1] < model.mlp_inner_size and not ckpt.pad_mlp:
            hint = f" (or ckpt.pad_mlp=true to zero-pad {found[0]} from {found[1]} to {model.mlp_inner_size})"
        raise UserError(f"{where}: {err}{hint}") from None
    if (
        check_source_context
        and width is not None
        and ckpt.source_context is not None
        and width != ckpt.source_context
    ):
        key = next(k for k in shapes if is_context_key(k))
        raise UserError(
            f"{where}: {key} is {width} columns wide, but ckpt.source_context={ckpt.source_context} "
            f"(ckpt={ckpt.name}); choose the preset of this file or set ckpt.source_context={width}"
        )
    return pad_to


def fit_to_model(module: Mapping[str, Any], model: ModelConfig, context: int) -> dict[str, Any]:
    """Exactly the model's keys, so a strict `load_state_dict` (DeepSpeed's default) accepts it.

    Drops the named ignore list (TransformerEngine `_extra_state`: we run no TE) and adds the unused
    norms savanna never applies when the file lacks them (as ones, like a fresh savanna model).
    """
    from evo2_hydra.model import IGNORED_SUFFIXES, OPTIONAL_SUFFIXES, expected_state_dict_shapes

    expected = expected_state_dict_shapes(model, context)
    out = {k: v for k, v in module.items() if not k.endswith(IGNORED_SUFFIXES)}
    norm_dtype = next((v.dtype for k, v in out.items() if k.endswith("norm.weight")), torch.float32)
    for key, shape in expected.items():
        if key not in out and key.endswith(OPTIONAL_SUFFIXES):
            out[key] = torch.ones(shape, dtype=norm_dtype)
    dropped = sum(k.endswith(IGNORED_SUFFIXES) for k in module)
    if dropped:
        log.info("base checkpoint: dropped %d TransformerEngine _extra_state entries", dropped)
    return {k: out[k] for k in expected if k in out}  # model order; check_checkpoint ran before


def _cache_key(
    location: CheckpointLocation, ckpt: CkptConfig, model: ModelConfig
) -> dict[str, Any]:
    files = location.model_files or [f for fs in location.zero3_files.values() for f in fs]
    return {
        "format": PREPARE_FORMAT,
        "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "context": ckpt.context,
        "interleave_legacy": ckpt.interleave_legacy,
        "pad_mlp": ckpt.pad_mlp,
        "model": model.name,
        "mlp_inner_size": model.mlp_inner_size,
    }


def _cached(out_dir: Path, key: dict[str, Any]) -> bool:
    marker = out_dir / PREPARED_MARKER
    if not marker.is_file():
        return False
    try:
        saved = json.loads(marker.read_text())
        locate_checkpoint(out_dir)
    except (ValueError, UserError):
        return False
    return saved.get("key") == key


def prepare_base_checkpoint(
    ckpt: CkptConfig, model: ModelConfig, out_dir: str | Path
) -> Path | None:
    """Resolve `ckpt.path`, check it, resize to `ckpt.context` and write it to `out_dir` (cached).

    `out_dir` becomes a DeepSpeed save folder (`latest` -> `global_step1/mp_rank_00_model_states.pt`,
    MP=1) that `engine.load_checkpoint(out_dir, load_module_only=True)` accepts. Same source and
    settings as last time: the folder is reused as is. Call it on one rank.

    Returns:
        `out_dir`, or None when `ckpt.path` is unset and `ckpt.random_init` asks for fresh weights.
    """
    if ckpt.path is None:
        if ckpt.random_init:
            return None
        raise UserError(
            f"ckpt.path is not set (ckpt={ckpt.name}): give ckpt.path=FILE_OR_FOLDER, or "
            "ckpt.random_init=true to start from fresh weights"
        )
    out_dir = Path(out_dir)
    location = locate_checkpoint(ckpt.path)
    key = _cache_key(location, ckpt, model)
    if _cached(out_dir, key):
        log.info("base checkpoint: reusing %s (same source and settings)", out_dir)
        return out_dir
    with tracking_mapped_files():  # unchanged tensors are then copied file to file
        _prepare(location, ckpt, model, out_dir, key)
    return out_dir


def _prepare(
    location: CheckpointLocation, ckpt: CkptConfig, model: ModelConfig, out_dir: Path, key: dict
) -> None:
    """Load, check, resize and write (the body of prepare_base_checkpoint's tracking block)."""
    shards = load_shards(location, trust_pickle=ckpt.trust_pickle)
    shapes = merged_shapes(shard_shapes(shards))
    imported = shards[0].get(IMPORTED_FROM)
    pad_to = check_checkpoint(
        shapes, location.describe(), ckpt, model, check_source_context=imported is None
    )
    log.info(
        "base checkpoint: %s -> %s (context %s -> %d%s%s)",
        location.describe(),
        out_dir,
        context_width(shapes, str(location.source)),
        ckpt.context,
        ", MP merged" if location.mp > 1 else "",
        f", MLP padded to {pad_to}" if pad_to else "",
    )
    marker = json.dumps({"key": key, "source": str(location.source)}, indent=1)
    args = shards[0].get("args") if isinstance(shards[0].get("args"), dict) else {}
    with atomic_dir(out_dir, overwrite=True) as tmp:
        write_savanna_dir(
            tmp,
            [fit_to_model(s["module"], model, ckpt.context) for s in shards],
            iteration=1,
            mp_out=1,
            context=ckpt.context,
            resize_same_width=True,  # a base is canonical: unused hcm columns are always zero
            pad_to=pad_to,
            interleave_legacy=ckpt.interleave_legacy,
            args=args,
        )
        (tmp / PREPARED_MARKER).write_text(marker)


def prepare_shared_base_checkpoint(
    ckpt: CkptConfig, model: ModelConfig, cache_dir: str | Path
) -> Path | None:
    """`prepare_base_checkpoint` into the shared cache (`paths.cache_dir/base_checkpoints`).

    Runs and sweep points with the same source, context and settings share one prepared copy; a
    file lock makes concurrent Slurm jobs build it once while the others wait and reuse it.
    """
    if ckpt.path is None:  # fresh weights (None) or the clear "ckpt.path is not set" error
        return prepare_base_checkpoint(ckpt, model, Path(cache_dir))
    key = _cache_key(locate_checkpoint(ckpt.path), ckpt, model)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    out_dir = Path(cache_dir) / "base_checkpoints" / f"{model.name}-ctx{ckpt.context}-{digest}"
    with file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        return prepare_base_checkpoint(ckpt, model, out_dir)
