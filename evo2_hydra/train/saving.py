"""Training checkpoints in the savanna layout, written atomically, and resuming from them.

Layout (run folder):
  checkpoints/latest                         "global_stepN", updated only after the step is complete
  checkpoints/global_stepN/                  what DeepSpeed's save_checkpoint writes for the ZeRO stage
                                             (mp_rank_00_model_states.pt with savanna's client state:
                                             iteration, args, data_loading, ...; optimizer files)
  checkpoints/global_stepN/rng_rank{r}.pt    each rank's python/numpy/torch(/cuda) RNG states
  checkpoints/global_stepN/configs/config.yaml  the run config
  checkpoints/global_stepN/conditions.json   the conditioning mapping the run trained with
  checkpoints/global_stepN/manifest.json     every tensor's shape, dtype, CRC32 (CKPT's write_manifest)

DeepSpeed writes into `checkpoints/.staging/global_stepN`; rank 0 then adds the files above and
`commit_step_dir` renames the folder into place and updates `latest` last, so a run killed while
saving leaves the previous checkpoint as `latest`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from evo2_hydra.checkpoint.layout import RUN_CHECKPOINT_SUBDIR
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.errors import UserError
from evo2_hydra.io_utils import write_text_atomic

STAGING = ".staging"


def checkpoint_dir(run_dir: Path) -> Path:
    """The checkpoints folder of a run folder."""
    return Path(run_dir) / RUN_CHECKPOINT_SUBDIR


def step_tag(step: int) -> str:
    """The step folder name DeepSpeed and savanna use (`global_stepN`)."""
    return f"global_step{step}"


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.barrier()


# ---- RNG states (plain tensors and tuples, so a weights_only load reads them back) ----------


def capture_rng() -> dict:
    """This rank's Python, numpy and torch RNG states, to save with a checkpoint."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    """Restore the RNG states `capture_rng` saved."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- saving ---------------------------------------------------------------------------------


def save_training_checkpoint(
    engine,
    run_dir: Path,
    step: int,
    *,
    rank: int,
    client_state: dict,
    config_yaml: str,
    conditions: dict[str, str],
    keep_last: int,
) -> Path:
    """Save step `step` from every rank; rank 0 commits it. Returns the committed step folder."""
    from evo2_hydra.checkpoint.writer import commit_step_dir, prune_checkpoints

    save_dir = checkpoint_dir(run_dir)
    staging = save_dir / STAGING
    tag = step_tag(step)
    if rank == 0:
        shutil.rmtree(staging / tag, ignore_errors=True)  # leftovers of a save that was killed
        staging.mkdir(parents=True, exist_ok=True)
    barrier()
    # frozen parameters (a LoRA run's base) are not checkpoint state: they come from the base
    engine.save_checkpoint(
        str(staging),
        tag=tag,
        client_state=client_state,
        save_latest=False,
        exclude_frozen_parameters=True,
    )
    torch.save(capture_rng(), staging / tag / f"rng_rank{rank}.pt")
    barrier()
    final = save_dir / tag
    if rank == 0:
        write_text_atomic(staging / tag / "conditions.json", json.dumps(conditions, indent=1))
        # adds configs/config.yaml and manifest.json, renames into place, then updates `latest`
        commit_step_dir(staging / tag, save_dir, tag, run_config_yaml=config_yaml)
        prune_checkpoints(save_dir, keep_last)
    barrier()
    return final


# ---- resuming -------------------------------------------------------------------------------


def resume_step_dir(run_dir: Path) -> Path | None:
    """The verified step folder a run continues from, or None for a run folder without checkpoints.

    `checkpoints/latest` when it names an intact step, else the newest intact one (a warning
    says why); refuses (one line) when steps exist but none is intact, and stops at a file that
    would run code. See checkpoint/integrity.py. Call it on rank 0 before DeepSpeed loads anything.
    """
    from evo2_hydra.checkpoint.integrity import resume_step_dir as verified_resume_step

    return verified_resume_step(checkpoint_dir(run_dir))


def load_training_checkpoint(engine, step_dir: Path, rank: int) -> dict:
    """Model, optimizer, LR schedule and this rank's RNG from `step_dir`; returns the client state.

    `step_dir` must come from `resume_step_dir` (verified: DeepSpeed unpickles its files with
    `weights_only=False`, so nothing unverified may reach it).
    """
    load_path, client_state = engine.load_checkpoint(
        str(step_dir.parent),
        tag=step_dir.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None or client_state is None:
        raise UserError(f"{step_dir}: DeepSpeed could not load this checkpoint (files missing?)")
    rng_file = step_dir / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise UserError(
            f"{rng_file}: missing; this checkpoint was saved with another number of processes "
            "(resume with the same cluster.tasks / world size)"
        )
    restore_rng(safe_load(rng_file, mmap=False))
    return client_state
