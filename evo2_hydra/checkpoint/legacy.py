"""Edits for older savanna layouts: non-interleaved projections, unpadded MLP widths.

- Legacy projections (savanna `savanna/model/block.py`, `interleave_projections: false`): the 3D
  rows of a Hyena layer's `dense_projection.weight` and `hyena_proj_conv.short_conv_weight` are [x1
  | x2 | v] blocks per MP rank; the released layout interleaves them (row 3i+p = stream p of channel
  i). Converted on request only (`ckpt.interleave_legacy`): the two layouts have the same shapes, so
  it cannot be detected from the file.
- MLP padding (savanna `pad_mlp_weights`): the 1M releases pad F to 11264 / 22528 with zero rows of
  w1/w2 and zero columns of w3, which stay inert. A narrower file is zero-padded on request
  (`ckpt.pad_mlp`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

HYENA_CONV_SUFFIX = "mixer.hyena_proj_conv.short_conv_weight"
PROJECTION_SUFFIX = "mixer.dense_projection.weight"
MLP_W1, MLP_W2, MLP_W3 = "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight"


def interleave_rows(tensor: Tensor) -> Tensor:
    """[x1 | x2 | v] row blocks -> interleaved rows: new[3i + p] = old[p * D + i]."""
    rows = tensor.shape[0]
    if rows % 3:
        raise ValueError(f"{rows} rows are not three streams")
    d = rows // 3
    return tensor.reshape(3, d, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape).clone()


def legacy_projection_keys(keys: Iterable[str]) -> frozenset[str]:
    """Featurizer conv and projection keys of every Hyena layer (attention layers have no conv)."""
    prefixes = [k[: -len(HYENA_CONV_SUFFIX)] for k in keys if k.endswith(HYENA_CONV_SUFFIX)]
    return frozenset(
        [p + HYENA_CONV_SUFFIX for p in prefixes] + [p + PROJECTION_SUFFIX for p in prefixes]
    )


def interleave_legacy_projections(module: Mapping[str, object]) -> dict[str, object]:
    """Interleave the featurizer rows of every Hyena layer of an MP=1 state dict."""
    legacy = legacy_projection_keys(module)
    return {k: interleave_rows(v) if k in legacy else v for k, v in module.items()}  # type: ignore[arg-type]


def mlp_width(module: Mapping[str, object]) -> tuple[str, int] | None:
    """(key, F) of the first MLP w1 in the module, or None."""
    for key, value in module.items():
        if key.endswith(MLP_W1) and isinstance(value, Tensor | torch.Size | tuple):
            shape = value.shape if isinstance(value, Tensor) else value
            return key, int(shape[0])
    return None


def padded_mlp_shape(key: str, shape: Sequence[int], width: int | None) -> tuple[int, ...]:
    """The shape of `key` with the MLP zero-padded to inner width `width` (w1/w2 rows, w3 columns)."""
    shape = tuple(shape)
    if width is None:
        return shape
    if key.endswith((MLP_W1, MLP_W2)):
        return (max(width, shape[0]), *shape[1:])
    if key.endswith(MLP_W3):
        return (shape[0], max(width, shape[1]))
    return shape


def pad_mlp_tensor(key: str, value: Tensor, width: int | None) -> Tensor:
    """`value` zero-padded to `padded_mlp_shape` (itself when nothing changes), as the 1M releases."""
    shape = padded_mlp_shape(key, value.shape, width)
    if shape == tuple(value.shape):
        return value
    out = value.new_zeros(shape)
    out[: value.shape[0], : value.shape[1]] = value
    return out
