"""Load torch checkpoint files without running code from them.

`torch.load(weights_only=True)` only rebuilds tensors and plain containers. Real savanna/DeepSpeed
files also hold a few harmless objects (TransformerEngine FP8 metadata as `io.BytesIO`, numpy RNG
state arrays, DeepSpeed's ZeRO enum and loss scaler in optimizer files): those are on an explicit
allowlist. Anything else (a pickle that would call `os.system`, a custom class) is refused with one
line naming the file and the offending global; `trust_pickle=True` loads it anyway, with a warning.
"""

from __future__ import annotations

import argparse
import io
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evo2_hydra.checkpoint.mapped import register_loaded_checkpoint
from evo2_hydra.checkpoint.parts import PartSet, load_part_set, part_set, unsafe_globals
from evo2_hydra.errors import UserError

log = logging.getLogger(__name__)


class UnsafePickleError(UserError):
    """The file's pickle would run code (or build objects) outside the allowlist: never loaded.

    Unlike a damaged file this is not an accident, so callers must not quietly fall back to an
    older checkpoint: the run stops and the file stays for the user to inspect.
    """


def _numpy_globals() -> list[Any]:
    """numpy objects found in savanna's `np_rng_state` (numpy 1.x and 2.x module paths)."""
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list[Any] = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(core, name)
        # Files written under numpy 1.x name `numpy.core.multiarray.*`, numpy 2.x `numpy._core.*`.
        allowed += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    # numpy >= 1.25 may pickle a dtype through its class (e.g. numpy.dtypes.UInt32DType).
    for name in ("UInt32DType", "UInt8DType", "Int32DType", "Int64DType", "Float32DType",
                 "Float64DType", "BoolDType"):  # fmt: skip
        cls = getattr(getattr(np, "dtypes", None), name, None)
        if cls is not None:
            allowed.append(cls)
    return allowed


# Globals from DeepSpeed 0.19.8 optimizer-state files (verified by saving ZeRO 0/1/3 checkpoints in
# tests/test_checkpoint_safe_load.py). Imported only when a file names them: importing DeepSpeed
# costs seconds, and model-state files never need it.
_DEEPSPEED_GLOBALS = {
    "deepspeed.runtime.zero.config.ZeroStageEnum": (
        "deepspeed.runtime.zero.config",
        "ZeroStageEnum",
    ),
    "deepspeed.utils.tensor_fragment.fragment_address": (
        "deepspeed.utils.tensor_fragment",
        "fragment_address",
    ),
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": (
        "deepspeed.runtime.fp16.loss_scaler",
        "LossScaler",
    ),
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": (
        "deepspeed.runtime.fp16.loss_scaler",
        "DynamicLossScaler",
    ),
}


def base_allowlist() -> list[Any]:
    """Everything beyond torch's defaults that savanna model-state files may contain."""
    # io.BytesIO: TE `_extra_state`; argparse.Namespace: Megatron-style `args` in older files.
    return [io.BytesIO, argparse.Namespace, *_numpy_globals()]


def _allowed_names(allow: list[Any]) -> set[str]:
    names = set()
    for item in allow:
        if isinstance(item, tuple):
            names.add(item[1])
        else:
            names.add(f"{item.__module__}.{item.__qualname__}")
    return names


def _deepspeed_globals(names: list[str]) -> list[Any]:
    import importlib

    found = []
    for name in names:
        if name in _DEEPSPEED_GLOBALS:
            module, attr = _DEEPSPEED_GLOBALS[name]
            found.append(getattr(importlib.import_module(module), attr))
    return found


def _detail(text: str) -> str:
    """The informative line of torch's multi-line weights_only error (not its generic preamble)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "global" in line:
            return line
    return lines[0] if lines else "unreadable"


def _unreadable(path: Path, err: BaseException) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {first}")


def _unsafe_globals(path: Path) -> list[str]:
    """Globals the file's pickle names that torch's weights_only loader does not allow by default."""
    if not zipfile.is_zipfile(path):
        return []  # legacy or broken file: torch.load below refuses or explains it
    try:
        with open(path, "rb") as fh:
            return torch.serialization.get_unsafe_globals_in_checkpoint(fh)
    except Exception as err:  # a damaged archive fails in many ways; all mean "unreadable"
        raise _unreadable(path, err) from err


def safe_load(path: str | Path, *, trust_pickle: bool = False, mmap: bool = True) -> Any:
    """Load a torch checkpoint file (usually a dict) safely, memory-mapped by default.

    Args:
        path: the `.pt` file.
        trust_pickle: load with full pickle (runs code from the file!); only for trusted files.
        mmap: map tensor storages from the file instead of reading them (pages are read on use).

    Raises:
        UserError: the file is missing, truncated/corrupt, or would run code when loaded.
    """
    path = Path(path)
    parts = part_set(path)  # NAME.pt.part0..N: read as the one file they are (parts.py)
    if parts is None and not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    if trust_pickle:
        log.warning(
            "ckpt.trust_pickle=true: loading %s with full pickle; it can run arbitrary code", path
        )
        obj = _torch_load(path, mmap=mmap, weights_only=False, allow=[], parts=parts)
        return _registered(path, obj, mmap and parts is None)
    allow = base_allowlist()
    unsafe = _unsafe_globals(path) if parts is None else unsafe_globals(parts)
    allow += _deepspeed_globals(unsafe)
    refused = sorted(set(unsafe) - _allowed_names(allow))
    if refused:
        raise UnsafePickleError(
            f"{path}: refused to load: the file's pickle names {', '.join(refused)}, which could run "
            "code and is not on the allowlist of savanna/DeepSpeed contents. If you trust this file, "
            "set ckpt.trust_pickle=true"
        )
    obj = _torch_load(path, mmap=mmap, weights_only=True, allow=allow, parts=parts)
    return _registered(path, obj, mmap and parts is None)  # parts register themselves


def _registered(path: Path, obj: Any, mmap: bool) -> Any:
    """`obj`, its file mapping registered for file-to-file copies when a conversion tracks them."""
    if mmap:
        register_loaded_checkpoint(path, obj)
    return obj


def _torch_load(
    path: Path, *, mmap: bool, weights_only: bool, allow: list[Any], parts: PartSet | None = None
) -> Any:
    try:
        if parts is not None:
            return load_part_set(parts, mmap=mmap, weights_only=weights_only, allow=allow)
        with torch.serialization.safe_globals(allow):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        detail = _detail(str(err))
        if "global" not in detail.lower():
            raise UserError(
                f"{path}: not a readable torch checkpoint (truncated or corrupt?): {detail}"
            ) from err
        # Legacy (non-zip) files skip the pre-check above; name what was refused.
        raise UnsafePickleError(
            f"{path}: refused to load ({detail}); set ckpt.trust_pickle=true only if you trust it"
        ) from err
    except RuntimeError as err:
        if mmap and "mmap" in str(err) and "zipfile" in str(err):
            # Legacy (pre-1.6, non-zip) torch.save format: cannot be mapped, read it whole.
            log.warning("%s: old torch.save format, loading it into memory (no mmap)", path)
            return _torch_load(path, mmap=False, weights_only=weights_only, allow=allow)
        raise _unreadable(path, err) from err
    except UserError:
        raise
    except Exception as err:  # torch's unpickler raises IndexError/KeyError/... on garbage bytes
        raise _unreadable(path, err) from err
