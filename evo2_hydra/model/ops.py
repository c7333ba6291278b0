"""The numerical kernels of StripedHyena 2 as plain functions (savanna `savanna/model/block.py`,
`savanna/model/operators/hyena/hyena.py`, `savanna/model/operators/local/norms.py`).

Activations are `[B, L, C]` (batch, tokens, channels) at every boundary; the convolutions move
channels to the middle internally. Precision follows savanna: the convolutions run in float32 and
cast back to the activation dtype, the hcm filter product is formed in the weights' own dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`x / (||x||_2 * d**-0.5 + eps) * weight`: eps added to the RMS, outside the square root.

    Computed in float32 (TransformerEngine's RMSNorm also accumulates in fp32), cast back to x's dtype.
    """
    xf = x.float()
    rms = xf.norm(2, dim=-1, keepdim=True) * (x.shape[-1] ** -0.5)
    return (xf / (rms + eps) * weight.float()).to(x.dtype)


def causal_depthwise_xcorr(x: Tensor, weight: Tensor) -> Tensor:
    """Causal depthwise cross-correlation: `y[c, t] = sum_k w[c, k] * x[c, t - (K-1) + k]`.

    The last tap multiplies the current token. `x` is `[B, L, C]`, `weight` is `[C, K]`. This is
    both the featurizer conv (K=3 over the 3D interleaved channels) and hcs (K=7, after the group
    filters are repeated per channel). Runs in float32.
    """
    channels, taps = weight.shape
    xt = x.float().transpose(1, 2)  # [B, C, L]
    y = F.conv1d(xt, weight.float().unsqueeze(1), padding=taps - 1, groups=channels)
    return y[..., : x.shape[1]].transpose(1, 2).to(x.dtype)


def fft_causal_conv(z: Tensor, h: Tensor, skip: Tensor) -> Tensor:
    """True causal convolution plus skip: `y[c,t] = sum_j h[c,j] z[c,t-j] + skip[c] z[c,t]`.

    Tap 0 of `h` is the current token (the opposite orientation to `causal_depthwise_xcorr`).
    `z` is `[B, L, C]`, `h` is `[C, Lh]` with Lh <= L, `skip` is `[C]`. FFT of size 2L in float32
    (savanna `fftconv_func`), cast back to z's dtype.
    """
    length = z.shape[1]
    n = 2 * length
    zf = z.float().transpose(1, 2)  # [B, C, L]
    spectrum = torch.fft.rfft(zf, n=n) * torch.fft.rfft(h.float(), n=n)
    y = torch.fft.irfft(spectrum, n=n)[..., :length]
    y = y + zf * skip.float().unsqueeze(-1)
    return y.transpose(1, 2).to(z.dtype)


def hcm_filter(
    h: Tensor, decay: Tensor, length: int, filter_len: int, product_dtype: torch.dtype | None = None
) -> Tensor:
    """Effective Hyena-MR filter `h[:, :Lk] * decay[:, :Lk]`, Lk = min(filter_len, length).

    The product is formed in the weights' dtype, as savanna does (bf16 for bf16 weights): forming
    it in fp32 instead moves logits measurably (docs/model.md, "bf16 hcm rounding"). When a
    float32 model holds weights loaded from a bf16 file, `product_dtype` (bf16) keeps that
    rounding. `decay` comes from the checkpoint and is never recomputed.
    """
    taps = min(filter_len, length)
    dtype = product_dtype or h.dtype
    return h[:, :taps].to(dtype) * decay[:, :taps].to(dtype)


def modal_filter(R: Tensor, p: Tensor, gamma: Tensor, length: int) -> Tensor:
    """Hyena-LI filter `h[c, t] = sum_o R[c,o] * exp(-exp(p[c,o]) * exp(gamma[c,o]) * t)`, fp32.

    Summed one modal order at a time so inference never holds the `[C, order, L]` intermediate.
    """
    t = torch.arange(length, device=R.device, dtype=torch.float32)
    log_poles = -torch.exp(p.float()) * torch.exp(gamma.float())  # [C, order], negative reals
    residues = R.float()
    h = torch.zeros(R.shape[0], length, device=R.device, dtype=torch.float32)
    for order in range(R.shape[1]):
        h = h + residues[:, order : order + 1] * torch.exp(log_poles[:, order : order + 1] * t)
    return h


def rope_cos_sin(
    inv_freq: Tensor, length: int, scaling_factor: float, offset: int = 0
) -> tuple[Tensor, Tensor]:
    """NeoX rotary tables `[L, head_dim]` from the stored `inv_freq`, all in float32.

    Positions are float32 `arange / scaling_factor` (vortex inference numerics; savanna training
    used bf16 positions). The stored `inv_freq` is used, never recomputed from a base.
    """
    positions = torch.arange(offset, offset + length, device=inv_freq.device, dtype=torch.float32)
    freqs = torch.outer(positions / scaling_factor, inv_freq.float())  # [L, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`x * cos + rotate_half(x) * sin` on `[B, heads, L, head_dim]`, in fp32, cast back."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
