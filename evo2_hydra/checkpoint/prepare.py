"""Turn any accepted `ckpt.path` into a checked, resized savanna checkpoint, lazily and atomically.

`resize_to_dir` is the one write path (standalone `convert.py target=savanna` and finetune
preparation): shards are memory-mapped and handled one at a time, legacy projections interleaved
on request, the MLP zero-padded on request, context-dependent tensors resized (`resize.py`), and
the result written as `OUT/global_stepN/mp_rank_XX_model_states.pt` + `OUT/latest`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from evo2_hydra.checkpoint.layout import CheckpointLocation, locate_checkpoint
from evo2_hydra.checkpoint.legacy import interleave_legacy_projections, mlp_width, pad_mlp
from evo2_hydra.checkpoint.loader import IMPORTED_FROM, load_shards, shard_shapes
from evo2_hydra.checkpoint.mapped import tracking_mapped_files
from evo2_hydra.checkpoint.mp import merge_mp, merged_shapes
from evo2_hydra.checkpoint.resize import (
    ScratchAllocator,
    context_width,
    is_context_key,
    resize_module,
)
from evo2_hydra.checkpoint.writer import (
    model_state_payload,
    mp_file_name,
    pause_for_tests,
    write_checkpoint,
)
from evo2_hydra.config import CkptConfig, ModelConfig
from evo2_hydra.errors import UserError
from evo2_hydra.io_utils import atomic_dir, file_lock

log = logging.getLogger(__name__)

PREPARED_MARKER = "prepared.json"
# Bump when the prepared layout changes, so cached base checkpoints are rebuilt.
PREPARE_FORMAT = 1


def padded_shapes(shapes: Mapping[str, tuple[int, ...]], width: int) -> dict[str, tuple[int, ...]]:
    out = {}
    for key, shape in shapes.items():
        if key.endswith(("mlp.w1.weight", "mlp.w2.weight")):
            shape = (max(width, shape[0]), *shape[1:])
        elif key.endswith("mlp.w3.weight"):
            shape = (shape[0], max(width, shape[1]))
        out[key] = tuple(shape)
    return out


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
        shapes = padded_shapes(shapes, pad_to)
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


def _transform(
    module: Mapping[str, Any],
    context: int,
    *,
    pad_to: int | None,
    allocator: ScratchAllocator,
    fit: Callable[[Mapping[str, Any]], dict[str, Any]] | None,
) -> dict[str, Any]:
    if pad_to is not None:
        module = pad_mlp(module, pad_to)
    out = resize_module(module, context, allocator)
    return fit(out) if fit is not None else out


def resize_to_dir(
    shards: list[dict[str, Any]],
    out_dir: str | Path,
    context: int,
    *,
    iteration: int,
    merge: bool = False,
    interleave_legacy: bool = False,
    pad_to: int | None = None,
    overwrite: bool = False,
    run_config_yaml: str | None = None,
    extra_files: Mapping[str, str] | None = None,
    fit: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
) -> Path:
    """Write `shards` (top-level dicts, one per MP rank) resized to `context` as a savanna save folder.

    Each shard's tensors are read from its memory map only while that shard is written. With
    `merge`, MP shards are concatenated into one MP=1 file (needed to train at MP=1).
    """
    from evo2_hydra.checkpoint.stream import TorchSaveStream  # the conversion package's writer

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UserError(f"output={out_dir} already exists; set overwrite=true to replace it")
    args = shards[0].get("args") if isinstance(shards[0].get("args"), dict) else {}

    with atomic_dir(out_dir, overwrite=overwrite) as tmp_out:
        allocator = ScratchAllocator(tmp_out)

        def fill(step_tmp: Path) -> None:
            modules = (s["module"] for s in shards)
            if interleave_legacy:  # per shard: the legacy blocks are per MP rank (§1.5)
                modules = (interleave_legacy_projections(m) for m in modules)
            if merge and len(shards) > 1:
                modules = iter([merge_mp(list(modules))])
                mp = 1
            else:
                mp = len(shards)
            if pad_to is not None and mp > 1:
                raise UserError("MLP padding needs an MP=1 result (the pad goes at the end of F)")
            for rank, module in enumerate(modules):
                out = _transform(module, context, pad_to=pad_to, allocator=allocator, fit=fit)
                payload = model_state_payload(out, iteration=iteration, mp=mp, extra={"args": args})
                # torch.save's format, tensor by tensor; unchanged tensors of a source loaded in
                # a tracking_mapped_files() block are copied file to file (checkpoint/bulk_io.py).
                with TorchSaveStream(step_tmp / mp_file_name(rank)) as stream:
                    stream.finish(payload)
                del out, payload, module
                pause_for_tests()

        write_checkpoint(tmp_out, iteration, fill, run_config_yaml=run_config_yaml)
        for name, text in (extra_files or {}).items():
            (tmp_out / name).write_text(text)
    return out_dir


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
    resize_to_dir(
        shards,
        out_dir,
        ckpt.context,
        iteration=1,
        merge=True,
        interleave_legacy=ckpt.interleave_legacy,
        pad_to=pad_to,
        overwrite=True,
        extra_files={PREPARED_MARKER: marker},
        fit=lambda module: fit_to_model(module, model, ckpt.context),
    )


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


def resize_context(
    source: str | Path,
    out_dir: str | Path,
    context: int,
    *,
    trust_pickle: bool = False,
    overwrite: bool = False,
) -> Path:
    """Standalone resize (no model check): any accepted layout -> savanna folder at `context`.

    Keeps the MP layout and the source iteration (at least 1).
    """
    location = locate_checkpoint(source)
    with tracking_mapped_files():  # unchanged tensors are then copied file to file
        shards = load_shards(location, trust_pickle=trust_pickle)
        context_width(merged_shapes(shard_shapes(shards)), location.describe())
        iteration = max(1, shards[0].get("iteration") or location.iteration or 1)
        return resize_to_dir(shards, out_dir, context, iteration=iteration, overwrite=overwrite)
