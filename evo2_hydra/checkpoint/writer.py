"""Write savanna checkpoints atomically; helpers for TRAIN around DeepSpeed's own save.

A checkpoint is `SAVE/global_stepN/` (N >= 1: savanna silently skips global_step0) holding
`mp_rank_XX_model_states.pt` ({module, param_shapes (flat), dp_world_size, mp_world_size, iteration,
args, ...}), `configs/config.yaml` (our resolved run config, where savanna keeps its YAMLs) and
`manifest.json` (every tensor's name, shape, dtype and CRC32). It is built in a `.tmp-*` folder
and renamed into place, and `SAVE/latest` is rewritten (atomically) only after that: a process
killed at any point leaves the previous checkpoint and `latest` as they were.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evo2_hydra.checkpoint.layout import LATEST, MP_FILE_RE, ZERO3_FILE_RE, step_dirs
from evo2_hydra.checkpoint.mapped import crc32_of
from evo2_hydra.checkpoint.resize import flat_param_shapes
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.io_utils import atomic_dir, write_text_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CONFIGS_DIR = "configs"
RUN_CONFIG = "config.yaml"
# Test hook: seconds to sleep after each file written into a temporary step folder, so a test can
# SIGKILL the writer mid-checkpoint.
PAUSE_ENV = "EVO2_HYDRA_CKPT_TEST_PAUSE_S"


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


def tensor_crc32(tensor: Tensor) -> str:
    """CRC32 of the tensor's bytes (row-major), as 8 hex digits (a `concat_rows` placeholder's
    from its parts)."""
    return f"{crc32_of(tensor.detach()):08x}"


def _model_state_files(step_dir: Path) -> list[Path]:
    return sorted(
        f for f in step_dir.iterdir() if MP_FILE_RE.match(f.name) or ZERO3_FILE_RE.match(f.name)
    )


def describe_tensors(module: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "shape": list(t.shape),
            "dtype": str(t.dtype).replace("torch.", ""),
            "crc32": tensor_crc32(t),
        }
        for name, t in module.items()
        if isinstance(t, Tensor)
    }


def write_manifest(step_dir: str | Path) -> Path:
    """Write `step_dir/manifest.json`: per model-state file, each tensor's shape, dtype and CRC32.

    Reads the files back from disk (memory-mapped), so the manifest describes what was written.
    Other files (DeepSpeed optimizer states) are listed with their sizes.
    """
    step_dir = Path(step_dir)
    files: dict[str, Any] = {}
    for f in _model_state_files(step_dir):
        state = safe_load(f)
        module = state.get("module", {}) if isinstance(state, dict) else {}
        files[f.name] = {"bytes": f.stat().st_size, "tensors": describe_tensors(module)}
        del state, module
    others = {
        str(p.relative_to(step_dir)): p.stat().st_size
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST and p.name not in files
    }
    manifest = {
        "checksum": "crc32 of each tensor's bytes",
        "model_states": files,
        "other_files": others,
    }
    path = step_dir / MANIFEST
    write_text_atomic(path, json.dumps(manifest, indent=1))
    return path


def verify_manifest(step_dir: str | Path) -> list[str]:
    """Names of tensors whose shape, dtype or checksum differ from the manifest (empty: all good)."""
    step_dir = Path(step_dir)
    manifest = json.loads((step_dir / MANIFEST).read_text())
    bad = []
    for fname, entry in manifest["model_states"].items():
        module = safe_load(step_dir / fname).get("module", {})
        now = describe_tensors(module)
        bad += [f"{fname}:{k}" for k, v in entry["tensors"].items() if now.get(k) != v]
    return bad


def write_latest(save_dir: Path, tag: str) -> None:
    # No trailing newline, exactly as DeepSpeed writes it.
    write_text_atomic(save_dir / LATEST, tag)


def _write_configs(step_dir: Path, run_config_yaml: str | None) -> None:
    if run_config_yaml is not None:
        (step_dir / CONFIGS_DIR).mkdir(exist_ok=True)
        (step_dir / CONFIGS_DIR / RUN_CONFIG).write_text(run_config_yaml)


def remove_stale_temporaries(save_dir: Path) -> None:
    """Drop `.tmp-*` / `.old-*` leftovers of writers that were killed (only rank 0 writes here)."""
    for p in save_dir.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in save_dir.glob(".old-*"):
        shutil.rmtree(p, ignore_errors=True)


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
        write_manifest(tmp)
        pause_for_tests()
    write_latest(save_dir, tag)
    return save_dir / tag


def model_state_payload(
    module: Mapping[str, Any], *, iteration: int, mp: int, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The top-level dict of one `mp_rank_XX_model_states.pt` (savanna.md §3.2, §3.5)."""
    payload: dict[str, Any] = {
        "module": dict(module),
        "param_shapes": flat_param_shapes(module),
        "dp_world_size": 1,
        "mp_world_size": mp,
        "iteration": iteration,
        "args": {},
    }
    for key, value in (extra or {}).items():
        if key not in ("module", "param_shapes"):
            payload[key] = value
    return payload


def save_module_checkpoint(
    save_dir: str | Path,
    iteration: int,
    module_states: Sequence[Mapping[str, Any]],
    *,
    extra: Mapping[str, Any] | None = None,
    run_config_yaml: str | None = None,
) -> Path:
    """Write a savanna checkpoint (one model-state file per MP rank) atomically; returns the step dir."""
    mp = len(module_states)

    def fill(tmp: Path) -> None:
        for rank, module in enumerate(module_states):
            payload = model_state_payload(module, iteration=iteration, mp=mp, extra=extra)
            torch.save(payload, tmp / mp_file_name(rank))
            pause_for_tests()

    return write_checkpoint(save_dir, iteration, fill, run_config_yaml=run_config_yaml)


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
        old = save_dir / f".old-{tag}.{os.getpid()}"
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
    latest_file = save_dir / LATEST
    current = latest_file.read_text().strip() if latest_file.is_file() else None
    steps = step_dirs(save_dir)
    removed = []
    for step in steps[: max(0, len(steps) - keep_last)]:
        if step.name == current:
            continue
        # Rename first: a prune killed halfway never leaves a half-deleted global_stepN behind.
        doomed = save_dir / f".old-{step.name}.{os.getpid()}"
        os.replace(step, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(step)
    if removed:
        log.info("pruned %d old checkpoint(s) in %s", len(removed), save_dir)
    return removed
