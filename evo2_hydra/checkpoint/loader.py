"""Read the model states of a located checkpoint: memory-mapped shards, MP merge, other layouts.

Vortex (inference) files are imported through the vortex adapter (`adapters/vortex.py`) and
ZeRO-3 shards gathered by `zero3.py`, both in this package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from evo2_hydra.checkpoint.adapters import IMPORTED_FROM
from evo2_hydra.checkpoint.adapters.vortex import import_vortex_state_dict
from evo2_hydra.checkpoint.integrity import check_module, expected_tensors
from evo2_hydra.checkpoint.layout import CheckpointLocation, locate_checkpoint
from evo2_hydra.checkpoint.mp import merge_mp
from evo2_hydra.checkpoint.run_dir import STEP_CONFIG, read_bounded
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.checkpoint.zero3 import gather_zero3_module
from evo2_hydra.errors import UserError
from evo2_hydra.peft.merge import LORA_RECORD, check_base, merge_lora, read_lora_record

VORTEX_MARKERS = ("blocks.", "embedding_layer.", "unembed.", "norm.scale")


def is_vortex_state(state: dict) -> bool:
    """Whether a loaded state dict is a vortex file (flat `blocks.*` keys, no `module`)."""
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
        # Marked: a vortex file stores 128 hcm taps, so its width says nothing about the source context.
        return {"module": import_vortex_state_dict(obj, path), IMPORTED_FROM: "vortex"}
    if any(isinstance(k, str) and k.startswith("sequential.") for k in obj):
        return {"module": obj}  # a bare savanna state dict
    first = ", ".join(sorted(str(k) for k in obj)[:4])
    raise UserError(
        f"{path}: no 'module' key and no savanna keys (found {first}); not a savanna checkpoint"
    )


def load_shards(
    location: CheckpointLocation, *, trust_pickle: bool = False, finite: bool = False
) -> list[dict[str, Any]]:
    """Top-level dicts of every MP rank's model-state file, memory-mapped, verified.

    The one load path for model weights: each file goes through the safe loader, its `module`
    through `integrity.check_module` (keys, dtypes, and against the step's manifest CRC32s when
    we wrote it; with `finite`, no NaN/Inf). Verifying reads every tensor once (zlib-ng CRC32).
    """
    if location.kind == "megatron":  # a NeMo2 / Megatron-Bridge folder, imported (megatron.py)
        from evo2_hydra.checkpoint.megatron import megatron_top_level

        top = megatron_top_level(location.source)
        check_module(top["module"], location.describe(), finite=finite)
        return [top]
    if location.is_zero3:
        modules = gather_zero3_module(location, trust_pickle=trust_pickle)
        for m in modules:
            check_module(m, location.describe(), finite=finite)
        tops = [{"module": m, "iteration": location.iteration} for m in modules]
        record = read_lora_record(location)
        if record is not None:
            tops = [{**t, LORA_RECORD: record} for t in tops]
    else:
        tops = []
        for f in location.model_files:
            top = normalize_top_level(safe_load(f, trust_pickle=trust_pickle), f)
            # A vortex file converted on load has no manifest of its savanna form.
            expected = None if IMPORTED_FROM in top else expected_tensors(f)
            check_module(top["module"], f, expected=expected, finite=finite)
            tops.append(top)
    if LORA_RECORD in tops[0]:  # adapters only: merge them into the base they name
        where = location.describe()
        return [lora_module(t, where, trust_pickle=trust_pickle) for t in tops]
    return tops


def lora_module(top: dict[str, Any], where: str, *, trust_pickle: bool = False) -> dict[str, Any]:
    """A LoRA checkpoint's top-level dict -> the same dict with the merged full `module`.

    The base it names (path + content hash, checked) is loaded through this same verified path;
    the adapters are merged lazily, one tensor per read (peft/merge.py).
    """
    record = top[LORA_RECORD]
    base_dir = check_base(record, where)
    base, _meta = load_module_state_dict(base_dir, trust_pickle=trust_pickle)
    merged = merge_lora(base, top["module"], float(record["scaling"]))
    return {**top, "module": merged}


def shard_shapes(shards: list[dict[str, Any]]) -> list[dict[str, tuple[int, ...]]]:
    """Tensor shapes of each model-parallel shard's `module`."""
    return [
        {k: tuple(v.shape) for k, v in s["module"].items() if isinstance(v, Tensor)} for s in shards
    ]


def checkpoint_metadata(location: CheckpointLocation, first: dict[str, Any]) -> dict[str, Any]:
    """iteration, args, the saved run config (our checkpoints) and where it came from."""
    step_config = location.step_dir / STEP_CONFIG if location.step_dir is not None else None
    run_config = read_bounded(step_config) if step_config and step_config.exists() else None
    iteration = first.get("iteration", location.iteration)
    return {
        "iteration": iteration if isinstance(iteration, int) else location.iteration,
        "args": first.get("args"),
        "run_config": run_config,  # the step's configs/config.yaml text (use read_saved_run)
        "mp": location.mp,
        "location": location,
    }


def load_module_state_dict(
    path: str | Path, *, trust_pickle: bool = False, finite: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full MP=1 savanna `module` state dict (shards merged) and metadata, from any layout.

    Verified as `load_shards` says (`finite=True` for inference). With one MP rank the tensors
    stay memory-mapped; merging MP shards materialises them.
    """
    location = locate_checkpoint(path)
    shards = load_shards(location, trust_pickle=trust_pickle, finite=finite)
    module = merge_mp([s["module"] for s in shards])
    return module, checkpoint_metadata(location, shards[0])
