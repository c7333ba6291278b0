"""Reusable harness: random savanna-layout weights, the savanna -> vortex exporter, and running
the public `vtx` (vortex) model on CPU in float32 as an independent logits reference.

Used by tests/test_vtx_reference.py (the model cross-check) and reusable by the converter tests:
    state = random_savanna_state_dict(model_cfg, context, seed=0)
    vtx_logits = run_vtx(savanna_to_vortex(state, model_cfg), vortex_config(model_cfg), ids, tmp_path)

Running vtx 1.1.0 on CPU needs the shim below (`install_vortex_cpu_shim`): a plain-torch stand-in
for the triton rotary kernel module (so `vortex/ops/__init__.py`, which imports flash-attn, never
runs), a no-op `torch.cuda.device` when there is no CUDA, and `use_flash_attn` / FP8 projections
off.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import types
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

from evo2_hydra.config import ModelConfig
from evo2_hydra.model.model import DECAY_PRESETS

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"


def model_config(name: str = "evo2_tiny", **overrides) -> ModelConfig:
    """A ModelConfig from the shipped `conf/model/<name>.yaml` (validated), with field overrides."""
    values = OmegaConf.to_container(OmegaConf.load(CONF_MODEL / f"{name}.yaml"))
    values.pop("defaults", None)
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), values, overrides)
    return OmegaConf.to_object(merged)


# ----------------------------------------------------------------------------------------------
# Random savanna-layout weights


def random_savanna_state_dict(
    cfg: ModelConfig,
    context: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    extra_state: bool = True,
) -> dict[str, Tensor]:
    """A savanna `module` state dict for `cfg` at `context` with random but well-conditioned values.

    Written from savanna's key names (`tools/7b/conversion/params.py`), not from our model.
    Everything is in `dtype` (bf16 like DeepSpeed saves) except hcl `filter.t` (fp32, savanna
    reassigns it). hcm `filter.h` holds signed powers of two: then `h * decay` is exact in bf16, so
    a model that forms the product in fp32 and one that forms it in bf16 (savanna, the vortex
    converter, vtx's bf16 loader) use the same filter (docs/model.md, "bf16 hcm rounding").
    With `extra_state`, TransformerEngine `_extra_state` entries (uint8 tensors) are added to the
    projections, as real checkpoints carry them.
    """
    g = torch.Generator().manual_seed(seed)
    dim, inner, n = cfg.hidden_size, cfg.mlp_inner_size, cfg.num_layers

    def normal(*shape: int, std: float) -> Tensor:
        return torch.randn(*shape, generator=g) * std

    def uniform(*shape: int, low: float, high: float) -> Tensor:
        return torch.rand(*shape, generator=g) * (high - low) + low

    def norm_weight() -> Tensor:
        return 1.0 + normal(dim, std=0.1)

    sd: dict[str, Tensor] = {
        "sequential.0.word_embeddings.weight": normal(cfg.vocab_size, dim, std=1.0)
    }
    for layer, kind in enumerate(cfg.layer_types()):
        p = f"sequential.{layer + 2}."
        sd[p + "input_layernorm.weight"] = norm_weight()
        sd[p + "post_attention_layernorm.weight"] = norm_weight()
        sd[p + "pre_mlp_layernorm.weight"] = norm_weight()
        sd[p + "outer_mlp_layernorm.weight"] = norm_weight()
        sd[p + "mixer.dense_projection.weight"] = normal(3 * dim, dim, std=dim**-0.5)
        sd[p + "mixer.dense.weight"] = normal(dim, dim, std=dim**-0.5)
        sd[p + "mixer.dense.bias"] = normal(dim, std=0.1)
        sd[p + "mlp.w1.weight"] = normal(inner, dim, std=dim**-0.5)
        sd[p + "mlp.w2.weight"] = normal(inner, dim, std=dim**-0.5)
        sd[p + "mlp.w3.weight"] = normal(dim, inner, std=inner**-0.5)
        if kind == "attention":
            head_dim = dim // cfg.num_attention_heads
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
            sd[p + "mixer.rotary_emb.inv_freq"] = 1.0 / cfg.rope_base**exponents
            continue
        sd[p + "mixer.hyena_proj_conv.short_conv_weight"] = uniform(
            3 * dim, cfg.featurizer_conv_len, low=-0.6, high=0.6
        )
        if kind == "hcs":
            sd[p + "mixer.mixer.short_conv.short_conv_weight"] = uniform(
                cfg.hcs_groups, 1, cfg.hcs_filter_len, low=-0.5, high=0.5
            )
        elif kind == "hcm":
            groups = cfg.hcm_groups
            signs = torch.where(torch.rand(groups, context, generator=g) < 0.5, -1.0, 1.0)
            exponents = torch.randint(-6, -1, (groups, context), generator=g).float()
            sd[p + "mixer.mixer.conv_bias"] = normal(dim, std=0.5)
            sd[p + "mixer.mixer.filter.h"] = signs * torch.pow(2.0, exponents)
            log_r_min, log_r_max = DECAY_PRESETS[cfg.hcm_decay_preset]
            rates = torch.logspace(log_r_min, log_r_max, groups)
            sd[p + "mixer.mixer.filter.decay"] = torch.exp(
                -rates[:, None] * torch.linspace(0, 1, context)[None, :]
            )
        else:  # hcl
            order = cfg.hcl_modal_order
            sd[p + "mixer.mixer.conv_bias"] = normal(dim, std=0.5)
            sd[p + "mixer.mixer.filter.gamma"] = uniform(dim, order, low=0.01, high=0.1).log()
            sd[p + "mixer.mixer.filter.R"] = normal(dim, order, std=0.5 / math.sqrt(order))
            sd[p + "mixer.mixer.filter.p"] = uniform(dim, order, low=-1.0, high=1.0)
            sd[p + "mixer.mixer.filter.t"] = torch.arange(context, dtype=torch.float32).view(
                1, 1, context
            )
    sd[f"sequential.{n + 3}.norm.weight"] = norm_weight()
    sd = {k: (v if k.endswith("filter.t") else v.to(dtype)) for k, v in sd.items()}
    if extra_state:
        for layer in range(n):
            for module in ("mixer.dense_projection", "mixer.dense", "mlp.w1", "mlp.w2", "mlp.w3"):
                sd[f"sequential.{layer + 2}.{module}._extra_state"] = torch.zeros(
                    16, dtype=torch.uint8
                )
    return sd


# ----------------------------------------------------------------------------------------------
# Minimal savanna -> vortex mapping (savanna `tools/statedict_convert_checkpoint_to_vortex.py`;
# the real exporter is in checkpoint/adapters/vortex.py)


def savanna_to_vortex(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """The savanna -> vortex file layout through the real exporter (evo2_hydra.checkpoint.adapters.vortex).

    Renames and transforms (savanna -> vortex `vortex/model/model.py`): Wqkv rows in savanna's
    per-head order (vortex permutes at load), hcm `(h * decay)[:, :128]` formed in the checkpoint
    dtype, hcl log-poles and residues in fp32, `inv_freq` upcast to fp32 (vtx recomputes a non-fp32
    one from the base). tests/test_convert_vortex.py checks the exporter's file end to end; here it
    feeds the model test.
    """
    from evo2_hydra.checkpoint.adapters.vortex import savanna_to_vortex as export

    return dict(export(state, cfg))


def vortex_config(cfg: ModelConfig) -> dict:
    """The vortex YAML keys (evo2 `evo2/configs/*.yml`) for `cfg`, with the CPU overrides."""
    layer_idxs = {
        kind: [i for i, k in enumerate(cfg.layer_types()) if k == kind]
        for kind in ("hcs", "hcm", "hcl", "attention")
    }
    scaled = cfg.rope_scaling_factor != 1.0
    return {
        "model_name": f"test-{cfg.name}",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_filters": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "attn_layer_idxs": layer_idxs["attention"],
        "hcl_layer_idxs": layer_idxs["hcl"],
        "hcm_layer_idxs": layer_idxs["hcm"],
        "hcs_layer_idxs": layer_idxs["hcs"],
        "hcm_filter_length": cfg.hcm_filter_len,
        "hcl_filter_groups": cfg.hcl_groups,
        "hcm_filter_groups": cfg.hcm_groups,
        "hcs_filter_groups": cfg.hcs_groups,
        "hcs_filter_length": cfg.hcs_filter_len,
        "short_filter_length": cfg.featurizer_conv_len,
        "short_filter_bias": False,
        "state_size": cfg.hcl_modal_order,
        "eps": cfg.norm_eps,
        "proj_groups": 1,
        "hyena_filter_groups": 1,
        "column_split_hyena": False,
        "column_split": True,
        "interleave": True,
        "hyena_flip_x1x2": False,
        "evo2_style_activations": True,
        "mlp_activation": "gelu",
        "inner_mlp_size": cfg.mlp_inner_size,
        "inner_size_multiple_of": 16,
        "model_parallel_size": 1,
        "pipe_parallel_size": 1,
        "tie_embeddings": True,
        "final_norm": True,
        "mha_out_proj_bias": True,
        "hyena_out_proj_bias": True,
        "qkv_proj_bias": False,
        "rotary_emb_base": cfg.rope_base,
        "use_interpolated_rotary_pos_emb": scaled,
        "rotary_emb_scaling_factor": cfg.rope_scaling_factor,
        "max_seqlen": 8192,
        "max_batch_size": 1,
        "inference_mode": True,
        "prefill_style": "fft",
        "use_flash_attn": False,  # CPU: SDPA path
        "use_fp8_input_projections": False,  # no TransformerEngine
        "use_flash_rmsnorm": False,
        "use_flash_depthwise": False,
        "use_flashfft": False,
        "use_laughing_hyena": False,
        "hyena_block_dtype": torch.float32,
        "attn_block_dtype": torch.float32,
        "mlp_dtype": torch.float32,
        "tokenizer_type": "CharLevelTokenizer",
        "print_activations": False,
    }


# ----------------------------------------------------------------------------------------------
# Running vtx on CPU


def _cpu_apply_rotary(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    seqlen_offsets=0,
    cu_seqlens=None,
    max_seqlen=None,
    interleaved=False,
    inplace=False,
    conjugate=False,
) -> Tensor:
    """Plain-torch stand-in for vortex's triton `apply_rotary` (NeoX halves, fp32 math)."""
    if cu_seqlens is not None or interleaved or not isinstance(seqlen_offsets, int):
        raise NotImplementedError("the CPU rotary shim covers the dense, non-interleaved case only")
    length = x.shape[1]
    rot = cos.shape[-1] * 2
    c = cos[seqlen_offsets : seqlen_offsets + length].float()[None, :, None, :]
    s = sin[seqlen_offsets : seqlen_offsets + length].float()[None, :, None, :]
    if conjugate:
        s = -s
    x0, x1 = x[..., : rot // 2].float(), x[..., rot // 2 : rot].float()
    rotated = torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).to(x.dtype)
    out = x if inplace else x.clone()
    out[..., :rot] = rotated
    return out


def install_vortex_cpu_shim() -> None:
    """Idempotent: make `import vortex.model.model` work on a CPU-only torch."""
    if "vortex.ops.embedding.rotary" not in sys.modules:
        stub = types.ModuleType("vortex.ops.embedding.rotary")
        stub.apply_rotary = _cpu_apply_rotary
        sys.modules["vortex.ops.embedding.rotary"] = stub
    if not torch.cuda.is_available():
        torch.cuda.device = lambda *args, **kwargs: contextlib.nullcontext()


def run_vtx(
    vortex_state: dict[str, Tensor], config: dict, input_ids: Tensor, workdir: Path
) -> Tensor:
    """Save `vortex_state` as a vortex file, load it with vtx's own loader, return fp32 logits."""
    install_vortex_cpu_shim()
    logging.getLogger().setLevel(logging.WARNING)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(workdir)  # `import vortex` creates ./activations_debug.log
    try:
        from vortex.model.model import StripedHyena
        from vortex.model.utils import dotdict, load_checkpoint

        path = workdir / "vortex.pt"
        torch.save(vortex_state, path)
        model = StripedHyena(dotdict(config))
        load_checkpoint(model, str(path))
        model = model.float().eval()
        with torch.no_grad():
            logits, _ = model(input_ids)
        return logits.float()
    finally:
        os.chdir(cwd)
