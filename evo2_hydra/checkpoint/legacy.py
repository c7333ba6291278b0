"""Edits for older savanna layouts: non-interleaved projections, unpadded MLP widths.

- Legacy projections (savanna.md §1.5, `interleave_projections: false`): the 3D rows of a Hyena
  layer's `dense_projection.weight` and `hyena_proj_conv.short_conv_weight` are [x1 | x2 | v] blocks
  per MP rank; the released layout interleaves them (row 3i+p = stream p of channel i). Converted on
  request only (`ckpt.interleave_legacy`): the two layouts have the same shapes, so it cannot be
  detected from the file.
- MLP padding (§1.10): the 1M releases pad F to 11264 / 22528 with zero rows of w1/w2 and zero
  columns of w3, which stay inert. A narrower file is zero-padded on request (`ckpt.pad_mlp`).
"""

from __future__ import annotations

from collections.abc import Mapping

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


def interleave_legacy_projections(module: Mapping[str, object]) -> dict[str, object]:
    """Interleave the featurizer rows of every Hyena layer (attention layers are left alone)."""
    out = dict(module)
    for key in module:
        if not key.endswith(HYENA_CONV_SUFFIX):
            continue
        prefix = key[: -len(HYENA_CONV_SUFFIX)]
        for name in (key, prefix + PROJECTION_SUFFIX):
            out[name] = interleave_rows(module[name])  # type: ignore[arg-type]
    return out


def mlp_width(module: Mapping[str, object]) -> tuple[str, int] | None:
    """(key, F) of the first MLP w1 in the module, or None."""
    for key, value in module.items():
        if key.endswith(MLP_W1) and isinstance(value, Tensor | torch.Size | tuple):
            shape = value.shape if isinstance(value, Tensor) else value
            return key, int(shape[0])
    return None


def pad_mlp(module: Mapping[str, object], width: int) -> dict[str, object]:
    """Zero-pad every MLP to inner width `width` (w1/w2 rows, w3 columns), as savanna's 1M releases."""
    out = dict(module)
    for key, value in module.items():
        if not isinstance(value, Tensor):
            continue
        if key.endswith((MLP_W1, MLP_W2)) and value.shape[0] < width:
            padded = value.new_zeros((width, value.shape[1]))
            padded[: value.shape[0]] = value
            out[key] = padded
        elif key.endswith(MLP_W3) and value.shape[1] < width:
            padded = value.new_zeros((value.shape[0], width))
            padded[:, : value.shape[1]] = value
            out[key] = padded
    return out
