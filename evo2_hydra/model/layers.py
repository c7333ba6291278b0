"""StripedHyena 2 modules whose attribute names reproduce savanna's state_dict keys
(savanna `tools/7b/conversion/params.py`).

Parameters are created with `torch.empty` (so a build on the meta device allocates nothing);
`evo2_hydra.model.model.init_weights` fills them for a fresh model, `load_into_model` from a
checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evo2_hydra.model import ops


class RMSNorm(nn.Module):
    """RMSNorm with the TransformerEngine parameter name `weight` (savanna `use_fp8_norm: true`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class GatedMLP(nn.Module):
    """savanna ParallelGLU (`mlp_type: llama`): `w3(act(w1 x) * w2 x)`, no biases.

    `act` is exact GELU in layer 0 only and identity afterwards (savanna's activation side
    effect, vortex `evo2_style_activations`; savanna `ParallelGLU`).
    """

    def __init__(self, dim: int, inner: int, gelu: bool) -> None:
        super().__init__()
        self.gelu = gelu
        self.w1 = nn.Linear(dim, inner, bias=False)
        self.w2 = nn.Linear(dim, inner, bias=False)
        self.w3 = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.w1(x)
        if self.gelu:
            gate = F.gelu(gate)
        return self.w3(gate * self.w2(x))


class ShortConv(nn.Module):
    """Holds a depthwise filter under savanna's name `short_conv_weight`."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.short_conv_weight = nn.Parameter(torch.empty(shape))


class HcsOperator(nn.Module):
    """Hyena-SE: grouped length-7 causal cross-correlation (tap 6 = current token), no skip."""

    def __init__(self, dim: int, groups: int, filter_len: int) -> None:
        super().__init__()
        self.channels_per_group = dim // groups
        self.short_conv = ShortConv((groups, 1, filter_len))

    def forward(self, z: Tensor) -> Tensor:
        filters = self.short_conv.short_conv_weight[:, 0, :]  # [G, K]
        per_channel = filters.repeat_interleave(
            self.channels_per_group, dim=0
        )  # channel i -> i // (D/G)
        return ops.causal_depthwise_xcorr(z, per_channel)


class ExplicitDecayFilter(nn.Module):
    """savanna ExplicitSingleDecayFilter: parameter `h` and persistent buffer `decay`, `[G, context]`."""

    def __init__(self, groups: int, context: int) -> None:
        super().__init__()
        self.h = nn.Parameter(torch.empty(groups, context))
        self.register_buffer("decay", torch.empty(groups, context), persistent=True)


class HcmOperator(nn.Module):
    """Hyena-MR: causal convolution with `h[:, :128] * decay[:, :128]` (tap 0 = current) + skip."""

    def __init__(self, dim: int, groups: int, context: int, filter_len: int) -> None:
        super().__init__()
        self.channels_per_group = dim // groups
        self.filter_len = filter_len
        self.conv_bias = nn.Parameter(torch.empty(dim))
        self.filter = ExplicitDecayFilter(groups, context)
        # dtype `filter.h` had in the loaded file, when lower than the model's (see product_dtype)
        self.source_dtype: torch.dtype | None = None

    @property
    def product_dtype(self) -> torch.dtype:
        """savanna forms h * decay in the checkpoint's dtype: the lower of file and model precision."""
        held = self.filter.h.dtype
        source = self.source_dtype
        if source is not None and torch.finfo(source).bits < torch.finfo(held).bits:
            return source
        return held

    def forward(self, z: Tensor) -> Tensor:
        h = ops.hcm_filter(
            self.filter.h, self.filter.decay, z.shape[1], self.filter_len, self.product_dtype
        )
        h = h.repeat_interleave(self.channels_per_group, dim=0)
        return ops.fft_causal_conv(z, h, self.conv_bias)


class ModalFilter(nn.Module):
    """savanna ImplicitModalFilter: `gamma`, `R`, `p` `[D, order]` and the buffer `t` `[1, 1, context]`.

    `t` only exists so the state dict has savanna's keys and shapes: savanna overwrites it with a
    fresh `arange(L)` on the first forward, so its stored values never matter (nor here).
    """

    def __init__(self, channels: int, order: int, context: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(channels, order))
        self.R = nn.Parameter(torch.empty(channels, order))
        self.p = nn.Parameter(torch.empty(channels, order))
        self.register_buffer("t", torch.empty(1, 1, context, dtype=torch.float32), persistent=True)


class HclOperator(nn.Module):
    """Hyena-LI: modal filter over the whole sequence, fp32 FFT causal convolution + skip."""

    def __init__(self, dim: int, order: int, context: int) -> None:
        super().__init__()
        self.conv_bias = nn.Parameter(torch.empty(dim))
        self.filter = ModalFilter(dim, order, context)

    def forward(self, z: Tensor) -> Tensor:
        f = self.filter
        h = ops.modal_filter(f.R, f.p, f.gamma, z.shape[1])
        return ops.fft_causal_conv(z, h, self.conv_bias)


class HyenaMixer(nn.Module):
    """savanna ParallelSequenceMixer for hcs/hcm/hcl: featurizer, gates, operator, out-projection.

    `dense_projection` (D -> 3D, no bias), causal depthwise conv over the 3D *interleaved* channels
    (`hyena_proj_conv.short_conv_weight` `[3D, 3]`), then channel 3i+p is stream p of channel i:
    x1 = [0::3] post-gate, x2 = [1::3] pre-gate, v = [2::3]. `out = dense(x1 * op(x2 * v))`.
    """

    def __init__(self, dim: int, featurizer_len: int, operator: nn.Module) -> None:
        super().__init__()
        self.dense_projection = nn.Linear(dim, 3 * dim, bias=False)
        self.hyena_proj_conv = ShortConv((3 * dim, featurizer_len))
        self.mixer = operator
        self.dense = nn.Linear(dim, dim, bias=True)

    def forward(self, u: Tensor) -> Tensor:
        features = self.dense_projection(u)
        features = ops.causal_depthwise_xcorr(features, self.hyena_proj_conv.short_conv_weight)
        x1, x2, v = features[..., 0::3], features[..., 1::3], features[..., 2::3]
        return self.dense(x1 * self.mixer(x2 * v))


class RotaryEmbedding(nn.Module):
    """Holds `inv_freq` `[head_dim/2]` as a persistent buffer: the checkpoint's values win."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=True)


class AttentionMixer(nn.Module):
    """Causal multi-head attention with per-head `[q_h | k_h | v_h]` projection rows
    (savanna's `flash_v2` block).

    No qkv bias, out-projection with bias, NeoX rotate-half RoPE on the full head from the stored
    `inv_freq` in fp32, positions divided by `rope_scaling_factor`. `scaled_dot_product_attention`
    picks flash kernels on GPUs.
    """

    def __init__(self, dim: int, heads: int, rope_scaling_factor: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.rope_scaling_factor = rope_scaling_factor
        self.dense_projection = nn.Linear(dim, 3 * dim, bias=False)
        self.rotary_emb = RotaryEmbedding(self.head_dim)
        self.dense = nn.Linear(dim, dim, bias=True)

    def forward(self, u: Tensor) -> Tensor:
        batch, length, dim = u.shape
        qkv = self.dense_projection(u).view(batch, length, self.heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))  # [B, H, L, hd]
        cos, sin = ops.rope_cos_sin(self.rotary_emb.inv_freq, length, self.rope_scaling_factor)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=1 / math.sqrt(self.head_dim)
        )
        return self.dense(out.transpose(1, 2).reshape(batch, length, dim))
