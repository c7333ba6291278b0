"""The one savanna checkpoint writer, and the helpers TRAIN uses around DeepSpeed's own save.

A checkpoint is `SAVE/global_stepN/` (N >= 1: savanna silently skips global_step0) holding
`mp_rank_XX_model_states.pt` ({module, param_shapes (flat), dp_world_size, mp_world_size, iteration,
args, ...}), `configs/config.yaml` (our resolved run config, where savanna keeps its YAMLs) and
`manifest.json` (every tensor's name, shape, dtype and CRC32, `manifest.py`). It is built in a
`.tmp-*` folder and renamed into place, and `SAVE/latest` is rewritten (atomically) only after
that: a process killed at any point leaves the previous checkpoint and `latest` as they were.

`write_model_states` writes the model-state files key by key (finetune base preparation,
`convert.py target=savanna`, `save_module_checkpoint` and so the demo checkpoint script): every
source shard stays memory-mapped (or, for ZeRO-3, gathered lazily); for each key the full tensor
is formed once (`cat` of the source shards along the key's partition dim, `mp.py`),
legacy rows interleaved, resized, MLP-padded and cast, and its MP chunks streamed into the open
output files at once. Peak memory is about one full tensor, whatever the model size. `cat` and
`chunk` move bytes without arithmetic, which is why MP N -> M -> N round-trips byte-exactly.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evo2_hydra.checkpoint.layout import LATEST, step_dirs
from evo2_hydra.checkpoint.legacy import interleave_rows, legacy_projection_keys, pad_mlp_tensor
from evo2_hydra.checkpoint.manifest import (
    MANIFEST,
    tensor_entry,
    verify_manifest,
    write_step_manifest,
)
from evo2_hydra.checkpoint.mp import partition_dim
from evo2_hydra.checkpoint.resize import ScratchAllocator, resize_tensor
from evo2_hydra.checkpoint.stream import TensorRef, TorchSaveStream, conversion_progress
from evo2_hydra.errors import UserError
from evo2_hydra.io_utils import (
    atomic_dir,
    old_name,
    remove_stale_temporaries,
    write_text_atomic,
)

__all__ = ["MANIFEST", "verify_manifest", "write_manifest", "write_model_states"]

log = logging.getLogger(__name__)

CONFIGS_DIR = "configs"
RUN_CONFIG = "config.yaml"
# Test hook: seconds to sleep after each file written into a temporary step folder, so a test can
# SIGKILL the writer mid-checkpoint.
PAUSE_ENV = "EVO2_HYDRA_CKPT_TEST_PAUSE_S"
# savanna reassigns the hcl time buffer as float32 whatever the model dtype.
KEEP_FLOAT32 = ("mixer.mixer.filter.t",)
# Tensors formed ahead of the writer thread (each up to one full tensor of memory).
WRITE_AHEAD = 2


def step_tag(iteration: int) -> str:
    if iteration < 1:
        raise ValueError(
            f"checkpoint iteration must be >= 1 (savanna skips global_step0), got {iteration}"
        )
    return f"global_step{iteration}"


def mp_file_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


def pause_for_tests() -> None:
    seconds = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


def write_manifest(step_dir: str | Path) -> Path:
    """`step_dir/manifest.json` described from the files on disk (DeepSpeed-saved steps)."""
    return write_step_manifest(step_dir)


def write_latest(save_dir: Path, tag: str) -> None:
    # No trailing newline, exactly as DeepSpeed writes it.
    write_text_atomic(save_dir / LATEST, tag)


def _write_configs(step_dir: Path, run_config_yaml: str | None) -> None:
    if run_config_yaml is not None:
        (step_dir / CONFIGS_DIR).mkdir(exist_ok=True)
        (step_dir / CONFIGS_DIR / RUN_CONFIG).write_text(run_config_yaml)


def write_checkpoint(
    save_dir: str | Path,
    iteration: int,
    fill: Callable[[Path], None],
    *,
    run_config_yaml: str | None = None,
) -> Path:
    """Build `save_dir/global_step{iteration}` with `fill(tmp_step_dir)`, then commit it and `latest`."""
    save_dir = Path(save_dir)
    tag = step_tag(iteration)
    save_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(save_dir)
    with atomic_dir(save_dir / tag, overwrite=True) as tmp:
        fill(tmp)
        _write_configs(tmp, run_config_yaml)
        if not (tmp / MANIFEST).exists():
            write_manifest(tmp)
        pause_for_tests()
    write_latest(save_dir, tag)
    return save_dir / tag


def cast(key: str, value: Tensor, dtype: torch.dtype | None) -> Tensor:
    if dtype is None or not value.is_floating_point() or key.endswith(KEEP_FLOAT32):
        return value
    return value.to(dtype)


def full_tensor(
    key: str, values: Sequence[Tensor], *, legacy_keys: frozenset[str] = frozenset()
) -> Tensor:
    """The MP=1 tensor of `key` from its per-rank pieces.

    Keys in `legacy_keys` (featurizer rows of Hyena layers with `ckpt.interleave_legacy`) are
    interleaved per piece first: the legacy [x1 | x2 | v] blocks are per MP rank (`legacy.py`).
    """
    if key in legacy_keys:
        values = [interleave_rows(v) for v in values]
    dim = partition_dim(key)
    if len(values) == 1 or dim is None:
        return values[0]
    return torch.cat(list(values), dim=dim)


def write_model_states(
    step_dir: Path,
    shards: Sequence[Mapping[str, Any]],
    *,
    iteration: int,
    mp_out: int | None = None,
    context: int | None = None,
    resize_same_width: bool = False,
    pad_to: int | None = None,
    dtype: torch.dtype | None = None,
    interleave_legacy: bool = False,
    args: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    allocator: ScratchAllocator | None = None,
    desc: str | None = None,
) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, dict[str, Any]]]:
    """Write `step_dir/mp_rank_XX_model_states.pt` for `mp_out` ranks (default: as many as `shards`).

    `shards`: the source's `module` mappings, one per MP rank (memory-mapped or lazy). Per key:
    legacy rows interleaved, context-dependent tensors resized to `context` (only where the width
    changes: a same-width source keeps its bytes, unless `resize_same_width`), the MLP zero-padded
    to `pad_to`, cast to `dtype`. `extra`: more top-level entries of every file. `desc` shows a progress bar.

    Returns:
        key -> (MP=1 shape, dtype) of what was written, and file name -> its manifest entries.
    """
    mp_out = mp_out or len(shards)
    allocator = allocator or ScratchAllocator(step_dir.parent)
    keys = list(shards[0])
    legacy = legacy_projection_keys(keys) if interleave_legacy else frozenset()
    outs = [TorchSaveStream(step_dir / mp_file_name(r)) for r in range(mp_out)]
    modules: list[dict[str, Any]] = [collections.OrderedDict() for _ in range(mp_out)]
    shapes: list[dict[str, torch.Size]] = [collections.OrderedDict() for _ in range(mp_out)]
    written: dict[str, tuple[tuple[int, ...], str]] = {}
    progress = (
        conversion_progress(sum(isinstance(shards[0][k], Tensor) for k in keys), desc, "tensor")
        if desc
        else None
    )
    # One writer thread streams tensor i into the files (write_record and the CRC32 release the
    # GIL) while this thread forms, resizes and casts tensor i+1; jobs run in submission order,
    # so the files are byte-for-byte what a single thread writes. At most WRITE_AHEAD tensors
    # wait, so memory stays at a few tensors.
    pending: collections.deque[Future] = collections.deque()

    def submit(job) -> None:
        if len(pending) >= WRITE_AHEAD:
            pending.popleft().result()
        pending.append(writer.submit(job))

    def write_pieces(key: str, pieces: Sequence[Tensor]) -> None:
        for rank, piece in enumerate(pieces):
            modules[rank][key] = outs[rank].add(piece)
            shapes[rank][key] = torch.Size(piece.shape)
        if progress is not None:
            progress.update(1)

    def keep_object(key: str, value: Any) -> None:
        for module in modules:  # TE extra state: rank 0's, as savanna's resharding tool
            module[key] = value

    writer = ThreadPoolExecutor(1)
    try:
        for key in keys:
            first = shards[0][key]
            if not isinstance(first, Tensor) or key.endswith("._extra_state"):
                submit(lambda key=key, first=first: keep_object(key, first))
                continue
            value = full_tensor(key, [first] + [s[key] for s in shards[1:]], legacy_keys=legacy)
            value = resize_tensor(key, value, context, allocator, same_width=resize_same_width)
            value = cast(key, pad_mlp_tensor(key, value, pad_to), dtype)
            dim = partition_dim(key)
            if dim is not None and value.shape[dim] % mp_out:
                raise UserError(
                    f"target.mp={mp_out}: {key} {tuple(value.shape)} does not split along dim {dim}"
                )
            pieces = torch.chunk(value, mp_out, dim=dim) if dim is not None else [value] * mp_out
            submit(lambda key=key, pieces=pieces: write_pieces(key, pieces))
            written[key] = (tuple(value.shape), str(value.dtype).removeprefix("torch."))
            del value, pieces
        while pending:
            pending.popleft().result()
        run_args = dict(args or {})
        if run_args:
            run_args["model_parallel_size"] = mp_out
        for rank, out in enumerate(outs):
            payload = {
                "module": modules[rank],
                "param_shapes": shapes[rank],
                "dp_world_size": 1,
                "mp_world_size": mp_out,
                "iteration": iteration,
                "args": run_args,
            }
            payload.update({k: v for k, v in (extra or {}).items() if k not in payload})
            out.finish(payload)
            pause_for_tests()
    finally:
        writer.shutdown(wait=True)  # no write may still run when the files are closed
        if progress is not None:
            progress.close()
        for out in outs:
            out.__exit__(None, None, None)
    described = {
        mp_file_name(rank): {
            key: tensor_entry(ref.shape, ref.dtype, ref.crc32)
            for key, ref in module.items()
            if isinstance(ref, TensorRef)
        }
        for rank, module in enumerate(modules)
    }
    return written, described


def write_step(
    step_dir: Path,
    shards: Sequence[Mapping[str, Any]],
    *,
    iteration: int,
    run_config_yaml: str | None = None,
    **transform: Any,
) -> dict[str, tuple[tuple[int, ...], str]]:
    """One complete step folder: model states (`write_model_states`), configs, manifest."""
    step_dir.mkdir(parents=True, exist_ok=True)
    written, described = write_model_states(step_dir, shards, iteration=iteration, **transform)
    _write_configs(step_dir, run_config_yaml)
    write_step_manifest(step_dir, described)
    return written


def write_savanna_dir(
    tmp_out: Path, shards: Sequence[Mapping[str, Any]], *, iteration: int, **options: Any
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Fill `tmp_out` (an empty folder, renamed into place by the caller) with a save folder:
    `global_stepN/` (`write_step`) and `latest`. Returns key -> (MP=1 shape, dtype) written.
    """
    tag = step_tag(iteration)
    options.setdefault("allocator", ScratchAllocator(tmp_out))
    written = write_step(tmp_out / tag, shards, iteration=iteration, **options)
    write_latest(tmp_out, tag)
    return written


def save_module_checkpoint(
    save_dir: str | Path,
    iteration: int,
    module_states: Sequence[Mapping[str, Any]],
    *,
    extra: Mapping[str, Any] | None = None,
    run_config_yaml: str | None = None,
) -> Path:
    """Add `save_dir/global_step{iteration}` (one model-state file per MP rank in
    `module_states`, written as given), then `latest`, atomically; returns the step folder.
    """
    extra = dict(extra or {})
    args = extra.pop("args", None)

    def fill(tmp: Path) -> None:
        write_step(
            tmp,
            module_states,
            iteration=iteration,
            args=args,
            extra=extra,
            run_config_yaml=run_config_yaml,
        )

    return write_checkpoint(save_dir, iteration, fill)


def commit_step_dir(
    tmp_step_dir: str | Path,
    save_dir: str | Path,
    tag: str,
    *,
    run_config_yaml: str | None = None,
    manifest: bool = True,
) -> Path:
    """Move a step folder DeepSpeed saved elsewhere (same filesystem) into `save_dir/tag`, then `latest`.

    For TRAIN: `engine.save_checkpoint(staging, tag=tag, save_latest=False)`, then
    `commit_step_dir(staging / tag, save_dir, tag, run_config_yaml=...)`. Adds `configs/config.yaml`
    and the manifest before the rename.
    """
    tmp_step_dir, save_dir = Path(tmp_step_dir), Path(save_dir)
    step_tag(int(tag.removeprefix("global_step")))  # N >= 1
    _write_configs(tmp_step_dir, run_config_yaml)
    if manifest:
        write_manifest(tmp_step_dir)
    final = save_dir / tag
    save_dir.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = old_name(final)
        os.replace(final, old)
        os.replace(tmp_step_dir, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_step_dir, final)
    write_latest(save_dir, tag)
    return final


def prune_checkpoints(save_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step folders (never the one `latest` names)."""
    save_dir = Path(save_dir)
    if keep_last < 1 or not save_dir.is_dir():
        return []
    remove_stale_temporaries(save_dir)  # an earlier prune or commit that was killed
    latest_file = save_dir / LATEST
    current = latest_file.read_text().strip() if latest_file.is_file() else None
    steps = step_dirs(save_dir)
    removed = []
    for step in steps[: max(0, len(steps) - keep_last)]:
        if step.name == current:
            continue
        # Rename first: a prune killed halfway never leaves a half-deleted global_stepN behind.
        doomed = old_name(step)
        os.replace(step, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(step)
    if removed:
        log.info("pruned %d old checkpoint(s) in %s", len(removed), save_dir)
    return removed
