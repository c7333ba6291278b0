"""target=savanna: re-save a checkpoint as a savanna/DeepSpeed folder, resized to `ckpt.context`.

    python convert.py target=savanna source=savanna_evo2_7b.pt model=evo2_7b ckpt=savanna_evo2_7b \
        ckpt.context=4096 output=ckpts/evo2_7b_4k

The source is checked against the model and preset (source context, MLP width, every key), then
written tensor by tensor from its memory map by the conversion package (convert/targets.py,
convert/reshard.py): `target.mp=N` merges or splits model-parallel shards, `target.dtype` casts,
ZeRO-3 folders are gathered and vortex files imported.
"""

from __future__ import annotations

from pathlib import Path

from evo2_hydra.config import ConvertConfig


def convert_savanna(conv: ConvertConfig, source: Path, output: Path) -> Path:
    """target=savanna: re-save through the streaming savanna writer (convert/targets.py)."""
    # Streaming writer of the conversion package: also MP split (target.mp), dtype cast,
    # ZeRO-3 and vortex sources, verify and the output manifest.
    from evo2_hydra.convert.targets import convert_savanna_streaming

    return convert_savanna_streaming(conv, source, output)
