"""Verified loading: a checkpoint is used only after it is shown to be what was written.

One path for every reader (score, generate, convert, base preparation, resume):

- `check_module` runs over each loaded `module` state dict (checkpoint/loader.py calls it for
  every model-state file): string keys, dense floating tensors (no silent int/bool/complex
  casts), finite values where asked, and, for files we wrote, each tensor's shape, dtype and
  CRC32 against the step's `manifest.json` (written by checkpoint/writer.py).
- `verify_step_dir` checks a whole saved step before DeepSpeed reads it: every `.pt` goes
  through the safe loader first (DeepSpeed's own loader unpickles with `weights_only=False`,
  i.e. would run code), every file has the size the manifest recorded, every model tensor its
  CRC32.
- `resume_step_dir` picks the step a run continues from: the one `latest` names if intact,
  else the newest intact one (with a warning; damaged steps are renamed `damaged-global_stepN`,
  never deleted, so the next save cannot overwrite them). A pickle that would run code stops the
  run instead (`UnsafePickleError`): that is tampering, not an accident.

Limits: optimizer-state files are checked for safety and size, not checksummed (the manifest
records model tensors only); files are checked, then DeepSpeed opens them again, so a process
that rewrites them in between is not caught.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evo2_hydra.checkpoint.layout import read_latest, step_dirs
from evo2_hydra.checkpoint.mapped import crc32_of
from evo2_hydra.checkpoint.run_dir import read_bounded
from evo2_hydra.checkpoint.safe_load import UnsafePickleError, safe_load
from evo2_hydra.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # checkpoint/writer.py writes it into every step folder
MAX_MANIFEST_BYTES = 64 << 20  # a 40B model's manifest is well under 1 MiB
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OPAQUE_SUFFIX = "_extra_state"  # TE FP8 metadata: BytesIO, None or a uint8 tensor, never used
DAMAGED_PREFIX = "damaged-"


class DamagedCheckpoint(UserError):
    """A file of a saved step is truncated, corrupt or differs from its manifest."""


def read_manifest(step_dir: Path) -> dict[str, Any] | None:
    """The step's manifest (None when it has none: not written by us)."""
    path = step_dir / MANIFEST
    if not os.path.lexists(path):
        return None
    try:
        manifest = json.loads(read_bounded(path, MAX_MANIFEST_BYTES))
    except (json.JSONDecodeError, UserError) as err:
        raise DamagedCheckpoint(f"{path}: unreadable manifest ({err})") from None
    states = manifest.get("model_states") if isinstance(manifest, dict) else None
    others = manifest.get("other_files", {}) if isinstance(manifest, dict) else None
    if (
        not isinstance(states, dict)
        or not isinstance(others, dict)
        or not all(
            isinstance(e, dict) and isinstance(e.get("tensors"), dict) for e in states.values()
        )
    ):
        raise DamagedCheckpoint(f"{path}: not a checkpoint manifest (no model_states/tensors)")
    return manifest


def expected_tensors(model_file: Path) -> dict[str, Any] | None:
    """What the manifest next to `model_file` records for its tensors (None: no manifest)."""
    manifest = read_manifest(model_file.parent)
    if manifest is None:
        return None
    entry = manifest["model_states"].get(model_file.name)
    if entry is None:
        raise DamagedCheckpoint(f"{model_file}: not listed in {model_file.parent / MANIFEST}")
    return entry["tensors"]


def _describe(tensor: Tensor) -> dict[str, Any]:
    return {
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).replace("torch.", ""),
        "crc32": f"{crc32_of(tensor.detach()):08x}",
    }


# Exponent bits of each float dtype, seen as the signed integer of its width: a value is NaN or
# Inf exactly when all of them are set.
_EXPONENT = {
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}
_CHUNK = 1 << 24  # elements per pass: bounds the temporary to 64 MiB at most


def all_finite(tensor: Tensor) -> bool:
    """No NaN/Inf in a float tensor, from its exponent bits in numpy (single-threaded integer
    ops: about 20x faster than torch.isfinite on a busy CPU, and no bool copy of the tensor).
    """
    int_dtype, mask = _EXPONENT[tensor.dtype]
    flat = tensor.detach().contiguous().reshape(-1).view(int_dtype).numpy()
    for start in range(0, flat.size, _CHUNK):
        exponents = flat[start : start + _CHUNK] & mask
        if exponents.size and int(exponents.max()) == mask:
            return False
    return True


def _check_entry(key: Any, value: Any, where: str | Path) -> bool:
    """Whether `module[key]` is a weight to check further (False: opaque TE metadata)."""
    if not isinstance(key, str):
        raise UserError(f"{where}: module key {key!r} is a {type(key).__name__}, expected a string")
    if key.endswith(OPAQUE_SUFFIX):
        return False
    if not isinstance(value, Tensor):
        raise UserError(f"{where}: module['{key}'] is a {type(value).__name__}, expected a tensor")
    if value.layout != torch.strided:
        raise UserError(
            f"{where}: module['{key}'] is a {value.layout} tensor, expected a dense one"
        )
    if value.is_meta:
        raise UserError(f"{where}: module['{key}'] is a meta tensor (shape only, no values)")
    if value.dtype not in WEIGHT_DTYPES:
        raise UserError(
            f"{where}: module['{key}'] has dtype {str(value.dtype).replace('torch.', '')}, "
            "expected float16, bfloat16 or float32 weights (never cast silently)"
        )
    return True


def check_module(
    module: Mapping[Any, Any],
    where: str | Path,
    *,
    expected: Mapping[str, Any] | None = None,
    finite: bool = False,
) -> None:
    """Refuse a `module` state dict that is malformed, corrupt, or (with `finite`) not finite.

    Args:
        module: the savanna state dict of one model-state file.
        where: the file (for the error line).
        expected: the manifest's `tensors` entry for this file; each tensor's shape, dtype and
            CRC32 must match it, and no tensor may be missing or added.
        finite: also refuse NaN/Inf values (for inference: they would score silently).

    Raises:
        UserError: one line naming the file and the key (DamagedCheckpoint for a manifest
            mismatch).
    """
    seen = set()
    for key, value in module.items():
        weight = _check_entry(key, value, where)
        if expected is not None and isinstance(value, Tensor):
            seen.add(key)
            if key not in expected:
                raise DamagedCheckpoint(f"{where}: tensor '{key}' is not in the manifest")
            now = _describe(value)
            if now != expected[key]:
                what = next(
                    k for k in ("shape", "dtype", "crc32") if now[k] != expected[key].get(k)
                )
                raise DamagedCheckpoint(
                    f"{where}: tensor '{key}' does not match the manifest ({what} "
                    f"{now[what]}, recorded {expected[key].get(what)}): the file is corrupt"
                )
        if weight and finite and not all_finite(value):
            raise UserError(f"{where}: module['{key}'] holds NaN or Inf values")
    if expected is not None and (missing := sorted(set(expected) - seen)):
        raise DamagedCheckpoint(f"{where}: tensor '{missing[0]}' of the manifest is missing")


def verify_step_dir(step_dir: str | Path) -> None:
    """Show that a saved step is intact and safe before anything unpickles it unsafely.

    Raises:
        UnsafePickleError: a `.pt` would run code when loaded (stop: do not fall back).
        DamagedCheckpoint: a file is missing, truncated, corrupt or differs from the manifest.
    """
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise DamagedCheckpoint(f"{step_dir}: not a folder")
    # First: nothing here may run code, whatever else is wrong with the step.
    loaded = {}
    for f in sorted(step_dir.rglob("*.pt")):
        try:
            loaded[f] = safe_load(f)
        except UnsafePickleError:
            raise
        except UserError as err:
            raise DamagedCheckpoint(str(err)) from None
    manifest = read_manifest(step_dir)
    if manifest is None:
        raise DamagedCheckpoint(f"{step_dir}: no {MANIFEST} (every saved step has one)")
    sizes = {name: e.get("bytes") for name, e in manifest["model_states"].items()}
    sizes.update(manifest["other_files"])
    for rel, size in sizes.items():
        path = step_dir / rel
        if not path.is_file():
            raise DamagedCheckpoint(f"{path}: missing (listed in {step_dir / MANIFEST})")
        if size is not None and path.stat().st_size != size:
            raise DamagedCheckpoint(
                f"{path}: {path.stat().st_size} bytes, the manifest recorded {size} "
                "(truncated or changed)"
            )
    for name, entry in manifest["model_states"].items():
        state = loaded.get(step_dir / name)
        module = state.get("module") if isinstance(state, dict) else None
        if not isinstance(module, dict):
            raise DamagedCheckpoint(f"{step_dir / name}: no 'module' state dict")
        check_module(module, step_dir / name, expected=entry["tensors"])


def _set_aside(step: Path) -> Path:
    """Rename a damaged step (or `latest`) out of the way of saves and pruning (never delete)."""
    dest, k = step.with_name(DAMAGED_PREFIX + step.name), 0
    while os.path.lexists(dest):
        k += 1
        dest = step.with_name(f"{DAMAGED_PREFIX}{step.name}.{k}")
    os.replace(step, dest)
    return dest


def resume_step_dir(save_dir: str | Path) -> Path | None:
    """The intact step a run continues from; None when `save_dir` holds no checkpoint at all.

    `latest` (when valid) names the first candidate and older steps follow, newest first; with
    no usable `latest` (missing, a directory, a link loop, naming something outside `save_dir`
    or a missing step) every step is a candidate, newest first. Never None while steps exist.

    Raises:
        UnsafePickleError: a candidate holds a pickle that would run code.
        UserError: steps exist but none is intact.
    """
    save_dir = Path(save_dir)
    steps = step_dirs(save_dir) if save_dir.is_dir() else []
    latest_exists = os.path.lexists(save_dir / "latest")
    if not steps and not latest_exists:
        return None
    named, latest_problem = None, None
    if latest_exists:
        try:
            named = read_latest(save_dir)
        except UserError as err:
            latest_problem = str(err)
    else:
        latest_problem = f"{save_dir / 'latest'}: missing"
    if named is not None:
        number = int(named.name.removeprefix("global_step"))
        older = [s for s in steps if int(s.name.removeprefix("global_step")) < number]
        candidates = [named, *reversed(older)]
    else:
        candidates = list(reversed(steps))
    damaged: list[tuple[Path, str]] = []
    for step in candidates:
        try:
            verify_step_dir(step)
        except UnsafePickleError:
            raise
        except UserError as err:
            damaged.append((step, str(err)))
            continue
        if latest_problem is not None:
            kept = ""
            if latest_exists:  # a directory or link would block the next save's `latest`
                kept = f" (kept as {_set_aside(save_dir / 'latest').name})"
            log.warning(
                "%s%s; resuming from the newest intact step %s", latest_problem, kept, step.name
            )
        for bad, why in damaged:
            moved = _set_aside(bad)
            log.warning("%s; it is kept as %s, resuming from %s", why, moved.name, step.name)
        return step
    first = damaged[0][1] if damaged else latest_problem
    raise UserError(
        f"{save_dir}: holds checkpoints but none is intact ({first}); nothing was changed: "
        "fix or move them, or set train.resume=false to move this run's outputs aside and start over"
    )
