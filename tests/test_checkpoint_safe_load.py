"""safe_load: what real files hold loads, code-running pickles are refused, broken files are named."""

from __future__ import annotations

import io
import logging
import os
import random

import numpy as np
import pytest
import torch

from evo2_hydra.checkpoint import safe_load
from evo2_hydra.errors import UserError


class _RunsCode:
    """A pickle payload that would run a shell command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    def __init__(self):
        self.value = 3


def test_savanna_contents_load(tmp_path):
    path = tmp_path / "states.pt"
    torch.save(
        {
            "module": {
                "w": torch.ones(2, dtype=torch.bfloat16),
                "dense._extra_state": io.BytesIO(b"fp8"),
            },
            "np_rng_state": np.random.get_state(),
            "scalar": np.float64(2.5),
            "args": {"num_layers": 2},
        },
        path,
    )
    state = safe_load(path)
    assert state["module"]["dense._extra_state"].getvalue() == b"fp8"
    assert state["np_rng_state"][1].dtype == np.uint32 and state["scalar"] == 2.5
    assert torch.equal(state["module"]["w"], torch.ones(2, dtype=torch.bfloat16))


def test_malicious_pickle_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"module": {}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(
        UserError, match=r"evil\.pt: refused to load: .*(posix|os)\.system.*ckpt\.trust_pickle=true"
    ):
        safe_load(path)
    assert not marker.exists()


def test_trust_pickle_loads_custom_objects_with_a_warning(tmp_path, caplog):
    path = tmp_path / "custom.pt"
    torch.save({"obj": _Custom()}, path)
    with pytest.raises(UserError, match="refused"):
        safe_load(path)
    with caplog.at_level(logging.WARNING):
        assert safe_load(path, trust_pickle=True)["obj"].value == 3
    assert "trust_pickle" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "empty", *[f"garbage{seed}" for seed in range(20)]])
def test_corrupt_files_named(tmp_path, damage):
    # random garbage: torch's unpickler fails with varied exception types; each must become one line
    path = tmp_path / "broken.pt"
    torch.save({"module": {"w": torch.zeros(1000)}}, path)
    data = path.read_bytes()
    if damage.startswith("garbage"):  # seeded: a failure names the bytes that caused it
        garbage = random.Random(int(damage.removeprefix("garbage"))).randbytes(2000)
    path.write_bytes(
        garbage
        if damage.startswith("garbage")
        else {"truncate": data[: len(data) // 2], "empty": b""}[damage]
    )
    with pytest.raises(UserError, match=r"broken\.pt: not a readable torch checkpoint"):
        safe_load(path)


def test_legacy_format_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "old_evil.pt"
    torch.save({"payload": _RunsCode(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(
        UserError, match=r"old_evil\.pt: refused to load .*GLOBAL (posix|os)\.system"
    ):
        safe_load(path)
    assert not marker.exists()
    ok = tmp_path / "old_ok.pt"
    torch.save({"w": torch.ones(2)}, ok, _use_new_zipfile_serialization=False)
    assert torch.equal(safe_load(ok)["w"], torch.ones(2))  # old format: read without mmap


def test_numpy1_module_names_allowed(tmp_path):
    # Files written under numpy 1.x (savanna pins numpy<=2.2.6) name numpy.core.multiarray.*; the
    # legacy format keeps pickle GLOBALs as text, so the name can be rewritten for the test.
    path = tmp_path / "np1.pt"
    torch.save(
        {"rng": np.random.get_state(), "s": np.float64(1.5)},
        path,
        _use_new_zipfile_serialization=False,
    )
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    state = safe_load(path)
    assert state["rng"][1].dtype == np.uint32 and state["s"] == 1.5
