"""NeMo2 checkpoint folders on disk (torch_dist or zarr), written and read without NeMo or Megatron.

What goes in (keys, shapes, dtypes, the `context/` metadata) is the pure key map of
`checkpoint/adapters/nemo.py`; this module only writes and reads files (the NeMo2 layout of
NVIDIA/NeMo `nemo/lightning/io/`): `context/io.json`, `context/model.yaml`, `weights/common.pt`, the
weights, and `weights/metadata.json` with exactly four keys, written last (its presence marks a
complete checkpoint; Megatron-Core reads it as `CheckpointingConfig`).
- torch_dist: `torch.distributed.checkpoint.save(..., planner=DefaultSavePlanner(
  flatten_state_dict=False), no_dist=True)`, one `.distcp` file per entry (as BioNeMo's MBridge
  converter; `.metadata` names each entry's file, so loaders do not care); TransformerEngine
  extra states are list-wrapped empty uint8 tensors under `<module>._extra_state/shard_0_1` (the
  default planner would flatten the list into a tensor entry Megatron does not recognise;
  checked with megatron-core 0.15).
- zarr (Megatron <= 0.15): one zarr v2 array folder per key (`.zarray` + one raw C-order chunk),
  bf16 as its 2-byte pattern with dtype "bfloat16"; extra states as `<key>/shard_0_1.pt`.
Tensors are produced lazily, one at a time, so memory stays at about one tensor.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evo2_hydra.checkpoint.adapters.nemo import (
    COMMON_PT,
    Entry,
    Producer,
    empty_extra_state,
    extra_state_keys,
    io_json,
    metadata_json,
    model_yaml,
    resolve_model_size,
    savanna_to_nemo,
)
from evo2_hydra.checkpoint.bulk_io import BulkFile
from evo2_hydra.config import ModelConfig, NemoFormat


def _lazy_save_planner(producers: Mapping[str, Producer], on_tensor: Callable[[str, Tensor], None]):
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class LazySavePlanner(DefaultSavePlanner):
        """Plans from meta placeholders; makes each tensor only when the writer asks for it."""

        def resolve_data(self, write_item):
            # torch's zip CRC32 switch is per thread: off in whichever thread DCP saves from.
            torch.serialization.set_crc32_options(False)
            make = producers.get(write_item.index.fqn)
            if make is None:
                return super().resolve_data(write_item)
            tensor = make()
            on_tensor(write_item.index.fqn, tensor)
            return tensor

    return LazySavePlanner(flatten_state_dict=False)


def _bulk_writer(base):
    """`base` (DCP's FileSystemWriter) writing through `BulkFile` streams."""

    class BulkFileSystemWriter(base):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.fs = _bulk_file_system(type(self.fs))

    return BulkFileSystemWriter


def _bulk_file_system(base):
    """DCP's file system with `BulkFile` streams for writing: each tensor that torch.save puts
    into a `.distcp` file unchanged from the memory-mapped source is copied file to file.
    """

    class BulkFileSystem(base):
        @contextlib.contextmanager
        def create_stream(self, path, mode: str):
            if mode != "wb":
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with BulkFile(path) as stream:
                yield stream

    return BulkFileSystem()


def write_torch_dist(
    weights_dir: Path,
    entries: list[Entry],
    extra_keys: list[str],
    on_tensor: Callable[[str, Tensor], None],
) -> None:
    """Write the entries as a torch.distributed.checkpoint (torch_dist) folder, one tensor at a time."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    placeholders: dict[str, Any] = {
        key: torch.empty(shape, dtype=dtype, device="meta") for key, (shape, dtype), _ in entries
    }
    placeholders.update({key: [empty_extra_state()] for key in extra_keys})
    producers = {key: make for key, _, make in entries}
    crc32 = torch.serialization.get_crc32_options()
    try:
        # DCP torch.saves each tensor into its file: skip miniz's slow zip CRC32 (our manifest
        # holds a CRC32 per tensor). One file per item: DCP's writer keeps every tensor of a file
        # alive until that file is closed, so one file per rank would hold the whole model.
        torch.serialization.set_crc32_options(False)
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*assuming the intent is to save in a single process.*"
            )
            dcp.save(
                placeholders,
                storage_writer=_bulk_writer(FileSystemWriter)(
                    str(weights_dir),
                    single_file_per_rank=False,
                    # No fsync per file (hundreds of them): like the other targets, the folder
                    # is complete when it is renamed into place.
                    sync_files=False,
                    # One writer thread: its copies run in the kernel (checkpoint/bulk_io.py)
                    # while the CRC32s run on a second thread (convert/targets.py); two writers
                    # measured no faster (two concurrent copies take as long as one).
                    thread_count=1,
                ),
                planner=_lazy_save_planner(producers, on_tensor),
                no_dist=True,
            )
    finally:
        torch.serialization.set_crc32_options(crc32)


ZARR_DTYPES = {torch.float32: "<f4", torch.bfloat16: "bfloat16", torch.float16: "<f2"}


def write_zarr_array(folder: Path, tensor: Tensor) -> None:
    """One zarr v2 array: `.zarray` + a single raw, uncompressed C-order chunk."""
    folder.mkdir(parents=True)
    tensor = tensor.contiguous()
    meta = {
        "chunks": list(tensor.shape),
        "compressor": None,
        "dtype": ZARR_DTYPES[tensor.dtype],
        "fill_value": None,
        "filters": None,
        "order": "C",
        "shape": list(tensor.shape),
        "zarr_format": 2,
    }
    (folder / ".zarray").write_text(json.dumps(meta))
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    chunk_name = ".".join("0" for _ in tensor.shape) or "0"
    with BulkFile(folder / chunk_name) as f:
        f.write(raw.numpy().data)  # the tensor's own memory: file to file when it is mapped


def write_zarr(
    weights_dir: Path,
    entries: list[Entry],
    extra_keys: list[str],
    on_tensor: Callable[[str, Tensor], None],
) -> None:
    """Write the entries as zarr v2 arrays (Megatron <= 0.15), one tensor at a time."""
    # One array at a time, as torch_dist: the copies run in the kernel, the CRC32s (on_tensor)
    # on a second thread, and only the tensor being written is alive.
    for key, _, make in entries:
        tensor = make()
        write_zarr_array(weights_dir / key, tensor)
        on_tensor(key, tensor)
    for key in extra_keys:
        name, shard = key.split("/")
        (weights_dir / name).mkdir(parents=True, exist_ok=True)
        torch.save(
            empty_extra_state(), weights_dir / name / f"{shard}.pt"
        )  # the object, not a list


WRITERS = {NemoFormat.torch_dist: write_torch_dist, NemoFormat.zarr: write_zarr}


def write_nemo_checkpoint(
    out_dir: Path,
    sd: Mapping[str, Tensor],
    cfg: ModelConfig,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    fmt: NemoFormat,
    model_size: str | None,
    context: int,
    on_tensor: Callable[[str, Tensor], None] = lambda key, t: None,
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Write the NeMo2 folder into `out_dir` (already created, empty); return key -> (shape, dtype)."""
    size_name = resolve_model_size(model_size, cfg)
    entries = list(savanna_to_nemo(sd, cfg, shapes, cfg.hcm_filter_len))
    extra_keys = extra_state_keys(cfg)
    (out_dir / "context").mkdir()
    (out_dir / "context" / "io.json").write_text(
        json.dumps(io_json(size_name, context, cfg), indent=1)
    )
    (out_dir / "context" / "model.yaml").write_text(model_yaml(size_name, context, cfg))
    weights = out_dir / "weights"
    weights.mkdir()
    WRITERS[fmt](weights, entries, extra_keys, on_tensor)
    torch.save(COMMON_PT, weights / "common.pt")
    # Written last: Megatron treats its presence as "this checkpoint is complete".
    (weights / "metadata.json").write_text(json.dumps(metadata_json(fmt)))
    return {key: (shape, str(dtype).removeprefix("torch.")) for key, (shape, dtype), _ in entries}


def nemo_total_bytes(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig) -> int:
    """Bytes of tensor data a NeMo export of these shapes writes (for the progress bar)."""
    total = 0
    for _, (shape, dtype), _ in savanna_to_nemo({}, cfg, shapes, cfg.hcm_filter_len):
        n = 1
        for s in shape:
            n *= s
        total += n * torch.empty(0, dtype=dtype).element_size()
    return total


# ------------------------------------------------------------------------------------------------
# Reading back (verify=true, tests)


def read_torch_dist(weights_dir: Path) -> dict[str, Any]:
    """Every entry of a torch_dist folder: tensors, and extra-state objects as saved (lists)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(weights_dir))
    metadata = reader.read_metadata()
    state: dict[str, Any] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            state[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    objects: dict[str, Any] = {}

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            value.seek(0)
            objects[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            state[key] = None
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*assuming the intent is to load in a single process.*"
        )
        dcp.load(
            state, storage_reader=reader, planner=Planner(flatten_state_dict=False), no_dist=True
        )
    state.update(objects)
    return state


ZARR_TORCH_DTYPES = {"<f4": torch.float32, "bfloat16": torch.bfloat16, "<f2": torch.float16}


def read_zarr_array(folder: Path) -> Tensor:
    """A single-chunk zarr v2 array as written by `write_zarr_array` (bf16 included)."""
    meta = json.loads((folder / ".zarray").read_text())
    dtype = ZARR_TORCH_DTYPES[meta["dtype"]]
    chunk_name = ".".join("0" for _ in meta["shape"]) or "0"
    raw = bytearray((folder / chunk_name).read_bytes())
    return torch.frombuffer(raw, dtype=dtype).reshape(meta["shape"])


def read_nemo_weights(weights_dir: Path, fmt: NemoFormat) -> dict[str, Any]:
    """Read a NeMo weights folder (torch_dist or zarr) into a flat state dict."""
    if fmt == NemoFormat.torch_dist:
        return read_torch_dist(weights_dir)
    state: dict[str, Any] = {}
    for zarray in weights_dir.rglob(".zarray"):
        state[zarray.parent.name] = read_zarr_array(zarray.parent)
    for shard in weights_dir.glob("*/shard_*.pt"):
        state[f"{shard.parent.name}/{shard.stem}"] = torch.load(shard, weights_only=True)
    return state
