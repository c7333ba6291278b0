"""`verify=true`: run one fixed probe sequence through the source and the converted result.

Both sides run in our model (float32), the result after re-importing it into the savanna layout;
the largest absolute logit difference is logged and written to the manifest. The default
(`verify` unset) verifies when two float32 copies of the model fit in the available memory.

Rounding convention: a vortex file stores the hcm filter as the product `h * decay` formed in the
checkpoint's dtype (bf16), as savanna forms it in training. The source side is therefore run with
that same product (rounded to the checkpoint dtype) and a unit decay, so the comparison measures
the conversion, not the bf16 rounding of a product (docs/model.md, "bf16 hcm rounding").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import psutil
import torch
from torch import Tensor

from evo2_hydra.checkpoint.resize import context_width
from evo2_hydra.config import ModelConfig

log = logging.getLogger("evo2_hydra.convert")

# A fixed DNA probe: upper- and lower-case bases, 91 tokens.
PROBE = (
    "ATGACCGCTAGCTTAGGCTAACGGTACCGATCGATTGCAAGCTTGGCACTGGCCGTCGTTTTACaacgtcgtgactgggaaaaccctggcg"
)


def probe_ids(length: int | None = None) -> Tensor:
    """The fixed DNA probe as token ids [1, L] (its first `length` tokens when given)."""
    ids = torch.tensor(list(PROBE.encode()), dtype=torch.long)
    return ids[:length].unsqueeze(0) if length else ids.unsqueeze(0)


def model_bytes(cfg: ModelConfig) -> int:
    """float32 bytes of the model's parameters at a small context (the filters barely count)."""
    from evo2_hydra.model import expected_state_dict_shapes

    return 4 * sum(math.prod(s) for s in expected_state_dict_shapes(cfg, 256).values())


def should_verify(requested: bool | None, cfg: ModelConfig) -> bool:
    """Whether to verify: as requested, else when two float32 copies fit in available memory."""
    if requested is not None:
        return requested
    need = 2 * model_bytes(cfg)
    fits = need < 0.6 * psutil.virtual_memory().available
    if not fits:
        log.info(
            "verify: skipped (two float32 copies of %s need %.1f GB); set verify=true to force",
            cfg.name,
            need / 1e9,
        )
    return fits


def with_hcm_product(state: Mapping[str, Any], taps: int) -> dict[str, Any]:
    """The same model with hcm `h := (h * decay)[:, :taps]` in the weights' dtype and decay = 1."""
    out = dict(state)
    for key, h in state.items():
        if key.endswith("mixer.mixer.filter.h"):
            decay_key = key[: -len("h")] + "decay"
            decay = state[decay_key]
            n = min(taps, h.shape[-1])
            product = torch.zeros_like(h)
            product[:, :n] = h[:, :n] * decay[:, :n].to(h.dtype)
            out[key] = product
            out[decay_key] = torch.ones_like(decay)
    return out


@torch.no_grad()
def probe_logits(state: Mapping[str, Any], cfg: ModelConfig, ids: Tensor) -> Tensor:
    """float32 logits of the probe through our model loaded with `state`."""
    from evo2_hydra.model import build_model, load_into_model

    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, Tensor)}
    context = context_width(shapes, "verify") or ids.shape[1]
    model = load_into_model(build_model(cfg, context), state, cfg, context)
    return model(ids).float()


def max_logit_difference(
    source: Mapping[str, Any],
    result: Mapping[str, Any],
    cfg: ModelConfig,
    *,
    fold_hcm: bool = False,
) -> float:
    """max |logits(source) - logits(result)| on the fixed probe, both in float32."""
    ids = probe_ids()
    if fold_hcm:
        source = with_hcm_product(source, cfg.hcm_filter_len)
    reference = probe_logits(source, cfg, ids)
    converted = probe_logits(result, cfg, ids)
    diff = (reference - converted).abs().max().item()
    log.info("verify: largest |logit difference| on the %d-token probe = %.3g", ids.shape[1], diff)
    return diff
