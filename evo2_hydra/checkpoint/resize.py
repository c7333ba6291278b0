"""Resize the context-dependent tensors of a savanna state dict (savanna
`tools/7b/conversion/extend_filter.py`), lazily.

Exactly what `extend_filter.py` does, for shrinking and extending and any MP shard: every hcm
`filter.h` and `filter.decay` becomes [G, N] holding the first min(source, 128) columns and zeros
after them (only those columns are ever used), every hcl `filter.t` becomes float32 arange(N) as
[1, 1, N]. The group count G comes from each tensor. Everything else passes through untouched, so
with a memory-mapped source the only new memory is the resized tensors themselves; and those that
are large (extending to long contexts) live in sparse scratch files, not in anonymous memory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from evo2_hydra.errors import UserError

HCM_SUFFIXES = ("mixer.mixer.filter.h", "mixer.mixer.filter.decay")
HCL_T_SUFFIX = "mixer.mixer.filter.t"
CONTEXT_SUFFIXES = (*HCM_SUFFIXES, HCL_T_SUFFIX)
# hcm filters are 128 taps long (savanna hyena_mr_len); columns beyond never matter.
HCM_USED_COLUMNS = 128
# Resized tensors larger than this are backed by a sparse scratch file instead of anonymous memory.
SCRATCH_THRESHOLD_BYTES = 64 << 20


def is_context_key(key: str) -> bool:
    """Whether a key is a context-dependent tensor (hcm filter.h / filter.decay, hcl filter.t)."""
    return key.endswith(CONTEXT_SUFFIXES)


def context_width(shapes: Mapping[str, tuple[int, ...]], where: str) -> int | None:
    """The common last-dim width of the context-dependent tensors (None if the model has none).

    Raises:
        UserError: the widths disagree (naming `where` and two keys).
    """
    widths = {k: s[-1] for k, s in shapes.items() if is_context_key(k)}
    if not widths:
        return None
    values = set(widths.values())
    if len(values) > 1:
        a, b = sorted(widths.items(), key=lambda kv: kv[1])[:: len(widths) - 1]
        raise UserError(
            f"{where}: context-dependent tensors disagree: {a[0]} is {a[1]} wide, {b[0]} is {b[1]}"
        )
    return values.pop()


class ScratchAllocator:
    """Zero tensors; big ones are mapped from sparse files in `folder` (same filesystem as the output).

    Pages of a MAP_SHARED file mapping are file-backed: the kernel can write them out and drop them,
    so extending [256, 8192] filters to [256, 1048576] does not need the 9.7 GB in RAM. Files are
    unlinked right after mapping; the space is freed when the tensors are.
    """

    def __init__(self, folder: str | Path | None, threshold: int = SCRATCH_THRESHOLD_BYTES):
        self.folder = Path(folder) if folder is not None else None
        self.threshold = threshold

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if self.folder is None or nbytes < self.threshold:
            return torch.zeros(shape, dtype=dtype)
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".scratch-", dir=self.folder)
        try:
            os.ftruncate(fd, nbytes)  # sparse: reads as zeros, takes no disk until written
            os.close(fd)
            tensor = torch.from_file(name, shared=True, size=numel, dtype=dtype).view(shape)
        finally:
            os.unlink(name)
        return tensor


def resize_hcm_tensor(
    tensor: Tensor, context: int, allocator: ScratchAllocator | None = None
) -> Tensor:
    """[G, L] -> [G, context]: the first min(L, 128, context) columns kept, the rest zero."""
    groups, width = tensor.shape
    out = (allocator or ScratchAllocator(None)).zeros((groups, context), tensor.dtype)
    keep = min(width, HCM_USED_COLUMNS, context)
    out[:, :keep] = tensor[:, :keep]
    return out


def filter_t(context: int) -> Tensor:
    """The hcl time buffer for `context`: float32 arange as [1, 1, context]."""
    return torch.arange(context, dtype=torch.float32).view(1, 1, context)


def resize_tensor(
    key: str,
    value: Tensor,
    context: int | None,
    allocator: ScratchAllocator | None = None,
    *,
    same_width: bool = False,
) -> Tensor:
    """`value` at width `context` if `key` is context-dependent and its width differs, else itself
    (a same-width source keeps its bytes; a non-float32 `filter.t` is rebuilt as savanna does).

    `same_width=True` rebuilds same-width tensors too (hcm columns past the used taps zeroed), so
    the result does not depend on what a source keeps in columns the model never reads.
    """
    if context is None or not key.endswith(CONTEXT_SUFFIXES):
        return value
    if key.endswith(HCM_SUFFIXES):
        if value.dim() != 2:
            raise UserError(
                f"{key}: expected a 2-D [groups, length] tensor, got {tuple(value.shape)}"
            )
        if value.shape[-1] == context and not same_width:
            return value
        return resize_hcm_tensor(value, context, allocator)
    if value.dim() != 3 or value.shape[:2] != (1, 1):
        raise UserError(f"{key}: expected a [1, 1, length] tensor, got {tuple(value.shape)}")
    if value.shape[-1] == context and value.dtype == torch.float32 and not same_width:
        return value
    return filter_t(context)


def resize_module(
    module: Mapping[str, object], context: int, allocator: ScratchAllocator | None = None
) -> dict[str, object]:
    """A new state dict with every context-dependent tensor at width `context` (others shared)."""
    return {
        k: resize_tensor(k, v, context, allocator, same_width=True) if isinstance(v, Tensor) else v
        for k, v in module.items()
    }
