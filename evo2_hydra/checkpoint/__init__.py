"""Savanna/DeepSpeed checkpoints in and out: safe loading, layout detection, MP merge/split,
context resize (lazy), atomic writing. See README "## Checkpoints".

    location = locate_checkpoint("savanna_evo2_7b.pt")            # or a folder, see layout.py
    module, meta = load_module_state_dict(path)                     # MP=1 savanna state dict
    load_dir = prepare_shared_base_checkpoint(run.ckpt, run.model, run.paths.cache_dir)
"""

from evo2_hydra.checkpoint.layout import (
    LATEST,
    RUN_CHECKPOINT_SUBDIR,
    CheckpointLocation,
    locate_checkpoint,
    read_latest,
    step_dirs,
)
from evo2_hydra.checkpoint.loader import load_module_state_dict, load_shards
from evo2_hydra.checkpoint.mp import PARTITION_DIMS, merge_mp, partition_dim, split_mp
from evo2_hydra.checkpoint.prepare import (
    check_checkpoint,
    prepare_base_checkpoint,
    prepare_shared_base_checkpoint,
)
from evo2_hydra.checkpoint.resize import context_width, resize_module
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.checkpoint.writer import (
    commit_step_dir,
    prune_checkpoints,
    save_module_checkpoint,
    verify_manifest,
    write_manifest,
)

__all__ = [
    "prepare_shared_base_checkpoint",
    "LATEST",
    "PARTITION_DIMS",
    "RUN_CHECKPOINT_SUBDIR",
    "CheckpointLocation",
    "check_checkpoint",
    "commit_step_dir",
    "context_width",
    "load_module_state_dict",
    "load_shards",
    "locate_checkpoint",
    "merge_mp",
    "partition_dim",
    "prepare_base_checkpoint",
    "prune_checkpoints",
    "read_latest",
    "resize_module",
    "safe_load",
    "save_module_checkpoint",
    "split_mp",
    "step_dirs",
    "verify_manifest",
    "write_manifest",
]
