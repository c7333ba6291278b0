"""The StripedHyena 2 network in savanna's `sequential.{i}` layout, and `build_model`.

Layout (savanna `savanna/model/backbone.py`, `sequential.{idx}` keys), N = num_layers:
    sequential.0        embedding (`word_embeddings.weight`, tied to the output)
    sequential.1        placeholder (savanna's `_pre_mixer_block` lambda; no parameters)
    sequential.2..N+1   one pre-norm residual block per layer
    sequential.N+2      placeholder (`_post_mixer_block`)
    sequential.N+3      final norm (`norm.weight`)
    sequential.N+4      placeholder (the tied-logits lambda)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from evo2_hydra.config import DecayPreset, ModelConfig
from evo2_hydra.errors import UserError
from evo2_hydra.model.layers import (
    AttentionMixer,
    GatedMLP,
    HclOperator,
    HcmOperator,
    HcsOperator,
    HyenaMixer,
    RMSNorm,
)

# savanna `explicit_filter_decay_preset`: (log10 r_min, log10 r_max) of the hcm decay rates.
DECAY_PRESETS = {
    DecayPreset.strong: (0.0, 2.0),
    DecayPreset.normal: (-1.0, 2.0),
    DecayPreset.weak: (-2.0, 2.0),
}


class Placeholder(nn.Module):
    """A parameter-free slot that keeps savanna's `sequential` indices (its lambdas)."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def extra_repr(self) -> str:
        return self.what


class Embedding(nn.Module):
    """savanna's `sequential.0`: the token embedding (tied to the output head)."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim, _weight=torch.empty(vocab, dim))

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.word_embeddings(input_ids)


class FinalNorm(nn.Module):
    """savanna's final norm block (`sequential.{N+3}.norm`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


class Block(nn.Module):
    """Pre-norm residual block: `h = x + mixer(norm(x)); y = h + mlp(norm(h))`
    (savanna `savanna/model/block.py`, `ParallelBlock`).

    `post_attention_layernorm` and `outer_mlp_layernorm` exist only because savanna constructs
    them (they are in every checkpoint); they are never applied.
    """

    def __init__(self, cfg: ModelConfig, layer: int, kind: str, context: int) -> None:
        super().__init__()
        dim, eps = cfg.hidden_size, cfg.norm_eps
        self.kind = kind
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)  # unused, kept for the key layout
        self.pre_mlp_layernorm = RMSNorm(dim, eps)
        self.outer_mlp_layernorm = RMSNorm(dim, eps)  # unused, kept for the key layout
        self.mixer = make_mixer(cfg, kind, context)
        self.mlp = GatedMLP(dim, cfg.mlp_inner_size, gelu=layer == 0)

    def forward(self, x: Tensor) -> Tensor:
        h = x + self.mixer(self.input_layernorm(x))
        return h + self.mlp(self.pre_mlp_layernorm(h))


def make_mixer(cfg: ModelConfig, kind: str, context: int) -> nn.Module:
    """The mixer of one layer: attention or a Hyena operator (hcs, hcm, hcl)."""
    dim = cfg.hidden_size
    if kind == "attention":
        return AttentionMixer(dim, cfg.num_attention_heads, cfg.rope_scaling_factor)
    if kind == "hcs":
        operator: nn.Module = HcsOperator(dim, cfg.hcs_groups, cfg.hcs_filter_len)
    elif kind == "hcm":
        operator = HcmOperator(dim, cfg.hcm_groups, context, cfg.hcm_filter_len)
    elif kind == "hcl":
        if cfg.hcl_groups != dim:
            raise UserError(
                f"model.hcl_groups={cfg.hcl_groups}: savanna's Hyena-LI has one filter per "
                f"channel, expected model.hidden_size={dim}"
            )
        operator = HclOperator(dim, cfg.hcl_modal_order, context)
    else:
        raise ValueError(f"unknown operator kind {kind!r}")
    return HyenaMixer(dim, cfg.featurizer_conv_len, operator)


class StripedHyena2(nn.Module):
    """Evo 2 (StripedHyena 2). `forward(input_ids [B, L]) -> logits [B, L, vocab]` in the params' dtype."""

    def __init__(
        self, cfg: ModelConfig, context: int, checkpoint_activations: bool = False
    ) -> None:
        super().__init__()
        self.context = context
        self.checkpoint_activations = checkpoint_activations
        n = cfg.num_layers
        modules: list[nn.Module] = [
            Embedding(cfg.vocab_size, cfg.hidden_size),
            Placeholder("savanna _pre_mixer_block"),
        ]
        modules += [Block(cfg, i, kind, context) for i, kind in enumerate(cfg.layer_types())]
        modules += [
            Placeholder("savanna _post_mixer_block"),
            FinalNorm(cfg.hidden_size, cfg.norm_eps),
            Placeholder("tied logits: F.linear(h, word_embeddings.weight)"),
        ]
        self.sequential = nn.Sequential(*modules)
        self.num_layers = n
        self.final_norm_index = n + 3

    @property
    def blocks(self) -> list[Block]:
        """The residual blocks, read from `sequential` (so wrappers installed there are seen)."""
        return [self.sequential[i + 2] for i in range(self.num_layers)]

    @property
    def embedding(self) -> nn.Embedding:
        return self.sequential[0].word_embeddings

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embedding(input_ids)
        for block in self.blocks:
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)  # recompute in backward
            else:
                x = block(x)
        x = self.sequential[self.final_norm_index](x)
        return F.linear(x, self.embedding.weight)


@torch.no_grad()
def init_weights(model: StripedHyena2, cfg: ModelConfig) -> None:
    """Fresh weights as savanna `init_functions.py` makes them; only for runs with no checkpoint."""
    dim = cfg.hidden_size
    small = math.sqrt(2 / (5 * dim))  # small_init
    wang = 2 / (cfg.num_layers * math.sqrt(dim))  # wang_init (output projections)
    model.embedding.weight.normal_(0.0, small)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
    for block in model.blocks:
        mixer = block.mixer
        mixer.dense_projection.weight.normal_(0.0, small)
        mixer.dense.weight.normal_(0.0, wang)
        mixer.dense.bias.zero_()
        block.mlp.w1.weight.normal_(0.0, small)
        block.mlp.w2.weight.normal_(0.0, small)
        block.mlp.w3.weight.normal_(0.0, wang)
        if isinstance(mixer, AttentionMixer):
            head_dim = mixer.head_dim
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
            mixer.rotary_emb.inv_freq.copy_(1.0 / cfg.rope_base**exponents)
            continue
        bound = math.sqrt(1 / 3)  # savanna uses short_conv_L = 3 for both short filters
        mixer.hyena_proj_conv.short_conv_weight.uniform_(-bound, bound)
        op = mixer.mixer
        if isinstance(op, HcsOperator):
            op.short_conv.short_conv_weight.uniform_(-bound, bound)
            continue
        # savanna leaves conv_bias uninitialised (torch.empty); start the skip term at zero.
        op.conv_bias.zero_()
        if isinstance(op, HcmOperator):
            groups, width = op.filter.h.shape
            op.filter.h.copy_(torch.randn(groups, width) / math.sqrt(width) * 1e-5)
            log_r_min, log_r_max = DECAY_PRESETS[DecayPreset(cfg.hcm_decay_preset)]
            rates = torch.logspace(log_r_min, log_r_max, groups)
            t = torch.linspace(0, 1, width)
            op.filter.decay.copy_(torch.exp(-rates[:, None] * t[None, :]))
        else:  # hcl
            f = op.filter
            f.gamma.copy_(torch.empty_like(f.gamma, dtype=torch.float32).uniform_(0.01, 0.1).log())
            f.R.copy_(torch.randn(f.R.shape) * 0.1 / math.sqrt(f.R.shape[1]))
            f.p.fill_(-1.0)
            f.t.copy_(torch.arange(f.t.shape[-1], dtype=torch.float32).view(1, 1, -1))


def _keep_t_float32(model: nn.Module) -> None:
    """hcl `filter.t` stays float32 whatever the model dtype (savanna reassigns it as fp32)."""
    for module in model.modules():
        if isinstance(module, HclOperator):
            module.filter.t = module.filter.t.float()


def build_model(
    cfg: ModelConfig,
    context: int,
    *,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    checkpoint_activations: bool = False,
) -> StripedHyena2:
    """Build the model for `context` (width of hcm `filter.h`/`decay` and hcl `filter.t`).

    On "meta" nothing is allocated (materialize with `load_into_model`); on a real device the
    weights are freshly initialised (seed torch first for reproducibility).
    """
    if context <= 0:
        raise UserError(f"ckpt.context={context}: must be a positive number of tokens")
    device = torch.device(device)
    with torch.device(device):
        model = StripedHyena2(cfg, context, checkpoint_activations=checkpoint_activations)
    if device.type != "meta":
        init_weights(model, cfg)
    model.to(dtype)
    _keep_t_float32(model)
    return model
