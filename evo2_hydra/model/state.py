"""State-dict accounting against savanna's layout: expected shapes, one-line mismatch errors, loading.

Loading is strict: every expected key must be present with its exact shape, except the named
ignore list below. Nothing is ever loaded partially.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from evo2_hydra.config import ModelConfig
from evo2_hydra.errors import UserError
from evo2_hydra.model.layers import HcmOperator
from evo2_hydra.model.model import StripedHyena2, build_model

# TransformerEngine FP8 metadata (`dense_projection._extra_state`, `mlp.w1._extra_state`, ...):
# present in savanna files, meaningless here.
IGNORED_SUFFIXES = ("._extra_state",)
# savanna builds these two norms in every block but never applies them; a checkpoint that lacks
# them (e.g. imported from vortex, which drops them) still loads, and they are set to ones.
OPTIONAL_SUFFIXES = (".post_attention_layernorm.weight", ".outer_mlp_layernorm.weight")
# (hidden_size, num_layers) -> model option, for the "which model is this" hint.
KNOWN_SIZES = {
    (64, 8): "evo2_tiny",
    (1920, 25): "evo2_1b",
    (4096, 32): "evo2_7b",
    (8192, 50): "evo2_40b",
}
CONTEXT_KEYS = ("mixer.mixer.filter.h", "mixer.mixer.filter.decay", "mixer.mixer.filter.t")

Shapes = Mapping[str, tuple[int, ...]]


def is_ignored(key: str) -> bool:
    """Whether a checkpoint key is ignored on load (TransformerEngine extra state)."""
    return key.endswith(IGNORED_SUFFIXES)


def expected_state_dict_shapes(cfg: ModelConfig, context: int) -> dict[str, tuple[int, ...]]:
    """savanna key -> shape for this model at this context (a meta build: allocates nothing)."""
    model = build_model(cfg, context, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _first(items: list[str], limit: int = 3) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _checkpoint_size(shapes: Shapes) -> tuple[int | None, int]:
    """(hidden size, number of blocks) read off a savanna-layout state dict."""
    emb = shapes.get("sequential.0.word_embeddings.weight")
    hidden = emb[1] if emb is not None and len(emb) == 2 else None
    blocks = {
        m.group(1) for k in shapes if (m := re.match(r"sequential\.(\d+)\.input_layernorm\.", k))
    }
    return hidden, len(blocks)


def _likely_cause(
    cfg: ModelConfig, context: int, shapes: Shapes, expected: Shapes, mismatched: list[str]
) -> str:
    """Name the config value that most likely differs between the model and the checkpoint."""
    if shapes and all(
        k.startswith(("blocks.", "embedding_layer.", "unembed.", "norm.")) for k in shapes
    ):
        return "this looks like a vortex (inference) file, not a savanna checkpoint"
    if any(k.startswith("module.") for k in shapes):
        return "keys carry a 'module.' prefix: pass the inner 'module' state dict"
    hidden, blocks = _checkpoint_size(shapes)
    if hidden is not None and (hidden != cfg.hidden_size or blocks != cfg.num_layers):
        guess = KNOWN_SIZES.get((hidden, blocks))
        named = f" (model={guess})" if guess else ""
        return (
            f"model size: the checkpoint has hidden size {hidden} and {blocks} blocks{named}, "
            f"model={cfg.name} has {cfg.hidden_size} and {cfg.num_layers}"
        )
    if any(k.endswith("norm.scale") for k in shapes):
        return "norm naming: the checkpoint uses '.scale' norms (savanna use_fp8_norm=false); expected '.weight'"
    for key in mismatched:
        if key.endswith(CONTEXT_KEYS):
            width = shapes[key][-1]
            return (
                f"context width: the checkpoint's filters are {width} wide, the model was built for "
                f"{context} (ckpt.source_context={width}; resizing to ckpt.context happens on preparation)"
            )
        if key.endswith(("mlp.w1.weight", "mlp.w2.weight")):
            width = shapes[key][0]
            return (
                f"MLP width: the checkpoint has {width}, model.mlp_inner_size={cfg.mlp_inner_size} "
                f"(choose the matching ckpt preset or set model.mlp_inner_size={width})"
            )
    return "the checkpoint was saved with a different architecture (model.operator_pattern, groups, heads)"


def check_state_dict(cfg: ModelConfig, context: int, shapes: Shapes) -> None:
    """Raise one UserError line naming the first missing, unexpected and mismatched keys, or return."""
    expected = expected_state_dict_shapes(cfg, context)
    given = {k: tuple(v) for k, v in shapes.items() if not is_ignored(k)}
    missing = [k for k in expected if k not in given and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in given if k not in expected]
    mismatched = [k for k in expected if k in given and given[k] != expected[k]]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(
            f"missing {len(missing)}: " + _first([f"{k} {_fmt(expected[k])}" for k in missing])
        )
    if unexpected:
        parts.append(
            f"unexpected {len(unexpected)}: "
            + _first([f"{k} {_fmt(given[k])}" for k in unexpected])
        )
    if mismatched:
        parts.append(
            f"shape mismatch {len(mismatched)}: "
            + _first(
                [f"{k} file {_fmt(given[k])} vs model {_fmt(expected[k])}" for k in mismatched]
            )
        )
    cause = _likely_cause(cfg, context, given, expected, mismatched)
    raise UserError(
        f"checkpoint does not fit model={cfg.name} at context {context}: "
        + "; ".join(parts)
        + f". Likely cause: {cause}"
    )


@torch.no_grad()
def load_into_model(
    model: StripedHyena2,
    state_dict: Mapping[str, Tensor],
    cfg: ModelConfig,
    context: int,
    *,
    device: str | torch.device | None = None,
) -> StripedHyena2:
    """Load a savanna-layout state dict strictly; a meta model is materialized first.

    Parameters are copied into the model's dtype (the caller chose the compute dtype); hcm
    operators remember the file's `filter.h` dtype so a float32 model of a bf16 checkpoint still
    forms `h * decay` in bf16 like savanna and vtx. Buffers
    (`decay`, `t`, `inv_freq`) are constants and keep the file's dtype, so a load -> save round
    trip is byte-equal. A meta model is materialized on `device` (default cpu).
    """
    check_state_dict(
        cfg, context, {k: tuple(v.shape) for k, v in state_dict.items() if not is_ignored(k)}
    )
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model.to_empty(device=torch.device(device or "cpu"))
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, HcmOperator):  # keep savanna's bf16 h * decay rounding
            module.source_dtype = state_dict[prefix + "filter.h"].dtype
        for name, param in module.named_parameters(recurse=False):
            source = state_dict.get(prefix + name)
            if source is None:  # an unused norm absent from the file (OPTIONAL_SUFFIXES)
                param.fill_(1.0)
            else:
                param.copy_(source)
        for name in list(module._buffers):
            if name in module._non_persistent_buffers_set or module._buffers[name] is None:
                continue
            target = module._buffers[name]
            module._buffers[name] = state_dict[prefix + name].detach().to(target.device, copy=True)
    return model
