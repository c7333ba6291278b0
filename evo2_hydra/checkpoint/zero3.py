"""Gather DeepSpeed ZeRO-3 shards into full (ZeRO-1 style) model-parallel state dicts.

A ZeRO-3 `global_stepN/` holds, per data-parallel rank d and model-parallel rank m,
`zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt` (buffers, placeholders for parameters, the
parameter shapes per optimizer group) and `[bf16_]zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt`
(`fp32_flat_groups`: this rank's slice of every parameter, fp32 master weights). Rebuilding follows
the protocol of DeepSpeed's `zero_to_fp32` for stage 3 (savanna
`tools/40b/zero3/zero3_conversion_lib.py`): parameters in group order; each contributes `ceil(numel
/ dp)` elements to every rank's flat group; the full parameter is the concatenation of the ranks'
pieces cut to `numel`. Buffers become float32 (as DeepSpeed's consolidation does); TransformerEngine
extra states come from data-parallel rank 0.

Everything is memory-mapped and produced one parameter at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evo2_hydra.checkpoint.layout import CheckpointLocation
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.errors import UserError

OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _optim_files(step_dir: Path, mp_rank: int) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for f in step_dir.iterdir():
        m = OPTIM_RE.match(f.name)
        if m and int(m.group(2)) == mp_rank:
            found[int(m.group(1))] = f
    return found


def _check_ranks(what: str, ranks: list[int], expected: int, where: Path, mp_rank: int) -> None:
    missing = sorted(set(range(expected)) - set(ranks))
    if missing or len(ranks) != expected:
        raise UserError(
            f"{where}: ZeRO-3 checkpoint is incomplete: {what} for data-parallel rank(s) "
            f"{missing or sorted(ranks)} of MP rank {mp_rank:02d} missing (expected {expected} ranks, "
            f"found {len(ranks)})"
        )


class Zero3Rank:
    """The files of one model-parallel rank, checked for completeness before anything is read."""

    def __init__(self, location: CheckpointLocation, mp_rank: int, *, trust_pickle: bool = False):
        step_dir = location.step_dir
        if step_dir is None:
            raise UserError(f"{location.source}: a ZeRO-3 checkpoint must be a global_stepN folder")
        model_files = location.zero3_files.get(mp_rank, [])
        self.model = safe_load(model_files[0], trust_pickle=trust_pickle) if model_files else None
        if self.model is None or "buffer_names" not in self.model:
            raise UserError(
                f"{step_dir}: zero_pp_rank_0_mp_rank_{mp_rank:02d}_model_states.pt missing or not ZeRO-3"
            )
        dp = int(self.model.get("dp_world_size") or len(model_files))
        model_ranks = [
            int(re.match(r"zero_pp_rank_(\d+)_", f.name).group(1))
            for f in model_files  # type: ignore[union-attr]
        ]
        _check_ranks("model states", model_ranks, dp, step_dir, mp_rank)
        optim = _optim_files(step_dir, mp_rank)
        _check_ranks("optimizer states (fp32 weights)", list(optim), dp, step_dir, mp_rank)
        self.dp = dp
        self.flat_groups: list[list[Tensor]] = []  # [dp rank][group]
        for d in range(dp):
            state = safe_load(optim[d], trust_pickle=trust_pickle)["optimizer_state_dict"]
            if int(getattr(state["zero_stage"], "value", state["zero_stage"])) != 3:
                raise UserError(f"{optim[d]}: zero_stage {state['zero_stage']}, expected 3")
            count = state["partition_count"]
            count = max(count) if isinstance(count, list) else count
            if count != dp:
                raise UserError(f"{optim[d]}: partition_count {count} but {dp} data-parallel ranks")
            self.flat_groups.append(list(state["fp32_flat_groups"]))
        shapes = self.model["param_shapes"]
        self.param_shapes: list[dict[str, torch.Size]] = (
            list(shapes) if isinstance(shapes, list) else [shapes]
        )
        if len(self.param_shapes) != len(self.flat_groups[0]):
            raise UserError(
                f"{step_dir}: {len(self.param_shapes)} parameter groups in the model states but "
                f"{len(self.flat_groups[0])} fp32 flat groups in the optimizer states"
            )
        self.frozen_files = model_files
        self._check_sizes(step_dir)

    def _check_sizes(self, where: Path) -> None:
        for g, shapes in enumerate(self.param_shapes):
            need = sum(math.ceil(math.prod(s) / self.dp) for s in shapes.values())
            for d in range(self.dp):
                have = self.flat_groups[d][g].numel()
                if have != need:
                    raise UserError(
                        f"{where}: fp32 group {g} of data-parallel rank {d} has {have} elements, the "
                        f"parameter shapes need {need} (truncated or mismatched shard)"
                    )

    def parameter_index(self) -> dict[str, tuple[int, int, torch.Size]]:
        """name -> (group, offset in every rank's flat group, shape)."""
        index = {}
        for g, shapes in enumerate(self.param_shapes):
            offset = 0
            for name, shape in shapes.items():
                index[name] = (g, offset, torch.Size(shape))
                offset += math.ceil(math.prod(shape) / self.dp)
        return index

    def parameter(self, group: int, offset: int, shape: torch.Size) -> Tensor:
        """One full fp32 parameter: every rank's `ceil(numel/dp)` piece, concatenated, cut to numel."""
        numel = math.prod(shape)
        part = math.ceil(numel / self.dp)
        pieces = [self.flat_groups[d][group].narrow(0, offset, part) for d in range(self.dp)]
        return torch.cat(pieces)[:numel].view(shape)

    def frozen(self) -> Iterator[tuple[str, Tensor]]:
        shapes = self.model.get("frozen_param_shapes") or {}
        if not shapes:
            return
        fragments = [safe_load(f)["frozen_param_fragments"] for f in self.frozen_files]
        for name, shape in shapes.items():
            numel = math.prod(shape)
            yield (
                name,
                torch.cat([frag[name].reshape(-1) for frag in fragments])[:numel].view(shape),
            )


class Zero3Module(Mapping):
    """The full state dict of one MP rank as a lazy mapping: each access gathers one tensor."""

    def __init__(
        self, location: CheckpointLocation, mp_rank: int = 0, *, trust_pickle: bool = False
    ):
        self.rank = Zero3Rank(location, mp_rank, trust_pickle=trust_pickle)
        self._module: dict[str, Any] = self.rank.model["module"]
        self._buffers = set(self.rank.model["buffer_names"])
        self._index = self.rank.parameter_index()
        self._frozen = dict(self.rank.frozen())  # rare and small (none in Evo 2)
        self._shared = dict(self.rank.model.get("shared_params") or {})  # alias -> source
        extra = [n for n in [*self._index, *self._frozen, *self._shared] if n not in self._module]
        self._names = list(self._module) + extra

    def __getitem__(self, name: str) -> Any:
        if (
            name not in self._module
            and name not in self._index
            and name not in self._frozen
            and name not in self._shared
        ):
            raise KeyError(name)
        name = self._shared.get(name, name)
        if name in self._index:
            return self.rank.parameter(*self._index[name])
        if name in self._frozen:
            return self._frozen[name]
        if name in self._buffers:
            return self._module[name].float()
        return self._module[name]  # TransformerEngine extra state and other non-parameters

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Full shapes without gathering anything."""
        out = {}
        for name in self._names:
            source = self._shared.get(name, name)
            if source in self._index:
                out[name] = tuple(self._index[source][2])
            elif source in self._frozen:
                out[name] = tuple(self._frozen[source].shape)
            elif isinstance(self._module.get(source), Tensor):
                out[name] = tuple(self._module[source].shape)
        return out

    def __len__(self) -> int:
        return len(self._names)

    @property
    def dp(self) -> int:
        return self.rank.dp


def zero3_modules(location: CheckpointLocation, *, trust_pickle: bool = False) -> list[Zero3Module]:
    """One lazy full state dict per model-parallel rank (all ranks checked up front)."""
    return [
        Zero3Module(location, mp_rank, trust_pickle=trust_pickle)
        for mp_rank in sorted(location.zero3_files)
    ]


def gather_zero3_module(
    location: CheckpointLocation, *, trust_pickle: bool = False
) -> list[dict[str, Any]]:
    """Full fp32 state dicts, one per model-parallel rank (checkpoint/loader.py calls this)."""
    return [dict(m) for m in zero3_modules(location, trust_pickle=trust_pickle)]
