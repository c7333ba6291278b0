"""What defines a finetune run: the settings that may not change when it continues, the folder
name derived from them, and which overrides `resume=RUN_DIR` accepts.

A run folder is named `<model>-<data>-<hash>`: the hash covers every identity setting, so the
same command finds (and continues) its own folder while a run with other data or settings gets a
new one. Imports nothing from the rest of the package (config.py registers the resolver).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

IDENTITY_SECTIONS = ("model", "ckpt", "data", "train", "peft", "seed")
# Settings that may change between a run and its continuation (schedule length, cadence, where
# it runs); anything else differing means the folder belongs to another run.
RESUMABLE_CHANGES = frozenset(
    {
        "train.steps",
        "train.save_every",
        "train.keep_last",
        "train.eval_every",
        "train.eval_steps",
        "train.log_every",
        "train.resume",
    }
)
# Where or how fast inputs are read, not what they are: never part of a run's identity.
NOT_IDENTITY = frozenset({"data.cache_dir", "data.workers", "data.output_prefix"})
# Whole groups a continuation may change: where and how the processes run.
RESUMABLE_PREFIXES = ("cluster.", "hydra.", "hydra/")
# Root keys `resume=RUN_DIR` accepts besides the ones above.
RESUME_ROOT_KEYS = frozenset({"resume", "dry_run", "cluster", "task"})


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def identity(tree: dict) -> dict[str, Any]:
    """The flattened identity settings of a config tree (plain dict)."""
    out: dict[str, Any] = {}
    for section in IDENTITY_SECTIONS:
        for key, value in flatten(tree.get(section), section).items():
            if key not in RESUMABLE_CHANGES and key not in NOT_IDENTITY:
                out[key] = value
    return out


def may_change_on_resume(key: str) -> bool:
    """Whether an override may change when a run resumes (steps, cadences, cluster)."""
    return (
        key in RESUMABLE_CHANGES
        or key.startswith(RESUMABLE_PREFIXES)
        or key.lstrip("+~") in RESUME_ROOT_KEYS
    )


def _data_name(data: dict) -> str:
    """`train` for examples/data/train.jsonl, the prefix's name for BIN/IDX data."""
    value = data.get("input") if isinstance(data, dict) else None
    if isinstance(value, str):
        value = [p for p in value.split(",") if p]
    if not value:
        return "nodata"
    name = Path(str(value[0])).name
    for suffix in (".gz", ".jsonl", ".json", ".bin", ".idx"):
        name = name.removesuffix(suffix)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return (safe or "data")[:40]


def run_name(tree: dict) -> str:
    """`<model>-<data>-<8 hex digits of the identity settings>`."""
    digest = hashlib.sha256(
        json.dumps(identity(tree), sort_keys=True, default=str).encode()
    ).hexdigest()[:8]
    model = (
        tree.get("model", {}).get("name", "model")
        if isinstance(tree.get("model"), dict)
        else "model"
    )
    return f"{model}-{_data_name(tree.get('data') or {})}-{digest}"


def run_name_resolver(*, _root_: Any) -> str:
    """`${evo2_run_name:}`: the default run_name, computed from the composed config."""
    from omegaconf import OmegaConf

    tree = {
        key: OmegaConf.to_container(_root_[key], resolve=True, enum_to_str=True)
        if OmegaConf.is_config(_root_[key])
        else _root_[key]
        for key in IDENTITY_SECTIONS
        if key in _root_
    }
    return run_name(tree)
