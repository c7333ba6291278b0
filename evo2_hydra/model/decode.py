"""Incremental decoding for StripedHyena 2: prefill the prompt once, then one token per step.

    cache, logits = prefill(model, prompt_ids, max_length=prompt_len + new_tokens)  # [B, L, V]
    next_logits = decode_step(model, next_ids, cache)                               # [B, V]

Each layer keeps only what its operator needs to produce the next output exactly:
- every Hyena layer: the featurizer conv's last K-1 = 2 inputs (the 3D projections, pre-conv);
- hcs: the last 6 pre-gated inputs `x2 * v` (a FIR state for the 7-tap filter);
- hcm: the last 127 pre-gated inputs (a FIR state for the 128-tap `h * decay` filter);
- hcl: the modal (diagonal recurrent) state `s_o[t] = exp(lambda_o) s_o[t-1] + z[t]`, one per modal
  order, so `y[t] = sum_o R_o s_o[t] + bias z[t]`; exact because savanna's poles are real
  (`lambda = -exp(p) exp(gamma)`), O(order) per step instead of a convolution over the prefix;
- attention: keys (after RoPE) and values of every earlier position, in buffers preallocated to
  `max_length`; the new query and key are rotated at their absolute position.

The prefill runs the same kernels as `StripedHyena2.forward` (so its logits are the full forward's)
and reads the states off the intermediate signals. Precision follows the forward: convolutions and
the states in float32, results cast back to the activation dtype. This module only reads the
model's parameters; it adds nothing to the state dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from evo2_hydra.model import ops
from evo2_hydra.model.layers import (
    AttentionMixer,
    HclOperator,
    HcmOperator,
    HcsOperator,
    HyenaMixer,
)
from evo2_hydra.model.model import Block, StripedHyena2


@dataclass
class FirState:
    """The last `taps - 1` inputs of a causal FIR filter, oldest first: `[B, taps - 1, C]`."""

    history: Tensor

    def window(self, current: Tensor) -> Tensor:
        """`[B, taps, C]`: the history followed by the current input `[B, C]`; advances the state."""
        full = torch.cat((self.history, current[:, None]), dim=1)
        self.history = full[:, 1:]
        return full


@dataclass
class HyenaLayerCache:
    """Decoding state of one Hyena layer: featurizer FIR state and operator state."""

    featurizer: FirState  # pre-conv projections [B, 2, 3D]
    operator: object  # FirState (hcs, hcm) or ModalState (hcl)


@dataclass
class ModalState:
    """hcl: per-channel, per-order recurrent state and its constants, all float32."""

    state: Tensor  # [B, D, order]
    poles: Tensor  # exp(lambda) [D, order], in (0, 1)
    residues: Tensor  # R [D, order]


@dataclass
class AttentionLayerCache:
    """Decoding state of one attention layer: rotated keys and values so far."""

    keys: Tensor  # [B, heads, max_length, head_dim], rotated
    values: Tensor  # [B, heads, max_length, head_dim]


@dataclass
class InferenceCache:
    """Per-layer states plus the number of tokens consumed so far (the next absolute position)."""

    layers: list[object] = field(default_factory=list)
    position: int = 0
    max_length: int = 0


# ------------------------------------------------------------------------------ filters per channel


def _hcs_taps(op: HcsOperator) -> Tensor:
    """`[C, 7]` cross-correlation taps (last tap = current token), one row per channel."""
    return op.short_conv.short_conv_weight[:, 0, :].repeat_interleave(op.channels_per_group, dim=0)


def _hcm_taps(op: HcmOperator) -> Tensor:
    """`[C, taps]` true-convolution taps (tap 0 = current token), `h * decay` in h's dtype."""
    f = op.filter
    # min(filter_len, width) taps, rounded like the full forward (bf16 product for bf16 files)
    h = ops.hcm_filter(f.h, f.decay, op.filter_len, op.filter_len, op.product_dtype)
    return h.repeat_interleave(op.channels_per_group, dim=0)


def _last(x: Tensor, count: int) -> Tensor:
    """The last `count` positions of `[B, L, C]`, left-padded with zeros when L < count."""
    if count == 0:
        return x[:, :0]
    tail = x[:, -count:]
    missing = count - tail.shape[1]
    return F.pad(tail, (0, 0, missing, 0)) if missing > 0 else tail


def _modal_constants(op: HclOperator) -> tuple[Tensor, Tensor]:
    f = op.filter
    log_poles = -torch.exp(f.p.float()) * torch.exp(f.gamma.float())  # as ops.modal_filter
    return log_poles, f.R.float()


def _modal_prefill_state(z: Tensor, log_poles: Tensor) -> Tensor:
    """`s_o[L-1] = sum_j exp(lambda_o j) z[L-1-j]` `[B, D, order]`, one order at a time (memory)."""
    length = z.shape[1]
    lags = torch.arange(length - 1, -1, -1, device=z.device, dtype=torch.float32)  # L-1 .. 0
    zf = z.float()
    orders = []
    for o in range(log_poles.shape[1]):
        weights = torch.exp(log_poles[:, o : o + 1] * lags)  # [D, L]
        orders.append(torch.einsum("bld,dl->bd", zf, weights))
    return torch.stack(orders, dim=-1)


# ------------------------------------------------------------------------------ prefill


def _hyena_prefill(mixer: HyenaMixer, u: Tensor) -> tuple[Tensor, HyenaLayerCache]:
    """`HyenaMixer.forward` plus the states after the last prompt token."""
    features = mixer.dense_projection(u)
    conv_w = mixer.hyena_proj_conv.short_conv_weight
    featurizer = FirState(_last(features, conv_w.shape[1] - 1))
    features = ops.causal_depthwise_xcorr(features, conv_w)
    x1, x2, v = features[..., 0::3], features[..., 1::3], features[..., 2::3]
    z = x2 * v
    op = mixer.mixer
    if isinstance(op, HclOperator):
        log_poles, residues = _modal_constants(op)
        state: object = ModalState(_modal_prefill_state(z, log_poles), log_poles.exp(), residues)
    elif isinstance(op, HcsOperator):
        state = FirState(_last(z, op.short_conv.short_conv_weight.shape[-1] - 1))
    else:
        state = FirState(_last(z, _hcm_taps(op).shape[1] - 1))
    return mixer.dense(x1 * op(z)), HyenaLayerCache(featurizer, state)


def _attention_qkv(mixer: AttentionMixer, u: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k (rotated at absolute positions offset..offset+L-1) and v, each `[B, heads, L, hd]`."""
    batch, length, _ = u.shape
    qkv = mixer.dense_projection(u).view(batch, length, mixer.heads, 3 * mixer.head_dim)
    q, k, v = (t.transpose(1, 2) for t in qkv.split(mixer.head_dim, dim=-1))
    cos, sin = ops.rope_cos_sin(
        mixer.rotary_emb.inv_freq, length, mixer.rope_scaling_factor, offset=offset
    )
    return ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin), v


def _attention_prefill(
    mixer: AttentionMixer, u: Tensor, max_length: int
) -> tuple[Tensor, AttentionLayerCache]:
    batch, length, dim = u.shape
    q, k, v = _attention_qkv(mixer, u, offset=0)
    out = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=1 / math.sqrt(mixer.head_dim)
    )
    shape = (batch, mixer.heads, max_length, mixer.head_dim)
    keys = torch.zeros(shape, dtype=k.dtype, device=k.device)
    values = torch.zeros(shape, dtype=v.dtype, device=v.device)
    keys[:, :, :length], values[:, :, :length] = k, v
    return mixer.dense(out.transpose(1, 2).reshape(batch, length, dim)), AttentionLayerCache(
        keys, values
    )


@torch.no_grad()
def prefill(
    model: StripedHyena2, input_ids: Tensor, max_length: int
) -> tuple[InferenceCache, Tensor]:
    """Run the prompt `[B, L]` through the model; returns the cache and the logits `[B, L, V]`.

    `max_length` bounds prompt + generated tokens (it sizes the attention buffers).
    """
    length = input_ids.shape[1]
    if length < 1 or length > max_length:
        raise ValueError(f"prompt of {length} tokens with max_length={max_length}")
    cache = InferenceCache(position=length, max_length=max_length)
    x = model.embedding(input_ids)
    for block in model.blocks:
        u = block.input_layernorm(x)
        if isinstance(block.mixer, AttentionMixer):
            mixed, layer = _attention_prefill(block.mixer, u, max_length)
        else:
            mixed, layer = _hyena_prefill(block.mixer, u)
        cache.layers.append(layer)
        x = _residual_mlp(block, x + mixed)
    return cache, _logits(model, x)


def clone_cache(cache: InferenceCache, batch: int | None = None) -> InferenceCache:
    """An independent copy of `cache`, or with `batch`, `batch` copies of a batch-1 cache's
    sequence: a shared prefix (a prompt, a variant window) is run once and continued several ways.
    """

    def copy(t: Tensor) -> Tensor:
        return t.clone() if batch is None else t.expand(batch, *t.shape[1:]).clone()

    layers: list[object] = []
    for layer in cache.layers:
        if isinstance(layer, AttentionLayerCache):
            layers.append(AttentionLayerCache(copy(layer.keys), copy(layer.values)))
            continue
        op = layer.operator
        if isinstance(op, ModalState):
            op = ModalState(copy(op.state), op.poles, op.residues)
        else:
            op = FirState(copy(op.history))
        layers.append(HyenaLayerCache(FirState(copy(layer.featurizer.history)), op))
    return InferenceCache(layers, cache.position, cache.max_length)


def repeat_batch(cache: InferenceCache, n: int) -> InferenceCache:
    """A cache for `n` copies of a batch-1 cache's sequence (prefill a shared prompt once)."""
    return clone_cache(cache, n)


# ------------------------------------------------------------------------------ one step


def _xcorr_step(window: Tensor, taps: Tensor, dtype: torch.dtype) -> Tensor:
    """`sum_k taps[c, k] * window[:, k, c]` in float32 (last tap = current), cast to `dtype`."""
    return (window.float() * taps.float().t()).sum(dim=1).to(dtype)


def _hyena_step(mixer: HyenaMixer, u: Tensor, layer: HyenaLayerCache) -> Tensor:
    """One token `u [B, 1, D]` through a Hyena mixer, advancing its states."""
    dtype = u.dtype
    projected = mixer.dense_projection(u)[:, 0]  # [B, 3D]
    conv_w = mixer.hyena_proj_conv.short_conv_weight
    features = _xcorr_step(layer.featurizer.window(projected), conv_w, dtype)
    x1, x2, v = features[..., 0::3], features[..., 1::3], features[..., 2::3]
    z = x2 * v  # [B, D]
    op = mixer.mixer
    if isinstance(op, HcsOperator):
        y = _xcorr_step(layer.operator.window(z), _hcs_taps(op), dtype)
    elif isinstance(op, HcmOperator):
        # true convolution (tap 0 = current): flip to the window's oldest-first order
        flipped = _hcm_taps(op).flip(-1)
        conv = (layer.operator.window(z).float() * flipped.float().t()).sum(dim=1)
        y = (conv + z.float() * op.conv_bias.float()).to(dtype)
    else:
        modal: ModalState = layer.operator
        modal.state = modal.poles * modal.state + z.float()[..., None]
        conv = (modal.residues * modal.state).sum(dim=-1)
        y = (conv + z.float() * op.conv_bias.float()).to(dtype)
    return mixer.dense((x1 * y)[:, None])


def _attention_step(
    mixer: AttentionMixer, u: Tensor, layer: AttentionLayerCache, position: int
) -> Tensor:
    batch, _, dim = u.shape
    q, k, v = _attention_qkv(mixer, u, offset=position)
    layer.keys[:, :, position : position + 1] = k
    layer.values[:, :, position : position + 1] = v
    keys, values = layer.keys[:, :, : position + 1], layer.values[:, :, : position + 1]
    # one query attends to every cached position: no mask needed
    out = F.scaled_dot_product_attention(q, keys, values, scale=1 / math.sqrt(mixer.head_dim))
    return mixer.dense(out.transpose(1, 2).reshape(batch, 1, dim))


@torch.no_grad()
def decode_step(model: StripedHyena2, token_ids: Tensor, cache: InferenceCache) -> Tensor:
    """Feed one token per sequence `[B]` at position `cache.position`; returns logits `[B, V]`."""
    position = cache.position
    if position >= cache.max_length:
        raise ValueError(f"cache full: max_length={cache.max_length} tokens")
    x = model.embedding(token_ids[:, None])
    for block, layer in zip(model.blocks, cache.layers):
        u = block.input_layernorm(x)
        if isinstance(block.mixer, AttentionMixer):
            mixed = _attention_step(block.mixer, u, layer, position)
        else:
            mixed = _hyena_step(block.mixer, u, layer)
        x = _residual_mlp(block, x + mixed)
    cache.position = position + 1
    return _logits(model, x)[:, 0]


def _residual_mlp(block: Block, h: Tensor) -> Tensor:
    return h + block.mlp(block.pre_mlp_layernorm(h))


def _logits(model: StripedHyena2, x: Tensor) -> Tensor:
    x = model.sequential[model.final_norm_index](x)
    return F.linear(x, model.embedding.weight)
