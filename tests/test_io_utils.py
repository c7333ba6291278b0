"""Atomic writes: nothing under the final name until complete; finished outputs follow the umask."""

from __future__ import annotations

import os
import stat

import pytest

from evo2_hydra.io_utils import atomic_dir, atomic_file


def test_atomic_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "f") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inner").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_atomic_dir_refuses_existing_unless_overwrite(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_dir(target) as tmp:
            (tmp / "new").write_text("new")
    assert (target / "old").exists()
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
