"""`manifest.json`: what a folder this project wrote holds, with a CRC32 per tensor; written atomically.

One format at two levels, both `{"format": ..., "files": {name: {"bytes", "tensors"?}}, ...}`-shaped:
- a checkpoint step (`global_stepN/manifest.json`): per model-state file, each tensor's shape,
  dtype and CRC32 (`model_states`), and the other files with their sizes (`other_files`);
  `verify_manifest` re-checks it.
- an export (`OUT/manifest.json`, convert.py): source, target, every file and every tensor.
An export manifest at the top of a folder is also how convert.py's `overwrite=true` knows that
it wrote the folder (`is_export`), so an arbitrary folder is never replaced.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from evo2_hydra.checkpoint.hub import resolved_sources
from evo2_hydra.checkpoint.layout import MP_FILE_RE, ZERO3_FILE_RE
from evo2_hydra.checkpoint.mapped import tensor_crc32
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.io_utils import write_text_atomic

MANIFEST = "manifest.json"
CHECKSUM = "crc32 of each tensor's bytes"


def tensor_entry(shape: Any, dtype: Any, crc32: str | None = None) -> dict[str, Any]:
    """One manifest entry: shape, dtype (without `torch.`) and, when known, the CRC32."""
    entry: dict[str, Any] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
    if crc32 is not None:
        entry["crc32"] = crc32
    return entry


def describe_tensors(module: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> {shape, dtype, crc32} for every tensor of a state dict (reads every byte)."""
    return {
        name: tensor_entry(t.shape, t.dtype, tensor_crc32(t))
        for name, t in module.items()
        if isinstance(t, Tensor)
    }


def _model_state_files(step_dir: Path) -> list[Path]:
    return sorted(
        f for f in step_dir.iterdir() if MP_FILE_RE.match(f.name) or ZERO3_FILE_RE.match(f.name)
    )


def write_step_manifest(
    step_dir: str | Path, described: Mapping[str, Mapping[str, Any]] | None = None
) -> Path:
    """Write `step_dir/manifest.json`.

    `described`: file name -> its tensors' entries, from the CRC32s computed while streaming; None
    reads every model-state file back from disk (memory-mapped), for folders DeepSpeed saved.
    Other files (configs, DeepSpeed optimizer states) are listed with their sizes.
    """
    step_dir = Path(step_dir)
    if described is None:
        described = {}
        for f in _model_state_files(step_dir):
            state = safe_load(f)
            module = state.get("module", {}) if isinstance(state, dict) else {}
            described[f.name] = describe_tensors(module)
            del state, module
    files = {
        name: {"bytes": (step_dir / name).stat().st_size, "tensors": dict(tensors)}
        for name, tensors in described.items()
    }
    others = {
        str(p.relative_to(step_dir)): p.stat().st_size
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST and p.name not in files
    }
    manifest = {"checksum": CHECKSUM, "model_states": files, "other_files": others}
    path = step_dir / MANIFEST
    write_text_atomic(path, json.dumps(manifest, indent=1))
    return path


def verify_manifest(step_dir: str | Path) -> list[str]:
    """Names of tensors whose shape, dtype or checksum differ from the manifest (empty: all good)."""
    step_dir = Path(step_dir)
    manifest = json.loads((step_dir / MANIFEST).read_text())
    bad = []
    for fname, entry in manifest["model_states"].items():
        module = safe_load(step_dir / fname).get("module", {})
        now = describe_tensors(module)
        bad += [f"{fname}:{k}" for k, v in entry["tensors"].items() if now.get(k) != v]
    return bad


def _file_digest(path: Path) -> str:
    """blake2b of the file: reading is what costs, and it is page-cache hot right after writing."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def iter_files(root: Path) -> Iterator[Path]:
    """Every file below a folder, sorted, except the manifest itself."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def write_export_manifest(
    out_dir: Path,
    *,
    source: str,
    target: str,
    tensors: Mapping[str, tuple],
    extra: Mapping[str, Any] | None = None,
    digest: bool = False,
) -> Path:
    """`OUT/manifest.json` of a conversion: what was converted from where, every file, every tensor.

    `tensors`: key -> (shape, dtype) or (shape, dtype, crc32). `digest` adds a blake2b per file
    (a second read of everything; off by default, the per-tensor CRC32s already cover the data).
    """
    files = {}
    for path in iter_files(out_dir):
        entry: dict[str, Any] = {"bytes": path.stat().st_size}
        if digest:
            entry["blake2b"] = _file_digest(path)
        files[str(path.relative_to(out_dir))] = entry
    manifest = {
        "source": source,
        "target": target,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
        "tensors": {k: tensor_entry(*v) for k, v in tensors.items()},
        **(dict(extra) if extra else {}),
    }
    if hub_sources := resolved_sources():  # checkpoints read from the Hub, pinned to commits
        manifest["hub"] = hub_sources
    path = out_dir / MANIFEST
    write_text_atomic(path, json.dumps(manifest, indent=1) + "\n")
    return path


def is_export(folder: Path) -> bool:
    """Whether `folder` holds a conversion's top-level `manifest.json` (`write_export_manifest`).

    Only that counts: a run's checkpoint folder also holds our step manifests, and must never be
    taken for a replaceable export.
    """
    try:
        body = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and {"source", "target", "tensors"} <= body.keys()
