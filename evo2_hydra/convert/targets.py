"""convert.py targets: vortex, nemo and savanna, each a thin layer over checkpoint/.

Each target: open the source memory-mapped (`source.py`), check it against the model, write into a
temporary folder next to `output` tensor by tensor with a progress bar, optionally verify (run the
fixed probe through source and re-imported result), write `manifest.json`, then rename the folder
into place. Any error before the rename leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from evo2_hydra.checkpoint import nemo_io
from evo2_hydra.checkpoint.adapters import nemo as nemo_format
from evo2_hydra.checkpoint.adapters import vortex as vortex_format
from evo2_hydra.checkpoint.loader import load_module_state_dict
from evo2_hydra.checkpoint.manifest import write_export_manifest
from evo2_hydra.checkpoint.mp import check_mp_size
from evo2_hydra.checkpoint.prepare import check_checkpoint
from evo2_hydra.checkpoint.resize import context_width
from evo2_hydra.checkpoint.stream import (
    BackgroundCrc32,
    TorchSaveStream,
    conversion_progress,
    return_freed_memory_to_os,
    tensor_nbytes,
)
from evo2_hydra.checkpoint.writer import write_savanna_dir
from evo2_hydra.config import CastDtype, ConvertConfig, ModelConfig
from evo2_hydra.convert.source import Source, load_source
from evo2_hydra.convert.verify import max_logit_difference, should_verify
from evo2_hydra.errors import UserError
from evo2_hydra.io_utils import atomic_dir

log = logging.getLogger("evo2_hydra.convert")


def checked_state(src: Source) -> Mapping[str, Any]:
    """The MP=1 source state dict after checking every key and shape against the model."""
    state = src.merged()
    pad_to = check_checkpoint(src.shapes(), src.describe(), src.ckpt, src.model)
    if pad_to is not None:
        raise UserError(
            "ckpt.pad_mlp=true: MLP padding is a target=savanna feature; pad first, then export"
        )
    return state


def source_bytes(src: Source) -> int:
    """Bytes of the source tensors at their stored dtypes (the progress bar's scale)."""
    sizes = {torch.float32: 4, torch.bfloat16: 2}
    first = src.shards[0]
    total = 0
    for key, shape in src.shapes().items():
        value = first[key] if not hasattr(first, "shapes") else None
        size = value.element_size() if isinstance(value, Tensor) else sizes[torch.float32]
        total += math.prod(shape) * size
    return total


def _verify(
    conv: ConvertConfig, src: Source, state: Mapping[str, Any], reimport, *, fold_hcm=False
):
    if not should_verify(conv.verify, src.model):
        return None
    return max_logit_difference(state, reimport(), src.model, fold_hcm=fold_hcm)


# ------------------------------------------------------------------------------------------------
# vortex


def write_vortex_file(path: Path, state: Mapping[str, Any], cfg: ModelConfig, progress) -> dict:
    """Stream a vortex state dict into one .pt file; returns what was written per key."""
    written = {}
    with TorchSaveStream(path) as out:
        refs = {}
        for key, tensor in vortex_format.savanna_to_vortex(state, cfg):
            refs[key] = out.add(tensor)
            written[key] = (
                tuple(tensor.shape),
                str(tensor.dtype).removeprefix("torch."),
                refs[key].crc32,
            )
            progress.update(tensor_nbytes(tensor))
        out.finish(refs)  # a flat dict: the vortex file format (vortex `load_checkpoint`)
    return written


def convert_vortex(conv: ConvertConfig, source: Path, output: Path) -> Path:
    """target=vortex: export the source as the .pt + .yml that evo2/vtx load."""
    return_freed_memory_to_os()
    src = load_source(conv, source)
    if src.kind == "vortex":
        raise UserError(
            f"source={source} is already a vortex file; target=vortex would only copy it "
            "(target=savanna imports it for finetuning)"
        )
    state = checked_state(src)
    cfg = src.model
    width = context_width(src.shapes(), src.describe()) or cfg.hcm_filter_len
    with atomic_dir(output, overwrite=conv.overwrite) as tmp:
        pt, config = tmp / f"{cfg.name}.pt", tmp / f"{cfg.name}.yml"
        progress = conversion_progress(source_bytes(src), "vortex")
        with progress:
            written = write_vortex_file(pt, state, cfg, progress)
        config.write_text(vortex_format.vortex_config_yaml(cfg, cfg.max_context))

        def reimport():
            vortex_state = torch.load(pt, map_location="cpu", mmap=True, weights_only=True)
            return dict(vortex_format.vortex_to_savanna(vortex_state, context=width))

        diff = _verify(conv, src, state, reimport, fold_hcm=True)
        write_export_manifest(
            tmp,
            source=src.describe(),
            target="vortex",
            tensors=written,
            extra={"model": cfg.name, "verify_max_logit_diff": diff},
        )
    log.info("vortex: wrote %s and %s", output / pt.name, output / config.name)
    return output


# ------------------------------------------------------------------------------------------------
# nemo


def convert_nemo(conv: ConvertConfig, source: Path, output: Path) -> Path:
    """target=nemo: export the source as a NeMo2 checkpoint folder."""
    return_freed_memory_to_os()
    src = load_source(conv, source)
    state = checked_state(src)
    cfg = src.model
    with atomic_dir(output, overwrite=conv.overwrite) as tmp:
        progress = conversion_progress(
            nemo_io.nemo_total_bytes(src.shapes(), cfg), f"nemo ({conv.target.format.value})"
        )
        crcs: dict[str, Future] = {}
        checksums = BackgroundCrc32()

        def written_one(key: str, tensor: Tensor) -> None:  # called by the (one) writer thread
            crcs[key] = checksums.submit(tensor)
            progress.update(tensor_nbytes(tensor))

        with progress, contextlib.closing(checksums):
            written = nemo_io.write_nemo_checkpoint(
                tmp,
                state,
                cfg,
                src.shapes(),
                fmt=conv.target.format,
                model_size=conv.target.model_size,
                context=src.ckpt.context,
                on_tensor=written_one,
            )

        def reimport():
            weights = nemo_io.read_nemo_weights(tmp / "weights", conv.target.format)
            return nemo_format.nemo_to_savanna(weights, cfg)

        diff = _verify(conv, src, state, reimport)
        write_export_manifest(
            tmp,
            source=src.describe(),
            target=f"nemo/{conv.target.format.value}",
            tensors={k: (*v, crcs[k].result()) for k, v in written.items()},
            extra={"model": cfg.name, "verify_max_logit_diff": diff},
        )
    log.info("nemo: wrote %s (%s)", output, conv.target.format.value)
    return output


# ------------------------------------------------------------------------------------------------
# savanna


def with_context(run_config_yaml: str | None, context: int) -> str | None:
    """The source's saved run config, its `ckpt.context` set to what the tensors now are (the
    text unchanged when it already agrees).
    """
    if run_config_yaml is None:
        return None
    saved = yaml.safe_load(run_config_yaml)
    ckpt = saved.get("ckpt") if isinstance(saved, dict) else None
    if not isinstance(ckpt, dict) or ckpt.get("context") == context:
        return run_config_yaml
    ckpt["context"] = context
    return yaml.safe_dump(saved, sort_keys=False)


def described_config(conv: ConvertConfig, cfg: ModelConfig) -> str:
    """`configs/config.yaml` for a source without one: this conversion's config, resolved model."""
    from omegaconf import OmegaConf

    resolved = dataclasses.replace(conv, model=cfg)
    return OmegaConf.to_yaml(OmegaConf.structured(resolved))


CAST_DTYPES = {CastDtype.bfloat16: torch.bfloat16, CastDtype.float32: torch.float32}


def convert_savanna(conv: ConvertConfig, source: Path, output: Path) -> Path:
    """Re-save as savanna: MP merge/split (`target.mp`), resize to `ckpt.context`, dtype cast.

    Sources: savanna files (any MP), ZeRO-3 folders (gathered to full fp32 tensors), vortex files
    (imported). The result is `output/latest` + `output/global_stepN/mp_rank_XX_model_states.pt`,
    written by the one savanna writer (checkpoint/writer.py).
    """
    return_freed_memory_to_os()
    src = load_source(conv, source)
    cfg = src.model
    state = src.merged()
    pad_to = check_checkpoint(src.shapes(), src.describe(), src.ckpt, cfg)
    mp_out = conv.target.mp or len(src.shards)
    check_mp_size(cfg, mp_out)
    context = src.ckpt.context
    log.info(
        "savanna: %s -> %s (MP %d -> %d, context -> %d, dtype %s)",
        src.describe(), output, len(src.shards), mp_out, context, conv.target.dtype.value,
    )  # fmt: skip
    with atomic_dir(output, overwrite=conv.overwrite) as tmp:
        written = write_savanna_dir(
            tmp,
            src.shards,
            mp_out=mp_out,
            iteration=src.iteration,
            context=context,
            pad_to=pad_to,
            dtype=CAST_DTYPES.get(conv.target.dtype),
            interleave_legacy=conv.ckpt.interleave_legacy,
            args=src.args,
            run_config_yaml=with_context(src.run_config_yaml, context)
            or described_config(dataclasses.replace(conv, ckpt=src.ckpt), cfg),
            desc=f"savanna (MP {mp_out})",
        )

        def reimport():
            return load_module_state_dict(tmp)[0]

        diff = _verify(conv, src, state, reimport)
        write_export_manifest(
            tmp,
            source=src.describe(),
            target=f"savanna/mp{mp_out}",
            tensors=written,
            extra={"model": cfg.name, "verify_max_logit_diff": diff},
        )
    return output
