"""Read the model states of a located checkpoint: memory-mapped shards, MP merge, format hooks.

Vortex (inference) files and ZeRO-3 shards are recognised here and handed to the importers of the
conversion package when present (`evo2_hydra.convert.vortex.import_vortex_state_dict`,
`evo2_hydra.convert.zero3.gather_zero3_module`); otherwise the error says what the file is.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import Tensor

from evo2_hydra.checkpoint.layout import CheckpointLocation, locate_checkpoint
from evo2_hydra.checkpoint.mp import merge_mp
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.errors import UserError
from evo2_hydra.peft.merge import LORA_RECORD, lora_module, read_lora_record

VORTEX_IMPORTER = ("evo2_hydra.convert.vortex", "import_vortex_state_dict")
ZERO3_GATHERER = ("evo2_hydra.convert.zero3", "gather_zero3_module")
VORTEX_MARKERS = ("blocks.", "embedding_layer.", "unembed.", "norm.scale")
IMPORTED_FROM = (
    "evo2_hydra_imported_from"  # top-level marker on shards converted from another format
)


def _hook(target: tuple[str, str]):
    try:
        module = importlib.import_module(target[0])
    except ModuleNotFoundError as err:
        if err.name and target[0].startswith(err.name):
            return None
        raise
    return getattr(module, target[1], None)


def is_vortex_state(state: dict) -> bool:
    keys = [k for k in state if isinstance(k, str)]
    return bool(keys) and "module" not in state and all(k.startswith(VORTEX_MARKERS) for k in keys)


def normalize_top_level(obj: Any, path: Path) -> dict[str, Any]:
    """The top-level dict of a model-state file, with the savanna state dict under `module`."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict of model states, found a {type(obj).__name__}")
    if "module" in obj:
        if not isinstance(obj["module"], dict):
            raise UserError(
                f"{path}: 'module' is a {type(obj['module']).__name__}, expected a state dict"
            )
        return obj
    if is_vortex_state(obj):
        importer = _hook(VORTEX_IMPORTER)
        if importer is None:
            raise UserError(
                f"{path}: this is a vortex (inference) checkpoint (keys blocks.*, embedding_layer.weight), "
                "not a savanna one; the vortex importer (evo2_hydra.convert.vortex) is not available"
            )
        # Marked: a vortex file stores 128 hcm taps, so its width says nothing about the source context.
        return {"module": importer(obj, path), IMPORTED_FROM: "vortex"}
    if any(isinstance(k, str) and k.startswith("sequential.") for k in obj):
        return {"module": obj}  # a bare savanna state dict
    first = ", ".join(sorted(str(k) for k in obj)[:4])
    raise UserError(
        f"{path}: no 'module' key and no savanna keys (found {first}); not a savanna checkpoint"
    )


def load_shards(
    location: CheckpointLocation, *, trust_pickle: bool = False
) -> list[dict[str, Any]]:
    """Top-level dicts of every MP rank's model-state file, memory-mapped (tensors read on use)."""
    if location.is_zero3:
        gather = _hook(ZERO3_GATHERER)
        if gather is None:
            raise UserError(
                f"{location.describe()}: a ZeRO-3 checkpoint (zero_pp_rank_* files); gather it to "
                "model-parallel files first with convert.py target=savanna (ZeRO-3 support: evo2_hydra.convert.zero3)"
            )
        modules = gather(location, trust_pickle=trust_pickle)
        tops = [{"module": m, "iteration": location.iteration} for m in modules]
        record = read_lora_record(location)
        if record is not None:
            tops = [{**t, LORA_RECORD: record} for t in tops]
    else:
        tops = [
            normalize_top_level(safe_load(f, trust_pickle=trust_pickle), f)
            for f in location.model_files
        ]
    if LORA_RECORD in tops[0]:  # adapters only: merge them into the base they name
        where = location.describe()
        return [lora_module(t, where, trust_pickle=trust_pickle) for t in tops]
    return tops


def shard_shapes(shards: list[dict[str, Any]]) -> list[dict[str, tuple[int, ...]]]:
    return [
        {k: tuple(v.shape) for k, v in s["module"].items() if isinstance(v, Tensor)} for s in shards
    ]


def checkpoint_metadata(location: CheckpointLocation, first: dict[str, Any]) -> dict[str, Any]:
    """iteration, args, the saved run config (our checkpoints) and where it came from."""
    run_config = None
    if location.step_dir is not None and (location.step_dir / "configs" / "config.yaml").is_file():
        run_config = (location.step_dir / "configs" / "config.yaml").read_text()
    iteration = first.get("iteration", location.iteration)
    return {
        "iteration": iteration if isinstance(iteration, int) else location.iteration,
        "args": first.get("args"),
        "run_config": run_config,
        "mp": location.mp,
        "location": location,
    }


def load_module_state_dict(
    path: str | Path, *, trust_pickle: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full MP=1 savanna `module` state dict (shards merged) and metadata, from any layout.

    With one MP rank the tensors stay memory-mapped; merging MP shards materialises them.
    """
    location = locate_checkpoint(path)
    shards = load_shards(location, trust_pickle=trust_pickle)
    module = merge_mp([s["module"] for s in shards])
    return module, checkpoint_metadata(location, shards[0])
