"""target=savanna: re-save a checkpoint as a savanna/DeepSpeed folder, resized to `ckpt.context`.

    python convert.py target=savanna source=savanna_evo2_7b.pt model=evo2_7b ckpt=savanna_evo2_7b \
        ckpt.context=4096 output=ckpts/evo2_7b_4k

The source is checked against the model and preset (source context, MLP width, every key), then
written shard by shard from its memory map (see evo2_hydra/checkpoint/prepare.py). The MP layout
is kept (`savanna.mp=1` merges shards); other MP counts and dtype casts are the conversion
package's features.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from evo2_hydra.checkpoint.layout import locate_checkpoint
from evo2_hydra.checkpoint.loader import load_shards, shard_shapes
from evo2_hydra.checkpoint.mp import merged_shapes
from evo2_hydra.checkpoint.prepare import check_checkpoint, resize_to_dir
from evo2_hydra.checkpoint.resize import context_width
from evo2_hydra.config import CastDtype, ConvertConfig
from evo2_hydra.errors import UserError

log = logging.getLogger("evo2_hydra.convert")


def convert_savanna(conv: ConvertConfig, source: Path, output: Path) -> Path:
    location = locate_checkpoint(source)
    mp_out = conv.savanna.mp or location.mp
    if mp_out not in (1, location.mp):
        raise UserError(f"savanna.mp={mp_out}: resharding to MP>1 is not available in this build")
    if conv.savanna.dtype != CastDtype.keep:
        raise UserError(
            f"savanna.dtype={conv.savanna.dtype.value}: casting is not available in this build"
        )
    shards = load_shards(location, trust_pickle=conv.ckpt.trust_pickle)
    shapes = merged_shapes(shard_shapes(shards))
    pad_to = check_checkpoint(shapes, location.describe(), conv.ckpt, conv.model)
    width = context_width(shapes, location.describe())
    iteration = shards[0].get("iteration")
    iteration = (
        iteration if isinstance(iteration, int) and iteration >= 1 else (location.iteration or 1)
    )
    log.info(
        "savanna: %s -> %s (context %s -> %d, MP %d -> %d, iteration %d)",
        location.describe(), output, width, conv.ckpt.context, location.mp, mp_out, max(1, iteration),
    )  # fmt: skip
    return resize_to_dir(
        shards,
        output,
        conv.ckpt.context,
        iteration=max(1, iteration),
        merge=mp_out == 1,
        interleave_legacy=conv.ckpt.interleave_legacy,
        pad_to=pad_to,
        overwrite=conv.overwrite,
        run_config_yaml=OmegaConf.to_yaml(OmegaConf.structured(conv)),
    )
