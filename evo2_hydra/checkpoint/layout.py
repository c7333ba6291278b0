"""Find the checkpoint files behind whatever `ckpt.path` points at; never modifies the source.

Accepted layouts (savanna `savanna/checkpointing.py`, DeepSpeed's checkpoint folders):
- a single `.pt` file as downloaded (`savanna_evo2_7b.pt`), or one `mp_rank_XX_model_states.pt`;
- a `global_stepN` folder holding `mp_rank_XX_model_states.pt` (one per model-parallel rank), or
  ZeRO-3 `zero_pp_rank_R_mp_rank_XX_model_states.pt` files (detected, gathered by convert.py);
- a folder holding `latest` (DeepSpeed's save folder);
- one of our run folders (its `checkpoints/` save folder, then as above);
- a folder with `global_stepN` subfolders but no `latest` (the newest step is taken, as savanna's
  `read_global_step` does), or a folder with exactly one `.pt` file.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from evo2_hydra.checkpoint.hub import local_checkpoint_path
from evo2_hydra.checkpoint.megatron import detect_megatron
from evo2_hydra.checkpoint.parts import part_set, part_sets_in
from evo2_hydra.errors import UserError

log = logging.getLogger(__name__)

LATEST = "latest"
# Where a finetune run keeps its DeepSpeed save folder inside the run folder.
RUN_CHECKPOINT_SUBDIR = "checkpoints"
STEP_DIR_RE = re.compile(r"^global_step(\d+)$")
MP_FILE_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
ZERO3_FILE_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
LATEST_MAX_BYTES = 256  # "global_stepN" and nothing else


@dataclass
class CheckpointLocation:
    """The files of one checkpoint, as found on disk."""

    source: Path  # what the user gave
    kind: str  # "file" | "step_dir"
    step_dir: Path | None  # the global_stepN folder (None for a lone file)
    iteration: int | None  # N of global_stepN, when the layout says it
    model_files: list[Path]  # model-state files, index = MP rank
    zero3_files: dict[int, list[Path]] = field(default_factory=dict)  # mp rank -> files by dp rank

    @property
    def mp(self) -> int:
        return len(self.model_files) or len(self.zero3_files)

    @property
    def is_zero3(self) -> bool:
        return not self.model_files and bool(self.zero3_files)

    def describe(self) -> str:
        where = self.step_dir if self.step_dir is not None else self.source
        if self.is_zero3:
            dp = len(next(iter(self.zero3_files.values())))
            return f"{where} (ZeRO-3, MP={self.mp}, {dp} data-parallel shards)"
        return f"{where} (MP={self.mp}{'' if self.iteration is None else f', iteration {self.iteration}'})"


def _step_number(path: Path) -> int | None:
    m = STEP_DIR_RE.match(path.name)
    return int(m.group(1)) if m else None


def _scan_step_dir(step_dir: Path, source: Path) -> CheckpointLocation:
    mp_files: dict[int, Path] = {}
    zero3: dict[int, dict[int, Path]] = {}
    for f in step_dir.iterdir():
        if m := MP_FILE_RE.match(f.name):
            mp_files[int(m.group(1))] = f
        elif m := ZERO3_FILE_RE.match(f.name):
            zero3.setdefault(int(m.group(2)), {})[int(m.group(1))] = f
    if not mp_files and not zero3:
        raise UserError(
            f"{step_dir}: no model-state file (expected mp_rank_00_model_states.pt or "
            "zero_pp_rank_0_mp_rank_00_model_states.pt)"
        )
    if mp_files:
        ranks = sorted(mp_files)
        if ranks != list(range(len(ranks))):
            missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
            raise UserError(
                f"{step_dir}: model-parallel shards incomplete: mp_rank_{missing[0]:02d}_model_states.pt "
                f"is missing (found ranks {ranks})"
            )
        files = [mp_files[r] for r in ranks]
        zero3_files: dict[int, list[Path]] = {}
    else:
        files = []
        zero3_files = {mp: [by_dp[d] for d in sorted(by_dp)] for mp, by_dp in sorted(zero3.items())}
    return CheckpointLocation(
        source=source,
        kind="step_dir",
        step_dir=step_dir,
        iteration=_step_number(step_dir),
        model_files=files,
        zero3_files=zero3_files,
    )


def read_latest(save_dir: Path) -> Path:
    """The step folder `save_dir/latest` names, checked to be a `global_stepN` folder inside it.

    Refuses a `latest` that is not a small regular file (a directory, a link loop), names anything
    but a step folder of `save_dir` (`../../other/checkpoints/global_step2`), or a missing one.
    """
    latest = save_dir / LATEST
    try:
        if not latest.is_file():
            kind = "a directory" if latest.is_dir() else "missing or a broken/looping link"
            raise UserError(f"{latest}: {kind}, expected a file naming a step (global_stepN)")
        with latest.open("rb") as fh:
            raw = fh.read(LATEST_MAX_BYTES + 1)
    except OSError as err:
        raise UserError(f"{latest}: unreadable ({err.strerror or err})") from None
    tag = raw.decode("utf-8", "replace").strip()
    if len(raw) > LATEST_MAX_BYTES or not STEP_DIR_RE.match(tag):
        raise UserError(
            f"{latest}: names {tag[:80]!r}; expected a step folder of {save_dir} such as "
            "global_step100"
        )
    step_dir = save_dir / tag
    if step_dir.is_symlink() or not step_dir.is_dir():
        raise UserError(f"{latest}: names step '{tag}', but {step_dir} is not a folder there")
    return step_dir


def step_dirs(save_dir: Path) -> list[Path]:
    """global_stepN subfolders, oldest first (by N, not by name)."""
    found = [
        (n, p) for p in save_dir.iterdir() if p.is_dir() and (n := _step_number(p)) is not None
    ]
    return [p for _, p in sorted(found)]


def locate_checkpoint(path: str | Path) -> CheckpointLocation:
    """Detect the layout at `path` and list its files (see the module docstring).

    Raises:
        UserError: nothing at `path`, no checkpoint inside, `latest` naming a missing step, or
            incomplete model-parallel shards.
    """
    source = local_checkpoint_path(path)  # hf://ORG/REPO[@REV][/FILE] -> its cached file (hub.py)
    if (parts := part_set(source)) is not None:  # NAME.pt.part0..N, read as one file (parts.py)
        return CheckpointLocation(source, "file", None, None, [parts.parts[0]])
    if (megatron := detect_megatron(source)) is not None:  # NeMo2 / Megatron-Bridge (megatron.py)
        return CheckpointLocation(
            source, "megatron", None, megatron.iteration, [megatron.weights / "metadata.json"]
        )
    if not source.exists():
        raise UserError(f"ckpt.path={source}: no such file or folder")
    if source.is_file():
        if MP_FILE_RE.match(source.name) and _step_number(source.parent) is not None:
            siblings = [f for f in source.parent.iterdir() if MP_FILE_RE.match(f.name)]
            if len(siblings) > 1:  # one shard of an MP checkpoint: take the whole step
                return _scan_step_dir(source.parent, source)
        return CheckpointLocation(
            source=source,
            kind="file",
            step_dir=None,
            iteration=_step_number(source.parent),
            model_files=[source],
        )
    if _step_number(source) is not None:
        return _scan_step_dir(source, source)
    for save_dir in (source, source / RUN_CHECKPOINT_SUBDIR):
        if os.path.lexists(save_dir / LATEST):  # present: must be valid (never guessed past)
            return _scan_step_dir(read_latest(save_dir), source)
    for save_dir in (source, source / RUN_CHECKPOINT_SUBDIR):
        if save_dir.is_dir() and (steps := step_dirs(save_dir)):
            log.info(
                "%s has no `latest`; using the newest step folder %s", save_dir, steps[-1].name
            )
            return _scan_step_dir(steps[-1], source)
    pt_files = sorted(source.glob("*.pt")) or part_sets_in(source)
    if len(pt_files) == 1:
        return locate_checkpoint(pt_files[0])
    if len(pt_files) > 1:
        raise UserError(
            f"ckpt.path={source}: {len(pt_files)} .pt files and no `latest` or global_stepN folder; "
            "point ckpt.path at one file"
        )
    raise UserError(
        f"ckpt.path={source}: no checkpoint found (expected a .pt file, a global_stepN folder, "
        "a folder holding `latest`, or a run folder with checkpoints/)"
    )


def newest_run(output_root: Path) -> Path:
    """The run folder under `output_root` whose `checkpoints/latest` was written last."""
    candidates = [
        p.parent.parent
        for p in Path(output_root).rglob(f"{RUN_CHECKPOINT_SUBDIR}/{LATEST}")
        if p.is_file() and p.parent.name == RUN_CHECKPOINT_SUBDIR
    ]
    if not candidates:
        raise UserError(
            f"source is not set and no run with checkpoints was found under "
            f"paths.output_root={output_root}; give source=PATH"
        )
    return max(
        candidates, key=lambda run: (run / RUN_CHECKPOINT_SUBDIR / LATEST).stat().st_mtime_ns
    )
