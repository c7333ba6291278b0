"""What every target needs first: the source's kind, its state dict, and the model it belongs to.

The model comes from the checkpoint's saved run config (`configs/config.yaml`, written next to our
checkpoints) when there is one; choosing a different `model=` on the command line is then an error.
Otherwise it comes from the `model` / `ckpt` groups, as in launch.py.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from evo2_hydra.checkpoint.layout import CheckpointLocation, locate_checkpoint
from evo2_hydra.checkpoint.loader import is_vortex_state, load_shards
from evo2_hydra.checkpoint.megatron import detect_megatron
from evo2_hydra.checkpoint.mp import merge_mp, merged_shapes
from evo2_hydra.checkpoint.resize import context_width
from evo2_hydra.checkpoint.run_dir import SavedRun, read_bounded, read_saved_run
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.config import CkptConfig, ConvertConfig, ModelConfig, check_model_ckpt
from evo2_hydra.errors import UserError

log = logging.getLogger("evo2_hydra.convert")


@dataclass
class Source:
    """A conversion source, memory-mapped: its shards, model, checkpoint settings and saved config."""

    location: CheckpointLocation | None  # None for a vortex file
    kind: str  # "savanna" | "zero3" | "vortex"
    shards: list[Mapping[str, Any]]  # one `module` mapping per model-parallel rank
    model: ModelConfig
    ckpt: CkptConfig
    iteration: int
    args: dict[str, Any]
    run_config_yaml: str | None
    path: Path

    def merged(self) -> Mapping[str, Any]:
        """The MP=1 state dict, lazily: each access concatenates that one key's shards."""
        return self.shards[0] if len(self.shards) == 1 else MergedModule(self.shards)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """MP=1 shapes without reading tensor data."""
        per_shard = [s.shapes() if hasattr(s, "shapes") else shapes_of(s) for s in self.shards]
        return merged_shapes(per_shard)

    def describe(self) -> str:
        return (
            self.location.describe() if self.location is not None else f"{self.path} ({self.kind})"
        )


class MergedModule(Mapping):
    """MP shards seen as one MP=1 state dict; a key's shards are concatenated when it is read."""

    def __init__(self, shards: list[Mapping[str, Any]]) -> None:
        self.shards = shards

    def __getitem__(self, key: str) -> Any:
        return merge_mp([{key: s[key]} for s in self.shards])[key]

    def __iter__(self):
        return iter(self.shards[0])

    def __len__(self) -> int:
        return len(self.shards[0])


def megatron_source(conv: ConvertConfig, ck: Any, path: Path) -> Source:
    """A NeMo2 / MBridge checkpoint as a source: imported to savanna, model from its metadata."""
    from evo2_hydra.checkpoint.megatron import import_megatron

    chosen = _cli_model_choice()
    module, model = import_megatron(ck, conv.model, chosen_on_cli=chosen is not None)
    # Its hcm filters are stored at 128 taps (NeMo) or the training width (MBridge): no preset's
    # source context; the preset's MLP width / RoPE scaling come from the checkpoint itself.
    ckpt = dataclasses.replace(conv.ckpt, model=None, source_context=None)
    check_model_ckpt(model, ckpt)
    return Source(None, ck.kind, [module], model, ckpt, max(1, ck.iteration or 1), {}, None, path)


def _cli_overrides() -> dict[str, str] | None:
    """key -> value of the command line's overrides (None outside a Hydra run)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except Exception:
        return None
    return {k.lstrip("+~"): v for k, _, v in (item.partition("=") for item in overrides)}


def _cli_model_choice() -> str | None:
    """`model=X` if the user chose it on the command line (None outside Hydra or when defaulted)."""
    return (_cli_overrides() or {}).get("model")


def context_was_given() -> bool:
    """Whether `ckpt.context` is the user's choice: given on the command line, or the config
    was built outside a Hydra run (a program passing a ConvertConfig means what it passes).
    """
    overrides = _cli_overrides()
    return overrides is None or "ckpt.context" in overrides


def keep_source_context(ckpt: CkptConfig, width: int | None, where: str) -> CkptConfig:
    """`ckpt` with `context` = the source's (its context-dependent tensors' width) unless the user
    chose one: a conversion never resizes on a preset's default (issue #13 item 7).
    """
    if width is None or width == ckpt.context or context_was_given():
        return ckpt
    log.info("%s: keeping the source's context %d (give ckpt.context=N to resize)", where, width)
    return dataclasses.replace(ckpt, context=width)


def saved_model(saved: SavedRun) -> ModelConfig:
    """The model of a saved run config as a validated ModelConfig; refuses another `model=`."""
    model = saved.model()
    chosen = _cli_model_choice()
    if chosen is not None and chosen != model.name:
        raise UserError(
            f"model={chosen} on the command line, but the checkpoint was trained with model={model.name} "
            f"({saved.config_path}); drop model= (the saved config is used)"
        )
    return model


def load_source(conv: ConvertConfig, path: Path) -> Source:
    """Locate and open the source (memory-mapped), and settle the model it belongs to."""
    if (megatron := detect_megatron(path)) is not None:  # NeMo2 / Megatron-Bridge (megatron.py)
        return megatron_source(conv, megatron, path)
    ckpt = dataclasses.replace(conv.ckpt)
    model = dataclasses.replace(conv.model)
    if path.is_file():
        obj = safe_load(path, trust_pickle=conv.ckpt.trust_pickle)
        if isinstance(obj, dict) and is_vortex_state(obj):
            from evo2_hydra.checkpoint.adapters.vortex import (
                vortex_operator_pattern,
                vortex_to_savanna,
            )

            pattern = vortex_operator_pattern(obj)
            if pattern != model.operator_pattern:
                raise UserError(
                    f"source={path} is a vortex file with operator pattern {pattern} ({len(pattern)} "
                    f"layers), but model={model.name} has {model.operator_pattern}; choose the matching model="
                )
            # The synthetic 128-wide filters of an imported vortex file are no preset's source context.
            ckpt.source_context = None
            module = dict(vortex_to_savanna(obj))
            return Source(None, "vortex", [module], model, ckpt, 1, {}, None, path)
        del obj
    location = locate_checkpoint(path)
    if location.is_zero3:  # gathered lazily, tensor by tensor, while the target writes
        from evo2_hydra.checkpoint.zero3 import zero3_modules

        shards: list[Mapping[str, Any]] = list(
            zero3_modules(location, trust_pickle=conv.ckpt.trust_pickle)
        )
        first: Mapping[str, Any] = {}
    else:
        tops = load_shards(location, trust_pickle=conv.ckpt.trust_pickle)
        shards, first = [t["module"] for t in tops], tops[0]
    saved_run = read_saved_run(location)
    run_config = read_bounded(saved_run.config_path) if saved_run is not None else None
    if saved_run is not None:
        model = saved_model(saved_run)
        # The saved model already carries its preset's patches (MLP width, RoPE scaling); the
        # command line's preset no longer applies, only ckpt.context (the resize target) does.
        ckpt = dataclasses.replace(ckpt, model=None, source_context=None)
        check_model_ckpt(model, ckpt)
        log.info("model: %s, from the checkpoint's saved run config", model.name)
    iteration = first.get("iteration", location.iteration)
    iteration = (
        iteration if isinstance(iteration, int) and iteration >= 1 else (location.iteration or 1)
    )
    args = first.get("args") if isinstance(first.get("args"), dict) else {}
    per_shard = [s.shapes() if hasattr(s, "shapes") else shapes_of(s) for s in shards]
    width = context_width(merged_shapes(per_shard), location.describe())
    ckpt = keep_source_context(ckpt, width, location.describe())
    return Source(
        location,
        "zero3" if location.is_zero3 else "savanna",
        shards,
        model,
        ckpt,
        max(1, iteration),
        dict(args),
        run_config,
        path,
    )


def shapes_of(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors in a state dict."""
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, Tensor)}
