"""Write a savanna save folder key by key: MP merge/split, context resize, MLP pad, dtype cast.

Every source shard stays memory-mapped (or, for ZeRO-3, gathered lazily); for each key the full
tensor is formed once (`cat` of the source shards along the key's partition dim, spec savanna.md
§2.5), transformed, and its `target.mp` chunks are streamed into the open output files at once.
So peak memory is about one full tensor, whatever the model size. `cat` and `chunk` move bytes
without arithmetic, which is why MP N -> M -> N round-trips byte-exactly.

An MP size must divide every partitioned dimension: hidden size, attention heads (whole heads per
rank), every filter group count, the MLP width and the vocabulary.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evo2_hydra.checkpoint.layout import LATEST
from evo2_hydra.checkpoint.legacy import interleave_rows
from evo2_hydra.checkpoint.mp import partition_dim
from evo2_hydra.checkpoint.resize import (
    ScratchAllocator,
    filter_t,
    is_context_key,
    resize_hcm_tensor,
)
from evo2_hydra.checkpoint.stream import TensorRef, TorchSaveStream, conversion_progress
from evo2_hydra.checkpoint.writer import MANIFEST, mp_file_name, step_tag
from evo2_hydra.config import CastDtype, ModelConfig
from evo2_hydra.errors import UserError

CAST_DTYPES = {CastDtype.bfloat16: torch.bfloat16, CastDtype.float32: torch.float32}
# savanna reassigns the hcl time buffer as float32 whatever the model dtype.
KEEP_FLOAT32 = ("mixer.mixer.filter.t",)
# Tensors formed ahead of the writer thread (each up to one full tensor of memory).
WRITE_AHEAD = 2
LEGACY_SUFFIXES = ("mixer.hyena_proj_conv.short_conv_weight", "mixer.dense_projection.weight")


def valid_mp_sizes(cfg: ModelConfig) -> list[int]:
    """Model-parallel sizes that divide every partitioned dimension of this model."""
    dims = _partitioned_dims(cfg)
    return [
        m for m in range(1, cfg.num_attention_heads + 1) if all(v % m == 0 for v in dims.values())
    ]


def _partitioned_dims(cfg: ModelConfig) -> dict[str, int]:
    return {
        "num_attention_heads": cfg.num_attention_heads,
        "hidden_size": cfg.hidden_size,
        "hcs_groups": cfg.hcs_groups,
        "hcm_groups": cfg.hcm_groups,
        "hcl_groups": cfg.hcl_groups,
        "mlp_inner_size": cfg.mlp_inner_size,
        "vocab_size": cfg.vocab_size,
    }


def check_mp_size(cfg: ModelConfig, mp: int) -> None:
    """Refuse an MP size that does not split every partitioned dimension evenly."""
    bad = {k: v for k, v in _partitioned_dims(cfg).items() if v % mp}
    if bad:
        name, value = next(iter(bad.items()))
        others = (
            f" (also {', '.join(f'{k}={v}' for k, v in list(bad.items())[1:])})"
            if len(bad) > 1
            else ""
        )
        raise UserError(
            f"target.mp={mp}: model={cfg.name} has {name}={value}, not divisible by {mp}{others}; "
            f"model-parallel sizes that divide heads, hidden size, groups, MLP and vocabulary: "
            f"{valid_mp_sizes(cfg)}"
        )


def cast(key: str, value: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Cast a floating tensor to `dtype`, except the ones savanna keeps in float32."""
    if dtype is None or not value.is_floating_point() or key.endswith(KEEP_FLOAT32):
        return value
    return value.to(dtype)


def full_tensor(
    key: str, values: Sequence[Tensor], *, legacy_keys: frozenset[str] = frozenset()
) -> Tensor:
    """The MP=1 tensor of `key` from its per-rank pieces.

    Keys in `legacy_keys` (featurizer rows of Hyena layers with `ckpt.interleave_legacy`) are
    interleaved per piece first: the legacy [x1 | x2 | v] blocks are per MP rank (savanna.md §1.5).
    """
    if key in legacy_keys:
        values = [interleave_rows(v) for v in values]
    dim = partition_dim(key)
    if len(values) == 1 or dim is None:
        return values[0]
    return torch.cat(list(values), dim=dim)


def legacy_projection_keys(keys: Sequence[str]) -> frozenset[str]:
    """Featurizer conv and projection keys of every Hyena layer (attention layers have no conv)."""
    conv = "mixer.hyena_proj_conv.short_conv_weight"
    prefixes = [k[: -len(conv)] for k in keys if k.endswith(conv)]
    return frozenset(
        [p + conv for p in prefixes] + [p + "mixer.dense_projection.weight" for p in prefixes]
    )


def pad_mlp_tensor(key: str, value: Tensor, width: int | None) -> Tensor:
    """Zero-pad an MLP weight to `width` (the 1M releases' layout); other tensors unchanged."""
    if width is None:
        return value
    if key.endswith(("mlp.w1.weight", "mlp.w2.weight")) and value.shape[0] < width:
        out = value.new_zeros((width, value.shape[1]))
        out[: value.shape[0]] = value
        return out
    if key.endswith("mlp.w3.weight") and value.shape[1] < width:
        out = value.new_zeros((value.shape[0], width))
        out[:, : value.shape[1]] = value
        return out
    return value


def write_savanna_dir(
    tmp_out: Path,
    shards: Sequence[Mapping[str, Any]],
    *,
    mp_out: int,
    iteration: int,
    context: int | None = None,
    pad_to: int | None = None,
    dtype: torch.dtype | None = None,
    interleave_legacy: bool = False,
    args: Mapping[str, Any] | None = None,
    run_config_yaml: str | None = None,
    desc: str = "savanna",
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Fill `tmp_out` (an empty folder) with `global_stepN/mp_rank_XX_model_states.pt` + `latest`.

    Returns key -> (MP=1 shape, dtype) of what was written.
    """
    tag = step_tag(iteration)
    step = tmp_out / tag
    step.mkdir(parents=True)
    allocator = ScratchAllocator(tmp_out)
    keys = list(shards[0])
    legacy = legacy_projection_keys(keys) if interleave_legacy else frozenset()
    outs = [TorchSaveStream(step / mp_file_name(r)) for r in range(mp_out)]
    modules: list[dict[str, Any]] = [collections.OrderedDict() for _ in range(mp_out)]
    shapes: list[dict[str, torch.Size]] = [collections.OrderedDict() for _ in range(mp_out)]
    written: dict[str, tuple[tuple[int, ...], str]] = {}
    progress = conversion_progress(
        sum(isinstance(shards[0][k], Tensor) for k in keys), desc, unit="tensor"
    )
    # One writer thread streams tensor i into the files (write_record and the CRC32 release the
    # GIL) while this thread forms, resizes and casts tensor i+1; jobs run in submission order,
    # so the files are byte-for-byte what a single thread writes. At most WRITE_AHEAD tensors
    # wait, so memory stays at a few tensors.
    pending: collections.deque[Future] = collections.deque()

    def submit(job) -> None:
        if len(pending) >= WRITE_AHEAD:
            pending.popleft().result()
        pending.append(writer.submit(job))

    def write_pieces(key: str, pieces: Sequence[Tensor]) -> None:
        for rank, piece in enumerate(pieces):
            modules[rank][key] = outs[rank].add(piece)
            shapes[rank][key] = torch.Size(piece.shape)
        progress.update(1)

    def keep_object(key: str, value: Any) -> None:
        for module in modules:  # TE extra state: rank 0's, as savanna's resharding tool
            module[key] = value

    writer = ThreadPoolExecutor(1)
    try:
        for key in keys:
            first = shards[0][key]
            if not isinstance(first, Tensor) or key.endswith("._extra_state"):
                submit(lambda key=key, first=first: keep_object(key, first))
                continue
            value = full_tensor(key, [first] + [s[key] for s in shards[1:]], legacy_keys=legacy)
            # Resize only what changes width: a same-width source keeps its bytes (MP round trips).
            if context is not None and is_context_key(key) and value.shape[-1] != context:
                value = (
                    filter_t(context)
                    if key.endswith("filter.t")
                    else resize_hcm_tensor(value, context, allocator)
                )
            value = cast(key, pad_mlp_tensor(key, value, pad_to), dtype)
            dim = partition_dim(key)
            if dim is not None and value.shape[dim] % mp_out:
                raise UserError(
                    f"target.mp={mp_out}: {key} {tuple(value.shape)} does not split along dim {dim}"
                )
            pieces = torch.chunk(value, mp_out, dim=dim) if dim is not None else [value] * mp_out
            submit(lambda key=key, pieces=pieces: write_pieces(key, pieces))
            written[key] = (tuple(value.shape), str(value.dtype).removeprefix("torch."))
            del value, pieces
        while pending:
            pending.popleft().result()
        run_args = dict(args or {})
        if run_args:
            run_args["model_parallel_size"] = mp_out
        for rank, out in enumerate(outs):
            out.finish(
                {
                    "module": modules[rank],
                    "param_shapes": shapes[rank],
                    "dp_world_size": 1,
                    "mp_world_size": mp_out,
                    "iteration": iteration,
                    "args": run_args,
                }
            )
    finally:
        writer.shutdown(wait=True)  # no write may still run when the files are closed
        progress.close()
        for out in outs:
            out.__exit__(None, None, None)
    if run_config_yaml is not None:
        (step / "configs").mkdir()
        (step / "configs" / "config.yaml").write_text(run_config_yaml)
    write_step_manifest(step, modules)
    (tmp_out / LATEST).write_text(tag)
    return written


def write_step_manifest(step: Path, modules: Sequence[Mapping[str, Any]]) -> None:
    """`global_stepN/manifest.json` in checkpoint/writer.py's format (its `verify_manifest` reads
    it), from the CRC32s computed while streaming instead of a second read of every file.
    """
    files = {}
    for rank, module in enumerate(modules):
        name = mp_file_name(rank)
        files[name] = {
            "bytes": (step / name).stat().st_size,
            "tensors": {
                key: {
                    "shape": list(ref.shape),
                    "dtype": str(ref.dtype).removeprefix("torch."),
                    "crc32": ref.crc32,
                }
                for key, ref in module.items()
                if isinstance(ref, TensorRef)
            },
        }
    others = {
        str(p.relative_to(step)): p.stat().st_size
        for p in sorted(step.rglob("*"))
        if p.is_file() and p.name not in files and p.name != MANIFEST
    }
    manifest = {
        "checksum": "crc32 of each tensor's bytes",
        "model_states": files,
        "other_files": others,
    }
    (step / MANIFEST).write_text(json.dumps(manifest, indent=1))
