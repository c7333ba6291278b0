"""Exact forward passes in chunks: a long sequence in bounded memory.

    cache = new_cache(batch=1, capacity=total_tokens)
    for start in range(0, L, chunk):
        logits = forward_chunk(model, ids[:, start:start + chunk], cache)   # [B, chunk, V]

Each chunk runs the forward's kernels on `chunk` tokens and continues from the states the previous
chunk left (the ones `decode.py` keeps for one-token steps), so the result equals the unchunked
forward up to float rounding while only the attention KV cache grows with the sequence:
- featurizer (K=3) and hcs (K=7): the last K-1 inputs are prepended (a causal FIR needs no more);
- hcm: the last 127 pre-gated inputs are prepended to the 128-tap convolution;
- hcl: the modal filter is a sum of decaying exponentials, so the effect of everything before the
  chunk is carried by the per-order state `s_o = sum_j exp(lambda_o (P-1-j)) z[j]`: inside the
  chunk `y[t] = (h * z)[t] + sum_o R_o exp(lambda_o (t+1)) s_o + bias z[t]` (exact for real poles,
  which savanna's `lambda = -exp(p) exp(gamma)` are), and the state advances by
  `exp(lambda_o l) s_o + sum_j exp(lambda_o (l-1-j)) z[j]`;
- attention: rotated keys and values of every earlier position; the chunk's queries attend to the
  prefix and causally within the chunk.

The first chunk (position 0) runs exactly `StripedHyena2.forward`'s operator calls. After the last
chunk the cache is the one `decode.decode_step` continues from (prompt prefill for generation).
`capture` receives the hidden states the evo2 package's forward hooks would see, under vortex
names (`embedding_layer`, `blocks.N.mlp.l3`, `blocks.N`, `norm`), one chunk at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from evo2_hydra.model import ops
from evo2_hydra.model.decode import (
    AttentionLayerCache,
    FirState,
    HyenaLayerCache,
    InferenceCache,
    ModalState,
    _attention_qkv,
    _hcm_taps,
    _hcs_taps,
    _last,
    _logits,
    _modal_constants,
    _modal_prefill_state,
)
from evo2_hydra.model.layers import AttentionMixer, HclOperator, HcmOperator, HcsOperator
from evo2_hydra.model.model import StripedHyena2

Capture = Callable[[str, Tensor], None]  # (vortex module name, [B, l, D] tensor of this chunk)
# Bound on one attention mask/score block (elements): queries are split so that
# `queries x keys` stays under it when a chunk attends to a long prefix on the CPU.
MASK_ELEMENTS = 1 << 26


def new_cache(capacity: int = 0) -> InferenceCache:
    """An empty cache (position 0); layers are filled by the first chunk. `capacity` presizes the
    attention buffers (tokens); they grow when a later chunk needs more.
    """
    return InferenceCache(position=0, max_length=capacity)


# ------------------------------------------------------------------------------ hyena


def _prepend(history: Tensor | None, x: Tensor) -> Tensor:
    return x if history is None else torch.cat((history.to(x.dtype), x), dim=1)


def _modal_chunk(op: HclOperator, z: Tensor, state: ModalState | None) -> tuple[Tensor, ModalState]:
    """hcl on one chunk `z [B, l, D]` continuing from `state` (None = sequence start)."""
    log_poles, residues = _modal_constants(op)
    length = z.shape[1]
    if state is None:
        y = op(z)  # the forward's own call (FFT over the chunk, skip term)
        carried = _modal_prefill_state(z, log_poles)
        return y, ModalState(carried, log_poles.exp(), residues)
    f = op.filter
    h = ops.modal_filter(f.R, f.p, f.gamma, length)  # [D, l] fp32
    zf = z.float().transpose(1, 2)  # [B, D, l]
    n = 2 * length
    y = torch.fft.irfft(torch.fft.rfft(zf, n=n) * torch.fft.rfft(h, n=n), n=n)[..., :length]
    y = y + zf * op.conv_bias.float().unsqueeze(-1)
    steps = torch.arange(1, length + 1, device=z.device, dtype=torch.float32)
    for o in range(log_poles.shape[1]):  # the prefix's contribution, one modal order at a time
        weight = residues[:, o] * state.state[..., o]  # [B, D]
        y = y + weight[..., None] * torch.exp(log_poles[:, o : o + 1] * steps)
    advanced = state.state * torch.exp(log_poles * length) + _modal_prefill_state(z, log_poles)
    return y.transpose(1, 2).to(z.dtype), ModalState(advanced, state.poles, state.residues)


def _hyena_chunk(mixer, u: Tensor, layer: HyenaLayerCache | None) -> tuple[Tensor, HyenaLayerCache]:
    length = u.shape[1]
    features = mixer.dense_projection(u)
    conv_w = mixer.hyena_proj_conv.short_conv_weight
    full = _prepend(layer.featurizer.history if layer else None, features)
    featurizer = FirState(_last(full, conv_w.shape[1] - 1))
    features = ops.causal_depthwise_xcorr(full, conv_w)[:, -length:]
    x1, x2, v = features[..., 0::3], features[..., 1::3], features[..., 2::3]
    z = x2 * v
    op = mixer.mixer
    previous = layer.operator if layer else None
    if isinstance(op, HclOperator):
        y, operator = _modal_chunk(op, z, previous)
    elif isinstance(op, HcsOperator):
        taps = _hcs_taps(op)
        zz = _prepend(previous.history if previous else None, z)
        y = ops.causal_depthwise_xcorr(zz, taps)[:, -length:] if previous else op(z)
        operator = FirState(_last(zz, taps.shape[1] - 1))
    elif isinstance(op, HcmOperator):
        taps = _hcm_taps(op)
        zz = _prepend(previous.history if previous else None, z)
        y = ops.fft_causal_conv(zz, taps, op.conv_bias)[:, -length:] if previous else op(z)
        operator = FirState(_last(zz, taps.shape[1] - 1))
    else:
        raise TypeError(f"unknown hyena operator {type(op).__name__}")
    return mixer.dense(x1 * y), HyenaLayerCache(featurizer, operator)


# ------------------------------------------------------------------------------ attention


def _ensure_capacity(layer: AttentionLayerCache, needed: int) -> None:
    have = layer.keys.shape[2]
    if needed <= have:
        return
    grown = max(needed, 2 * have)
    for name in ("keys", "values"):
        old = getattr(layer, name)
        new = old.new_zeros(*old.shape[:2], grown, old.shape[3])
        new[:, :, :have] = old
        setattr(layer, name, new)


def _attend_after_prefix(q: Tensor, keys: Tensor, values: Tensor, prefix: int) -> Tensor:
    """Queries at positions prefix.. attend to every key up to their own position."""
    scale = 1 / math.sqrt(q.shape[-1])
    if q.is_cuda:  # flash / memory-efficient kernels take the bottom-right causal mask natively
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(q.shape[2], keys.shape[2])
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale)
    total, length = keys.shape[2], q.shape[2]
    block = max(1, MASK_ELEMENTS // total)
    key_positions = torch.arange(total, device=q.device)
    outputs = []
    for start in range(0, length, block):
        stop = min(length, start + block)
        query_positions = prefix + torch.arange(start, stop, device=q.device)
        mask = key_positions[None, :] <= query_positions[:, None]
        outputs.append(
            F.scaled_dot_product_attention(
                q[:, :, start:stop], keys, values, attn_mask=mask, scale=scale
            )
        )
    return torch.cat(outputs, dim=2)


def _attention_chunk(
    mixer: AttentionMixer,
    u: Tensor,
    layer: AttentionLayerCache | None,
    position: int,
    capacity: int,
) -> tuple[Tensor, AttentionLayerCache]:
    batch, length, dim = u.shape
    q, k, v = _attention_qkv(mixer, u, offset=position)
    if layer is None:
        shape = (batch, mixer.heads, max(capacity, length), mixer.head_dim)
        layer = AttentionLayerCache(k.new_zeros(shape), v.new_zeros(shape))
    end = position + length
    _ensure_capacity(layer, end)
    layer.keys[:, :, position:end] = k
    layer.values[:, :, position:end] = v
    if position == 0:
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=1 / math.sqrt(mixer.head_dim)
        )
    else:
        out = _attend_after_prefix(
            q, layer.keys[:, :, :end], layer.values[:, :, :end], prefix=position
        )
    return mixer.dense(out.transpose(1, 2).reshape(batch, length, dim)), layer


# ------------------------------------------------------------------------------ the model


@torch.no_grad()
def forward_chunk(
    model: StripedHyena2,
    input_ids: Tensor,
    cache: InferenceCache,
    *,
    capture: Capture | None = None,
    logits: bool = True,
) -> Tensor | None:
    """Run the next `input_ids [B, l]` tokens; advances `cache`; returns logits `[B, l, V]`
    (None with `logits=False`, when only captured hidden states are wanted).
    """
    position = cache.position
    if position and len(cache.layers) != model.num_layers:
        raise ValueError("cache does not belong to this model")
    first = not cache.layers
    x = model.embedding(input_ids)
    if capture:
        capture("embedding_layer", x)
    for i, block in enumerate(model.blocks):
        layer = None if first else cache.layers[i]
        u = block.input_layernorm(x)
        if isinstance(block.mixer, AttentionMixer):
            mixed, layer = _attention_chunk(block.mixer, u, layer, position, cache.max_length)
        else:
            mixed, layer = _hyena_chunk(block.mixer, u, layer)
        if first:
            cache.layers.append(layer)
        else:
            cache.layers[i] = layer
        h = x + mixed
        mlp_out = block.mlp(block.pre_mlp_layernorm(h))
        x = h + mlp_out
        if capture:
            capture(f"blocks.{i}.mlp.l3", mlp_out)
            capture(f"blocks.{i}", x)
    cache.position = position + input_ids.shape[1]
    cache.max_length = max(cache.max_length, cache.position)
    if capture:
        capture("norm", model.sequential[model.final_norm_index](x))
    return _logits(model, x) if logits else None


def chunk_spans(length: int, chunk_tokens: int | None) -> Iterator[tuple[int, int]]:
    """`(start, stop)` of each chunk; one span when `chunk_tokens` is 0/None or covers `length`."""
    step = chunk_tokens if chunk_tokens and chunk_tokens < length else length
    for start in range(0, length, step):
        yield start, min(length, start + step)


@torch.no_grad()
def prefill_chunked(
    model: StripedHyena2, input_ids: Tensor, max_length: int, chunk_tokens: int
) -> tuple[InferenceCache, Tensor]:
    """`decode.prefill` in chunks: returns the cache and the last position's logits `[B, V]`."""
    cache = new_cache(max_length)
    last = None
    for start, stop in chunk_spans(input_ids.shape[1], chunk_tokens):
        last = forward_chunk(model, input_ids[:, start:stop], cache)[:, -1]
    return cache, last
