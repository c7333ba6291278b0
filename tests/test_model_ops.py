"""Each operator against a direct float64 reference written here from savanna
(`savanna/model/block.py`, `savanna/model/operators/`).

The references use explicit loops over filter taps or dense Toeplitz/attention matrices, never an
FFT, so a wrong tap orientation, group mapping, stream split or skip term shows up as a mismatch.
Our operators run their convolutions in float32 (as savanna does), hence tolerances of ~1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evo2_hydra.model import ops
from evo2_hydra.model.layers import (
    AttentionMixer,
    GatedMLP,
    HclOperator,
    HcmOperator,
    HcsOperator,
    HyenaMixer,
    RMSNorm,
)
from evo2_hydra.model.model import Block
from tests.vtx_reference import model_config

B, L, D = 2, 37, 12


def rand(*shape, seed=0, scale=1.0):
    return (
        torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        * scale
    )


def shifted(z, lag):
    """z[:, t - lag, :] with zeros before the start (z is [B, L, C])."""
    if lag == 0:
        return z
    return torch.cat([torch.zeros_like(z[:, :lag]), z[:, :-lag]], dim=1)


def fill(module, seed=0):
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(rand(*p.shape, seed=seed + i, scale=0.5))
    return module.double()


# ---------------------------------------------------------------- references


def ref_hcs(z, w):
    """y[i, t] = sum_k w[i // (D/G), k] * z[i, t - 6 + k] (cross-correlation, tap 6 = current)."""
    groups, _, taps = w.shape
    per = z.shape[-1] // groups
    y = torch.zeros_like(z)
    for i in range(z.shape[-1]):
        for k in range(taps):
            y[..., i] += w[i // per, 0, k] * shifted(z, taps - 1 - k)[..., i]
    return y


def ref_causal_conv(z, h, skip):
    """y[i, t] = sum_{j<=t} h[i, j] z[i, t-j] + skip[i] z[i, t] as a dense Toeplitz product."""
    length = z.shape[1]
    idx = torch.arange(length)
    lag = idx[:, None] - idx[None, :]  # [t, s] = t - s
    hp = torch.cat([h, torch.zeros(h.shape[0], length, dtype=h.dtype)], dim=1)
    toeplitz = torch.where(
        lag >= 0, hp[:, lag.clamp(min=0)], torch.zeros((), dtype=h.dtype)
    )  # [C, t, s]
    return torch.einsum("cts,bsc->btc", toeplitz, z) + skip * z


def ref_modal(R, p, gamma, length):
    t = torch.arange(length, dtype=torch.float64)
    rate = torch.exp(p) * torch.exp(gamma)
    return sum(R[:, o, None] * torch.exp(-rate[:, o, None] * t) for o in range(R.shape[1]))


def ref_attention(u, wqkv, wout, bout, inv_freq, heads, scaling):
    batch, length, dim = u.shape
    hd = dim // heads
    qkv = u @ wqkv.T  # rows per head: [q_h | k_h | v_h]
    pos = torch.arange(length, dtype=torch.float64) / scaling
    angle = pos[:, None] * inv_freq.double()[None, :]  # [L, hd/2]
    out = torch.zeros(batch, length, dim, dtype=torch.float64)
    for h in range(heads):
        base = h * 3 * hd
        q, k, v = (qkv[..., base + j * hd : base + (j + 1) * hd] for j in range(3))

        def rope(x):
            x0, x1 = x[..., : hd // 2], x[..., hd // 2 :]
            c, s = torch.cos(angle), torch.sin(angle)
            return torch.cat([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1)

        scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(
            torch.triu(torch.ones(length, length, dtype=torch.bool), 1), -math.inf
        )
        out[..., h * hd : (h + 1) * hd] = torch.softmax(scores, dim=-1) @ v
    return out @ wout.T + bout


# ---------------------------------------------------------------- tests


def test_hcs_matches_direct_reference():
    op = fill(HcsOperator(D, groups=4, filter_len=7))
    z = rand(B, L, D, seed=10)
    expected = ref_hcs(z, op.short_conv.short_conv_weight.detach())
    torch.testing.assert_close(op(z), expected, atol=2e-5, rtol=1e-5)


def test_hcm_matches_direct_reference():
    context = 64
    op = fill(HcmOperator(D, groups=3, context=context, filter_len=16))
    with torch.no_grad():
        op.filter.decay.copy_(rand(3, context, seed=21).abs())
    z = rand(B, L, D, seed=11)
    h = (op.filter.h[:, :16] * op.filter.decay[:, :16]).detach().repeat_interleave(4, dim=0)
    expected = ref_causal_conv(z, h, op.conv_bias.detach())
    torch.testing.assert_close(op(z), expected, atol=2e-5, rtol=1e-5)
    # only the first filter_len columns matter
    with torch.no_grad():
        op.filter.h[:, 16:] = 1e3
    torch.testing.assert_close(op(z), expected, atol=2e-5, rtol=1e-5)


def test_hcm_filter_product_in_weight_dtype():
    """bf16 weights: the product is rounded to bf16 as savanna does, not formed in fp32."""
    h = torch.randn(4, 200).bfloat16()
    decay = torch.rand(4, 200).bfloat16()
    product = ops.hcm_filter(h, decay, length=300, filter_len=128)
    assert product.dtype == torch.bfloat16 and product.shape == (4, 128)
    torch.testing.assert_close(product, h[:, :128] * decay[:, :128], atol=0, rtol=0)
    assert ops.hcm_filter(h, decay, length=50, filter_len=128).shape == (4, 50)
    # float32 weights loaded from a bf16 file: product_dtype keeps the bf16 rounding
    rounded = ops.hcm_filter(h.float(), decay.float(), 300, 128, product_dtype=torch.bfloat16)
    torch.testing.assert_close(rounded, product, atol=0, rtol=0)


def test_hcl_matches_direct_reference():
    op = fill(HclOperator(D, order=5, context=64))
    with torch.no_grad():
        op.filter.gamma.copy_(rand(D, 5, seed=22).abs().clamp(0.01, 0.1).log())
        op.filter.p.copy_(rand(D, 5, seed=23).clamp(-1, 1))
        op.filter.t.fill_(-7.0)  # stored values of t must not matter (savanna recomputes them)
    z = rand(B, L, D, seed=12)
    f = op.filter
    h = ref_modal(f.R.detach(), f.p.detach(), f.gamma.detach(), L)
    expected = ref_causal_conv(z, h, op.conv_bias.detach())
    torch.testing.assert_close(op(z), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling", [1.0, 8.0])
def test_attention_matches_direct_reference(scaling):
    dim, heads = 16, 2
    mixer = fill(AttentionMixer(dim, heads, rope_scaling_factor=scaling))
    # stored inv_freq that is NOT any base's: the stored buffer must be what is used
    mixer.rotary_emb.inv_freq = rand(dim // heads // 2, seed=20).abs().bfloat16()
    u = rand(B, L, dim, seed=13)
    expected = ref_attention(
        u,
        mixer.dense_projection.weight.detach(),
        mixer.dense.weight.detach(),
        mixer.dense.bias.detach(),
        mixer.rotary_emb.inv_freq,
        heads,
        scaling,
    )
    torch.testing.assert_close(mixer(u), expected, atol=5e-5, rtol=1e-5)  # RoPE runs in fp32


def test_hyena_featurizer_streams_and_gates():
    """dense_projection -> conv over interleaved 3D channels -> x1 * op(x2 * v) -> dense."""
    mixer = fill(HyenaMixer(D, featurizer_len=3, operator=HcsOperator(D, groups=4, filter_len=7)))
    u = rand(B, L, D, seed=14)
    proj = u @ mixer.dense_projection.weight.detach().T
    w = mixer.hyena_proj_conv.short_conv_weight.detach()  # [3D, 3], last tap = current token
    conv = sum(w[:, k] * shifted(proj, 2 - k) for k in range(3))
    x1, x2, v = conv[..., 0::3], conv[..., 1::3], conv[..., 2::3]
    y = ref_hcs(x2 * v, mixer.mixer.short_conv.short_conv_weight.detach())
    expected = (x1 * y) @ mixer.dense.weight.detach().T + mixer.dense.bias.detach()
    torch.testing.assert_close(mixer(u), expected, atol=2e-5, rtol=1e-5)


def test_rmsnorm_eps_outside_sqrt():
    norm = RMSNorm(8, eps=0.5)  # a large eps separates the two placements clearly
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = rand(3, 8, seed=15)
    rms = x.norm(dim=-1, keepdim=True) / math.sqrt(8)
    expected = x / (rms + 0.5) * norm.weight.detach().double()
    out = norm(x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    eps_inside = (
        x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 0.5) * norm.weight.detach().double()
    )
    assert (out - eps_inside).abs().max() > 1e-2
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_mlp_gelu_in_layer_zero_only():
    cfg = model_config("evo2_tiny")
    blocks = [Block(cfg, i, kind, 64) for i, kind in enumerate(cfg.layer_types()[:3])]
    assert [b.mlp.gelu for b in blocks] == [True, False, False]
    mlp = fill(GatedMLP(D, 20, gelu=True))
    x = rand(B, L, D, seed=16)
    w1, w2, w3 = (getattr(mlp, n).weight.detach() for n in ("w1", "w2", "w3"))
    torch.testing.assert_close(mlp(x), (F.gelu(x @ w1.T) * (x @ w2.T)) @ w3.T)
    mlp.gelu = False
    torch.testing.assert_close(mlp(x), ((x @ w1.T) * (x @ w2.T)) @ w3.T)
