"""Where a task's outputs go when the command does not say (`score.output`, `generate.output`).

A checkpoint of one of our runs (the run folder, its `checkpoints/`, a `global_stepN` inside)
gets them in its own run folder: `<run>/scores/<time>/`, `<run>/generations/<time>/`. Any other
checkpoint (a release .pt, a converted folder) gets `paths.output_root/<kind>/<its name>/<time>/`.
Every call gets a fresh timestamped folder, so a second score never collides with the first.
"""

from __future__ import annotations

import time
from pathlib import Path

from evo2_hydra.errors import UserError

RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"


def run_folder_of(path: str | Path | None) -> Path | None:
    """The run folder that holds `path` (itself, or up to two levels above it), if any."""
    if not path:
        return None
    path = Path(path).expanduser()
    for candidate in (path, *list(path.parents)[:3]):
        if (candidate / RUN_CONFIG).is_file() and (candidate / CHECKPOINTS).is_dir():
            return candidate
    return None


def _checkpoint_name(path: Path) -> str:
    name = path.name or path.resolve().name
    if name.startswith("global_step"):  # name the folder above the step, not only the step
        name = f"{path.resolve().parent.name}-{name}"
    for suffix in (".pt", ".pth", ".ckpt"):
        name = name.removesuffix(suffix)
    return name or "checkpoint"


def fresh_subfolder(base: Path) -> Path:
    """`base/<YYYYmmdd-HHMMSS>`, with `-1`, `-2`, ... when that name is taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output, k = base / stamp, 0
    while output.exists():
        k += 1
        output = base / f"{stamp}-{k}"
    return output


def default_output(ckpt_path: str | None, output_root: str, kind: str) -> Path:
    """The folder a `kind` ("scores", "generations") of `ckpt_path` goes to by default."""
    run = run_folder_of(ckpt_path)
    if run is not None:
        return fresh_subfolder(run / kind)
    name = _checkpoint_name(Path(ckpt_path)) if ckpt_path else "no-checkpoint"
    return fresh_subfolder(Path(output_root) / kind / name)


def check_new_output(path: Path, key: str) -> Path:
    """An explicit output folder: refuse one that holds something (never overwrite)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{key}={path} already exists and is not empty; choose a new folder")
    return path
