"""File-to-file copies of unchanged tensors (checkpoint/mapped.py, checkpoint/bulk_io.py).

The fast path must never change a byte: every conversion is written once with it and once with
it switched off, and the files must be identical; and it must really be taken (bytes counted as
copied), fall back cleanly where the kernel refuses, and never write a placeholder's memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from evo2_hydra.checkpoint import bulk_io, mapped
from evo2_hydra.checkpoint.bulk_io import BulkFile
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.checkpoint.stream import TorchSaveStream, tensor_crc32
from evo2_hydra.convert import run as convert_run
from evo2_hydra.io_utils import crc32
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.vtx_reference import model_config


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "big": torch.randn(700, 1000, generator=gen).to(torch.bfloat16),  # > SMALL: one record
        "fp32": torch.randn(300, 257, generator=gen),
        "small": torch.randn(10, generator=gen).to(torch.bfloat16),
        "ints": torch.arange(12, dtype=torch.int64).view(3, 4),
    }


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "source.pt"
    torch.save({"module": _state(), "iteration": 1}, path)
    return path


def _stream_copy(source: Path, out: Path) -> int:
    """Re-save `source`'s tensors (plus a row slice, a column slice and a tied pair) to `out`."""
    module = safe_load(source)["module"]
    with TorchSaveStream(out) as stream:
        refs = {k: stream.add(v) for k, v in module.items()}
        refs["rows"] = stream.add(module["big"][100:300])  # contiguous view: copied from the file
        refs["cols"] = stream.add(module["big"][:, :7])  # strided: written from memory
        refs["tied"] = stream.add(module["big"])
        stream.finish(refs)
    return stream.copied_bytes


def test_unchanged_tensors_are_copied_and_bytes_do_not_change(saved, tmp_path):
    plain, fast = tmp_path / "plain.pt", tmp_path / "fast.pt"
    assert _stream_copy(saved, plain) == 0  # no tracking block: nothing registered
    with mapped.tracking_mapped_files() as registry:
        copied = _stream_copy(saved, fast)
        assert len(registry) == 1
    state = _state()
    expect = sum(t.nbytes for t in state.values()) + state["big"][100:300].nbytes
    assert copied == expect
    assert fast.read_bytes() == plain.read_bytes()
    loaded = torch.load(fast, weights_only=True, mmap=True)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert torch.equal(loaded["rows"], state["big"][100:300])
    assert torch.equal(loaded["cols"], state["big"][:, :7])
    assert loaded["tied"].untyped_storage().data_ptr() == loaded["big"].untyped_storage().data_ptr()


def test_registry_bounds_and_lifetime(saved):
    with mapped.tracking_mapped_files() as registry:
        module = safe_load(saved)["module"]
        big = module["big"]
        fd, offset, n = mapped.segments(big.data_ptr(), big.nbytes)[0]
        assert n == big.nbytes
        assert os.pread(fd, 64, offset) == bytes(big.view(torch.uint8).reshape(-1)[:64].tolist())
        size = os.path.getsize(saved)
        start = big.data_ptr() - offset
        assert mapped.segments(start + size - 8, 16) is None  # runs past the end of the file
        assert mapped.segments(start - 16, 8) is None  # before it
        in_memory = torch.ones(1000)
        assert mapped.segments(in_memory.data_ptr(), in_memory.nbytes) is None
    assert len(registry) == 0
    assert mapped.segments(big.data_ptr(), big.nbytes) is None  # the block has ended
    with pytest.raises(OSError):
        os.fstat(fd)  # and its file was closed


def _refuse_copy(*args, **kwargs):
    raise OSError(errno.EXDEV, "Invalid cross-device link")


def _refuse_fallocate(fd, mode, offset, length):
    ctypes.set_errno(errno.EOPNOTSUPP)
    return -1


@pytest.mark.parametrize(
    "owner, name, refusal, switch",
    [
        (os, "copy_file_range", _refuse_copy, "kernel_copy"),  # bytes then read from the file
        (bulk_io, "_libc_fallocate", _refuse_fallocate, "preallocate"),
    ],
    ids=["copy_file_range", "fallocate"],
)
def test_kernel_refusals_switch_the_feature_off_and_change_no_byte(
    saved, tmp_path, monkeypatch, owner, name, refusal, switch
):
    reference = tmp_path / "reference.pt"
    with mapped.tracking_mapped_files():
        _stream_copy(saved, reference)
    monkeypatch.setattr(owner, name, refusal)
    monkeypatch.setattr(BulkFile, switch, True)
    other = tmp_path / "other.pt"
    with mapped.tracking_mapped_files():
        _stream_copy(saved, other)
    assert getattr(BulkFile, switch) is False  # off after the first refusal
    assert other.read_bytes() == reference.read_bytes()


def test_other_copy_errors_are_raised(saved, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "copy_file_range", broken)
    monkeypatch.setattr(BulkFile, "kernel_copy", True)
    with mapped.tracking_mapped_files(), pytest.raises(OSError, match="I/O error"):
        _stream_copy(saved, tmp_path / "out.pt")


def test_concat_rows_placeholder(saved, tmp_path):
    outside = mapped.concat_rows([torch.ones(2, 3), torch.zeros(1, 3)])  # no block: torch.cat
    assert torch.equal(outside, torch.tensor([[1.0] * 3, [1.0] * 3, [0.0] * 3]))
    with mapped.tracking_mapped_files():
        module = safe_load(saved)["module"]
        in_memory = torch.randn(50, 1000).to(torch.bfloat16)  # not from the file
        parts = [module["big"], in_memory, module["big"][:5]]
        expected = torch.cat(parts)
        joined = mapped.concat_rows(parts)
        assert joined.shape == expected.shape and joined.dtype == expected.dtype
        assert tensor_crc32(joined) == f"{crc32(expected.view(torch.uint8).numpy()):08x}"
        with BulkFile(tmp_path / "joined.bin") as out:
            out.write(b"header")
            out.write(joined.view(torch.uint8).numpy().data)
        assert out.copied_bytes == module["big"].nbytes + module["big"][:5].nbytes
        assert (tmp_path / "joined.bin").read_bytes() == b"header" + expected.view(
            torch.uint8
        ).numpy().tobytes()
        with (
            BulkFile(tmp_path / "partial.bin") as out,
            pytest.raises(RuntimeError, match="partially"),
        ):
            out.write(joined[1:].view(torch.uint8).numpy().data)


def _data_files(root: Path) -> dict[str, bytes]:
    """Every file's bytes, but DCP's `.metadata` (it carries a random save id per save), and the
    manifest and run config (they name the output folder)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (".metadata", "manifest.json", "config.yaml")
    }


@pytest.mark.parametrize(
    "target",
    [
        ["target=vortex"],
        ["target=nemo", "target.format=torch_dist"],
        ["target=nemo", "target.format=zarr"],
        ["target=savanna", "target.mp=2"],
        ["target=savanna", "target.mp=1", "ckpt.context=128"],
    ],
    ids=["vortex", "torch_dist", "zarr", "savanna-mp2", "savanna-resize"],
)
def test_conversions_are_byte_identical_with_and_without_copies(
    tmp_path, compose_cfg, monkeypatch, target
):
    cfg = model_config("evo2_tiny")
    source = make_random_savanna_checkpoint(tmp_path / "src", cfg, 256, layout="latest", seed=9)

    def convert(out: Path) -> tuple[int, int]:
        before = bulk_io.totals()
        conv = compose_cfg([*target, f"source={source}", f"output={out}"], config_name="convert")
        convert_run.run_convert(OmegaConf.to_object(conv))
        after = bulk_io.totals()
        return after[0] - before[0], after[1] - before[1]

    written, copied = convert(tmp_path / "fast")
    assert copied > 0.5 * written  # most tensors leave every target unchanged
    monkeypatch.setattr(convert_run, "tracking_mapped_files", contextlib.nullcontext)
    assert convert(tmp_path / "plain")[1] == 0
    fast, plain = _data_files(tmp_path / "fast"), _data_files(tmp_path / "plain")
    assert fast.keys() == plain.keys()
    for name in fast:
        assert fast[name] == plain[name], name
