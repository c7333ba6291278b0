"""savanna <-> vortex (the single `.pt` that evo2 / vtx load for inference), tensor by tensor.

Export (vortex `vortex/model/model.py`, evo2 `evo2/configs/*.yml`; savanna's
`tools/statedict_convert_checkpoint_to_vortex.py` without its bugs):
- hcm `filter.h` = `h[:, :128] * decay[:, :128]` formed in the weights' dtype (as savanna does in
  training) and sliced to `hcm_filter_len` taps; the upstream converter kept the full width, which
  vortex refuses.
- hcl `log_poles = -exp(p) * exp(gamma)` `[H, 16, 1]` and `residues = R` `[H, 16]`, in float32.
- featurizer conv `[3H, 3]` -> `[3H, 1, 3]`; attention `Wqkv` rows stay in savanna's per-head
  order (vortex permutes them at load, `custom_load_state_dict`); `inv_freq` as float32 (vortex
  recomputes a non-fp32 one from the YAML base, which would change numerics).
- the final norm is found by its index N+3 and written as top-level `norm.scale`, so the guide's
  `hotfix_norm_scale.py` is never needed; `unembed.weight` = the embedding (same storage).
- a vortex YAML config next to the `.pt` (the keys evo2's `evo2/configs/*.yml` use).

Import (a vortex `.pt` -> savanna layout, so inference releases can be finetuned): the layer kinds
are read off the keys; `p = log(-log_poles)`, `gamma = 0`, `R = residues` gives the same modal
filter; hcm `h` = the stored product with a unit `decay`; columns past 128 are zero.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import yaml
from torch import Tensor

from evo2_hydra.config import ModelConfig
from evo2_hydra.errors import UserError

log = logging.getLogger(__name__)

# savanna block suffix -> vortex block suffix, for keys that are pure renames.
COMMON_RENAMES = {
    "input_layernorm.weight": "pre_norm.scale",
    "input_layernorm.scale": "pre_norm.scale",
    "pre_mlp_layernorm.weight": "post_norm.scale",
    "pre_mlp_layernorm.scale": "post_norm.scale",
    "mlp.w1.weight": "mlp.l1.weight",
    "mlp.w2.weight": "mlp.l2.weight",
    "mlp.w3.weight": "mlp.l3.weight",
}
HYENA_RENAMES = {
    "mixer.dense_projection.weight": "projections.weight",
    "mixer.dense.weight": "out_filter_dense.weight",
    "mixer.dense.bias": "out_filter_dense.bias",
}
ATTENTION_RENAMES = {
    "mixer.dense_projection.weight": "inner_mha_cls.Wqkv.weight",
    "mixer.dense.weight": "inner_mha_cls.out_proj.weight",
    "mixer.dense.bias": "inner_mha_cls.out_proj.bias",
}
# savanna keys with no vortex counterpart: unused norms, TE FP8 state, the hcl time buffer.
DROPPED_SUFFIXES = (
    "post_attention_layernorm.weight",
    "post_attention_layernorm.scale",
    "outer_mlp_layernorm.weight",
    "outer_mlp_layernorm.scale",
    "._extra_state",
    "mixer.mixer.filter.t",
)


def block_index(layer: int) -> int:
    """savanna `sequential.{k}` index of layer `layer` (savanna `savanna/model/backbone.py`)."""
    return layer + 2


def final_norm_index(num_layers: int) -> int:
    """Index of savanna's final norm in `sequential.{i}` (after the blocks and two placeholders)."""
    return num_layers + 3


def _hcm_taps(h: Tensor, decay: Tensor, taps: int) -> Tensor:
    """`(h * decay)[:, :taps]` in the weights' dtype, zero-padded if the source is narrower."""
    width = min(taps, h.shape[-1])
    product = h[:, :width] * decay[:, :width]
    if width < taps:
        product = torch.nn.functional.pad(product, (0, taps - width))
    return product.unsqueeze(1).contiguous()


def _block_keys(sd: Mapping[str, Tensor], k: int) -> dict[str, str]:
    prefix = f"sequential.{k}."
    return {key[len(prefix) :]: key for key in sd if key.startswith(prefix)}


def savanna_to_vortex(sd: Mapping[str, Tensor], cfg: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """Yield `(vortex key, tensor)` one at a time (tensors are computed when yielded)."""
    emb_key = "sequential.0.word_embeddings.weight"
    if emb_key not in sd:
        raise UserError(f"not a savanna state dict: {emb_key} is missing")
    norm_k = final_norm_index(cfg.num_layers)
    norm_keys = _block_keys(sd, norm_k)
    norm_src = norm_keys.get("norm.weight") or norm_keys.get("norm.scale")
    if norm_src is None:
        raise UserError(
            f"final norm sequential.{norm_k}.norm.weight not found (model={cfg.name} has "
            f"{cfg.num_layers} layers, so the norm is at index N+3={norm_k})"
        )
    seen = {emb_key, norm_src}
    seen.update(v for s, v in norm_keys.items() if s.endswith("_extra_state"))

    embedding = sd[emb_key]
    yield "embedding_layer.weight", embedding
    yield "unembed.weight", embedding  # same storage: written once by the stream writer

    for layer, kind in enumerate(cfg.layer_types()):
        k = block_index(layer)
        keys = _block_keys(sd, k)
        if not keys:
            raise UserError(f"layer {layer} ({kind}): no keys under sequential.{k}.")
        out = f"blocks.{layer}."
        used: set[str] = set()

        def take(suffix: str, _keys=keys, _used=used, _layer=layer, _kind=kind) -> Tensor:
            if suffix not in _keys:
                raise UserError(
                    f"layer {_layer} ({_kind}): sequential.{block_index(_layer)}.{suffix} is missing; "
                    f"model.operator_pattern may not match the checkpoint"
                )
            _used.add(suffix)
            return sd[_keys[suffix]]

        for src, dst in COMMON_RENAMES.items():
            if src in keys:
                yield out + dst, take(src)
        renames = ATTENTION_RENAMES if kind == "attention" else HYENA_RENAMES
        for src, dst in renames.items():
            yield out + dst, take(src)
        if kind == "attention":
            inv_freq = take("mixer.rotary_emb.inv_freq")
            yield out + "inner_mha_cls.rotary_emb.inv_freq", inv_freq.float()
        else:
            conv = take("mixer.hyena_proj_conv.short_conv_weight")
            yield out + "filter.short_filter_weight", conv if conv.dim() == 3 else conv[:, None]
        if kind == "hcs":
            yield out + "filter.h", take("mixer.mixer.short_conv.short_conv_weight")
        elif kind == "hcm":
            yield out + "filter.D", take("mixer.mixer.conv_bias")
            h, decay = take("mixer.mixer.filter.h"), take("mixer.mixer.filter.decay")
            yield out + "filter.h", _hcm_taps(h, decay, cfg.hcm_filter_len)
        elif kind == "hcl":
            yield out + "filter.D", take("mixer.mixer.conv_bias")
            p, gamma = (
                take("mixer.mixer.filter.p").float(),
                take("mixer.mixer.filter.gamma").float(),
            )
            if p.shape[0] != cfg.hidden_size:
                raise UserError(
                    f"layer {layer} (hcl): {p.shape[0]} modal filters, but vortex needs one per "
                    f"channel (hidden_size={cfg.hidden_size})"
                )
            yield out + "filter.log_poles", (-torch.exp(p) * torch.exp(gamma)).unsqueeze(-1)
            yield out + "filter.residues", take("mixer.mixer.filter.R").float().contiguous()
        leftover = [
            s
            for s in keys
            if s not in used and s not in COMMON_RENAMES and not s.endswith(DROPPED_SUFFIXES)
        ]
        if leftover:
            raise UserError(
                f"layer {layer} ({kind}): unexpected keys sequential.{k}.{leftover[0]}"
                f"{f' (+{len(leftover) - 1} more)' if len(leftover) > 1 else ''}"
            )
        seen.update(keys.values())

    yield "norm.scale", sd[norm_src]
    stray = [key for key in sd if key not in seen]
    if stray:
        raise UserError(
            f"unexpected keys outside the {cfg.num_layers} layers of model={cfg.name}: {stray[:3]}"
        )


def vortex_config(cfg: ModelConfig, max_seqlen: int) -> dict[str, Any]:
    """The vortex/evo2 YAML (the keys of evo2 `evo2/configs/*.yml`), non-FP8 bf16 checkpoint."""
    kinds = cfg.layer_types()

    def idxs(kind: str) -> list[int]:
        return [i for i, k in enumerate(kinds) if k == kind]

    scaled = cfg.rope_scaling_factor != 1.0
    return {
        "model_name": cfg.name,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_filters": cfg.hidden_size,
        "hcl_layer_idxs": idxs("hcl"),
        "hcm_layer_idxs": idxs("hcm"),
        "hcs_layer_idxs": idxs("hcs"),
        "attn_layer_idxs": idxs("attention"),
        "hcm_filter_length": cfg.hcm_filter_len,
        "hcl_filter_groups": cfg.hidden_size,
        "hcm_filter_groups": cfg.hcm_groups,
        "hcs_filter_groups": cfg.hcs_groups,
        "hcs_filter_length": cfg.hcs_filter_len,
        "num_layers": cfg.num_layers,
        "short_filter_length": cfg.featurizer_conv_len,
        "num_attention_heads": cfg.num_attention_heads,
        "short_filter_bias": False,
        "mlp_init_method": "torch.nn.init.zeros_",
        "mlp_output_init_method": "torch.nn.init.zeros_",
        "eps": cfg.norm_eps,
        "state_size": cfg.hcl_modal_order,
        "rotary_emb_base": cfg.rope_base,
        "use_interpolated_rotary_pos_emb": scaled,
        "rotary_emb_scaling_factor": cfg.rope_scaling_factor,
        "make_vocab_size_divisible_by": 8,
        "inner_size_multiple_of": 16,
        "inner_mlp_size": cfg.mlp_inner_size,
        "log_intermediate_values": False,
        "proj_groups": 1,
        "hyena_filter_groups": 1,
        "column_split_hyena": False,
        "column_split": True,
        "interleave": True,
        "evo2_style_activations": True,
        "mlp_activation": "gelu",
        "model_parallel_size": 1,
        "pipe_parallel_size": 1,
        "tie_embeddings": True,  # Evo 2 ties the output head to the embedding
        "mha_out_proj_bias": True,
        "hyena_out_proj_bias": True,
        "hyena_flip_x1x2": False,
        "qkv_proj_bias": False,
        # Our checkpoints are trained without FP8 and carry no TE scaling state.
        "use_fp8_input_projections": False,
        "max_seqlen": max_seqlen,
        "max_batch_size": 1,
        "final_norm": True,
        # evo2 forces flash attention on GPU anyway; CPU runs (tests/vtx_reference.py) set False.
        "use_flash_attn": True,
        "use_flash_rmsnorm": False,
        "use_flash_depthwise": False,
        "use_flashfft": False,
        "use_laughing_hyena": False,
        "inference_mode": True,
        "prefill_style": "fft",
        "tokenizer_type": "CharLevelTokenizer",
        "print_activations": False,
    }


def vortex_config_yaml(cfg: ModelConfig, max_seqlen: int) -> str:
    """The vortex YAML config (the keys of evo2's configs/*.yml) for this model."""
    header = (
        f"# vortex/evo2 config for {cfg.name}, written by evo2_hydra convert.py target=vortex.\n"
        "# Load: vortex.model.model.StripedHyena(dotdict(yaml.safe_load(...))) + load_checkpoint.\n"
    )
    return header + yaml.safe_dump(vortex_config(cfg, max_seqlen), sort_keys=False)


# ------------------------------------------------------------------------------------------------
# Import


def is_vortex_state_dict(keys) -> bool:
    """A flat vortex dict: `embedding_layer.weight` and `blocks.*`, no savanna `sequential.*`."""
    keys = list(keys)
    return "embedding_layer.weight" in keys and any(k.startswith("blocks.") for k in keys)


def _vortex_blocks(sd: Mapping[str, Tensor]) -> dict[int, dict[str, str]]:
    blocks: dict[int, dict[str, str]] = {}
    for key in sd:
        m = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = key
    return blocks


def vortex_layer_kind(block: Mapping[str, Any]) -> str:
    """Operator of one vortex block ('attention', 'hcl', 'hcm' or 'hcs'), read off its keys."""
    if "inner_mha_cls.Wqkv.weight" in block:
        return "attention"
    if "filter.log_poles" in block:
        return "hcl"
    if "filter.h" in block:
        return "hcm" if "filter.D" in block else "hcs"
    raise UserError(f"cannot tell the layer type of a vortex block with keys {sorted(block)[:4]}")


def vortex_operator_pattern(sd: Mapping[str, Tensor]) -> str:
    """The operator pattern (S/D/H/*) read off a vortex state dict's keys."""
    symbols = {"hcs": "S", "hcm": "D", "hcl": "H", "attention": "*"}
    blocks = {i: b for i, b in _vortex_blocks(sd).items() if "pre_norm.scale" in b}
    return "".join(symbols[vortex_layer_kind(blocks[i])] for i in sorted(blocks))


def vortex_to_savanna(
    sd: Mapping[str, Tensor], *, context: int | None = None
) -> Iterator[tuple[str, Tensor]]:
    """Yield `(savanna key, tensor)`: an equivalent savanna-layout (MP=1) state dict.

    `context` is the width of hcm `h`/`decay` and hcl `t`; default = the stored hcm taps (128),
    which the checkpoint preparation then resizes to `ckpt.context` like any savanna file.
    """
    if not is_vortex_state_dict(sd):
        raise UserError("not a vortex state dict (expected embedding_layer.weight and blocks.*)")
    blocks = _vortex_blocks(sd)
    layers = sorted(i for i, b in blocks.items() if "pre_norm.scale" in b)
    if layers != list(range(len(layers))):
        raise UserError(f"vortex blocks are not numbered 0..N-1: {layers[:8]}")
    num_layers = len(layers)
    seen: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in sd:
            raise UserError(f"vortex file: {key} is missing")
        seen.add(key)
        return sd[key]

    embedding = take("embedding_layer.weight")
    if "unembed.weight" in sd:
        seen.add("unembed.weight")
        if not torch.equal(sd["unembed.weight"], embedding):
            log.warning(
                "unembed.weight differs from embedding_layer.weight; vortex ties them: using the embedding"
            )
    yield "sequential.0.word_embeddings.weight", embedding

    # Width of the stored hcm taps (128): also the default width of the context-dependent tensors.
    hcm_width = next(
        (
            sd[f"blocks.{i}.filter.h"].shape[-1]
            for i in layers
            if vortex_layer_kind(blocks[i]) == "hcm"
        ),
        128,
    )
    for i in layers:
        b = blocks[i]
        kind = vortex_layer_kind(b)
        src, out = f"blocks.{i}.", f"sequential.{block_index(i)}."
        pre = take(src + "pre_norm.scale")
        yield out + "input_layernorm.weight", pre
        yield out + "post_attention_layernorm.weight", torch.ones_like(pre)  # unused by savanna
        yield out + "pre_mlp_layernorm.weight", take(src + "post_norm.scale")
        yield out + "outer_mlp_layernorm.weight", torch.ones_like(pre)  # unused by savanna
        renames = ATTENTION_RENAMES if kind == "attention" else HYENA_RENAMES
        for savanna_suffix, vortex_suffix in renames.items():
            # Wqkv: the file holds savanna's per-head [q_h|k_h|v_h] rows (vortex permutes at load).
            yield out + savanna_suffix, take(src + vortex_suffix)
        if kind == "attention":
            yield out + "mixer.rotary_emb.inv_freq", take(src + "inner_mha_cls.rotary_emb.inv_freq")
        else:
            conv = take(src + "filter.short_filter_weight")
            yield out + "mixer.hyena_proj_conv.short_conv_weight", conv.reshape(conv.shape[0], -1)
        if kind == "hcs":
            yield out + "mixer.mixer.short_conv.short_conv_weight", take(src + "filter.h")
        elif kind == "hcm":
            yield out + "mixer.mixer.conv_bias", take(src + "filter.D")
            taps = take(src + "filter.h").squeeze(1)  # [G, 128], decay already folded in
            width = context or hcm_width
            h = torch.zeros(taps.shape[0], width, dtype=taps.dtype)
            n = min(width, hcm_width)
            h[:, :n] = taps[:, :n]
            yield out + "mixer.mixer.filter.h", h
            yield (
                out + "mixer.mixer.filter.decay",
                torch.ones(taps.shape[0], width, dtype=taps.dtype),
            )
        elif kind == "hcl":
            yield out + "mixer.mixer.conv_bias", take(src + "filter.D")
            log_poles = take(src + "filter.log_poles").float().squeeze(-1)
            if not bool((log_poles < 0).all()):
                raise UserError(
                    f"{src}filter.log_poles: every log-pole must be negative (a decaying mode)"
                )
            yield out + "mixer.mixer.filter.gamma", torch.zeros_like(log_poles)
            yield (
                out + "mixer.mixer.filter.R",
                take(src + "filter.residues").float().reshape(log_poles.shape),
            )
            yield out + "mixer.mixer.filter.p", torch.log(-log_poles)
            width = context or hcm_width
            yield (
                out + "mixer.mixer.filter.t",
                torch.arange(width, dtype=torch.float32).view(1, 1, -1),
            )
        mlp = {
            "mlp.w1.weight": "mlp.l1.weight",
            "mlp.w2.weight": "mlp.l2.weight",
            "mlp.w3.weight": "mlp.l3.weight",
        }
        for savanna_suffix, vortex_suffix in mlp.items():
            yield out + savanna_suffix, take(src + vortex_suffix)

    # The final norm: top-level `norm.scale`, or the pseudo-block the upstream converter writes
    # (`blocks.N.norm.scale`, what hotfix_norm_scale.py renames).
    norm_key = "norm.scale" if "norm.scale" in sd else f"blocks.{num_layers}.norm.scale"
    yield f"sequential.{final_norm_index(num_layers)}.norm.weight", take(norm_key)
    ignorable = (
        "._extra_state",
        "mixer.mixer.filter.t",
        f"blocks.{num_layers}.final_linear.weight",
    )
    stray = [k for k in sd if k not in seen and not k.endswith(ignorable)]
    if stray:
        raise UserError(f"vortex file: unexpected keys {stray[:3]}")


def import_vortex_state_dict(state: Mapping[str, Tensor], path: object = None) -> dict[str, Tensor]:
    """A vortex file's dict -> the savanna `module` dict (hook called by checkpoint/loader.py).

    The context-dependent tensors are 128 wide (the stored hcm taps); checkpoint preparation
    resizes them to `ckpt.context` like those of any savanna file.
    """
    try:
        return dict(vortex_to_savanna(state))
    except UserError as err:
        raise UserError(f"{path}: {err}" if path is not None else str(err)) from None
