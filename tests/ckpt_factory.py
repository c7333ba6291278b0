"""Random savanna checkpoints in the exact on-disk layouts, for tests of every work stream.

    path = make_random_savanna_checkpoint(tmp_path, model_cfg, context=256, layout="latest", mp=2)

Keys and shapes come from the model (`expected_state_dict_shapes`), plus TransformerEngine-style
`_extra_state` entries (io.BytesIO, as in real files). Values are random but plausible: hcm `h` are
signed powers of two (so the bf16 product h*decay is exact, see docs/model.md), `decay` follows
savanna's exp(-r t), hcl `t` is float32 arange, `inv_freq` is RoPE's 1/base^(2i/d), norms near 1.
Top-level keys mimic a DeepSpeed/savanna model-state file, including numpy RNG state.
"""

from __future__ import annotations

import io
import math
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from evo2_hydra.checkpoint.mp import split_mp
from evo2_hydra.config import ModelConfig
from evo2_hydra.model import expected_state_dict_shapes

EXTRA_STATE_SUFFIXES = ("mixer.dense_projection", "mixer.dense", "mlp.w1", "mlp.w2", "mlp.w3")


def random_savanna_module(
    model_cfg: ModelConfig,
    context: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    extra_state: bool = True,
) -> dict[str, object]:
    """An MP=1 savanna `module` state dict with random values (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    module: dict[str, object] = OrderedDict()
    for key, shape in expected_state_dict_shapes(model_cfg, context).items():
        if key.endswith("mixer.mixer.filter.h"):
            exponent = torch.randint(-6, 1, shape, generator=gen).to(torch.float32)
            sign = torch.randint(0, 2, shape, generator=gen).to(torch.float32) * 2 - 1
            value = (sign * torch.pow(2.0, exponent)).to(dtype)
        elif key.endswith("mixer.mixer.filter.decay"):
            rates = torch.logspace(-2, 2, shape[0]).view(-1, 1)
            t = torch.linspace(0, 1, shape[1]).view(1, -1)
            value = torch.exp(-rates * t).to(dtype)
        elif key.endswith("mixer.mixer.filter.t"):
            value = torch.arange(shape[-1], dtype=torch.float32).view(shape)
        elif key.endswith("rotary_emb.inv_freq"):
            d = 2 * shape[0]
            value = (1.0 / model_cfg.rope_base ** (torch.arange(0, d, 2).float() / d)).to(dtype)
        elif key.endswith("norm.weight"):
            value = (1 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        elif key.endswith("filter.p"):
            value = (-1 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        elif key.endswith("filter.gamma"):
            value = (
                torch.empty(shape).uniform_(math.log(0.01), math.log(0.1), generator=gen).to(dtype)
            )
        else:
            value = (0.05 * torch.randn(shape, generator=gen)).to(dtype)
        module[key] = value
        if extra_state and key.endswith(tuple(s + ".weight" for s in EXTRA_STATE_SUFFIXES)):
            module[key.removesuffix(".weight") + "._extra_state"] = io.BytesIO(b"te-fp8-meta")
    return module


def _top_level(module: dict, *, iteration: int, mp: int, model_cfg: ModelConfig) -> dict:
    """What a savanna/DeepSpeed `mp_rank_XX_model_states.pt` holds around `module`."""
    np.random.seed(0)
    return {
        "module": module,
        "buffer_names": [k for k in module if k.endswith(("decay", ".t", "inv_freq"))],
        "optimizer": None,
        "param_shapes": OrderedDict(
            (k, torch.Size(v.shape)) for k, v in module.items() if isinstance(v, torch.Tensor)
        ),
        "lr_scheduler": {
            "start_lr": 1e-5,
            "warmup_iter": 10,
            "num_iters": iteration,
            "decay_style": "cosine",
        },
        "dp_world_size": 4,
        "mp_world_size": mp,
        "ds_version": "0.14.4",
        "global_steps": iteration,
        "iteration": iteration,
        "args": {
            "num_layers": model_cfg.num_layers,
            "hidden_size": model_cfg.hidden_size,
            "num_attention_heads": model_cfg.num_attention_heads,
            "model_parallel_size": mp,
            "tokenizer_type": "CharLevelTokenizer",
        },
        "data_loading": {"train_data_token_index": 0},
        "np_rng_state": np.random.get_state(),
        "random_rng_state": random.Random(0).getstate(),
        "torch_rng_state": torch.get_rng_state(),
    }


def make_random_savanna_checkpoint(
    tmp_path: str | Path,
    model_cfg: ModelConfig,
    context: int,
    *,
    layout: str = "single",
    mp: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    iteration: int = 7,
) -> Path:
    """Write a random checkpoint under `tmp_path` and return what a user would pass as ckpt.path.

    layout "single": `tmp_path/savanna_<model>.pt` (the downloaded release file; needs mp=1);
    "step": `tmp_path/global_step<iteration>/` with one `mp_rank_XX_model_states.pt` per MP rank;
    "latest": `tmp_path/save/` holding `latest` and that step folder.
    """
    tmp_path = Path(tmp_path)
    module = random_savanna_module(model_cfg, context, dtype=dtype, seed=seed)
    shards = split_mp(module, mp)
    if layout == "single":
        if mp != 1:
            raise ValueError("a single-file checkpoint has one MP rank")
        path = tmp_path / f"savanna_{model_cfg.name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(_top_level(module, iteration=iteration, mp=1, model_cfg=model_cfg), path)
        return path
    save_dir = tmp_path / "save" if layout == "latest" else tmp_path
    step_dir = save_dir / f"global_step{iteration}"
    step_dir.mkdir(parents=True, exist_ok=True)
    for rank, shard in enumerate(shards):
        payload = _top_level(shard, iteration=iteration, mp=mp, model_cfg=model_cfg)
        torch.save(payload, step_dir / f"mp_rank_{rank:02d}_model_states.pt")
    if layout == "step":
        return step_dir
    if layout == "latest":
        (save_dir / "latest").write_text(step_dir.name)
        return save_dir
    raise ValueError(f"layout={layout!r}: expected single, step or latest")
