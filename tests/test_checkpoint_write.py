"""Writing savanna checkpoints: layout, manifest, atomicity under SIGKILL, commit/prune helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evo2_hydra.checkpoint import (
    commit_step_dir,
    load_module_state_dict,
    locate_checkpoint,
    prune_checkpoints,
    save_module_checkpoint,
    split_mp,
    verify_manifest,
)
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.checkpoint.writer import PAUSE_ENV
from tests.ckpt_factory import random_savanna_module
from tests.conftest import REPO


def test_save_layout_manifest_and_reload(tmp_path, tiny):
    module = random_savanna_module(tiny, 128)
    step = save_module_checkpoint(
        tmp_path,
        5,
        split_mp(module, 2),
        extra={"args": {"num_layers": 8}},
        run_config_yaml="task: finetune\n",
    )
    assert step == tmp_path / "global_step5" and (tmp_path / "latest").read_text() == "global_step5"
    assert sorted(p.name for p in step.iterdir()) == [
        "configs", "manifest.json", "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt",
    ]  # fmt: skip
    assert (step / "configs" / "config.yaml").read_text() == "task: finetune\n"
    state = safe_load(step / "mp_rank_01_model_states.pt")
    assert {
        "module",
        "param_shapes",
        "dp_world_size",
        "mp_world_size",
        "iteration",
        "args",
    } <= state.keys()
    assert (
        state["iteration"] == 5
        and state["mp_world_size"] == 2
        and state["args"] == {"num_layers": 8, "model_parallel_size": 2}  # as written
    )
    assert dict(state["param_shapes"]) == {
        k: v.shape for k, v in state["module"].items() if torch.is_tensor(v)
    }
    manifest = json.loads((step / "manifest.json").read_text())
    entry = manifest["model_states"]["mp_rank_00_model_states.pt"]["tensors"][
        "sequential.3.mixer.mixer.filter.h"
    ]
    assert entry["shape"] == [2, 128] and entry["dtype"] == "bfloat16" and len(entry["crc32"]) == 8
    assert verify_manifest(step) == []
    loaded, meta = load_module_state_dict(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in module.items() if torch.is_tensor(v))
    assert meta["run_config"] == "task: finetune\n" and meta["iteration"] == 5


def test_manifest_detects_a_changed_tensor(tmp_path, tiny):
    step = save_module_checkpoint(tmp_path, 1, [random_savanna_module(tiny, 64)])
    state = torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)
    state["module"]["sequential.2.mlp.w1.weight"][0, 0] += 1
    torch.save(state, step / "mp_rank_00_model_states.pt")
    assert verify_manifest(step) == ["mp_rank_00_model_states.pt:sequential.2.mlp.w1.weight"]


def test_iteration_zero_refused(tmp_path, tiny):
    with pytest.raises(ValueError, match="global_step0"):
        save_module_checkpoint(tmp_path, 0, [random_savanna_module(tiny, 64)])


KILLED_WRITER = """
import sys, torch
from evo2_hydra.checkpoint import save_module_checkpoint
from evo2_hydra.checkpoint.mp import split_mp
module = {f"w{i}": torch.full((64,), float(i)) for i in range(4)}
save_module_checkpoint(sys.argv[1], 2, split_mp(module, 1) * 3)
"""


def test_sigkill_mid_write_keeps_previous_checkpoint(tmp_path, tiny):
    module = random_savanna_module(tiny, 64)
    save_module_checkpoint(tmp_path, 1, [module])
    env = {**os.environ, PAUSE_ENV: "30", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], env=env)
    try:
        deadline = time.time() + 30
        # wait until the child has written its first shard into the temporary step folder
        while not list(tmp_path.glob(".tmp-global_step2*/mp_rank_00_model_states.pt")):
            assert child.poll() is None and time.time() < deadline, "writer never started"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert (tmp_path / "latest").read_text() == "global_step1"
    assert not (tmp_path / "global_step2").exists()
    assert verify_manifest(tmp_path / "global_step1") == []
    assert locate_checkpoint(tmp_path).step_dir.name == "global_step1"
    # the next save clears the leftover temporary folder
    save_module_checkpoint(tmp_path, 3, [module])
    assert not list(tmp_path.glob(".tmp-*")) and (tmp_path / "latest").read_text() == "global_step3"


def test_commit_step_dir_and_prune(tmp_path, tiny):
    save_dir, staging = tmp_path / "save", tmp_path / "save" / ".staging"
    for n in (1, 2, 3, 4):
        step = staging / f"global_step{n}"
        step.mkdir(parents=True)
        torch.save(
            {"module": {"w": torch.full((3,), float(n))}, "dp_world_size": 1},
            step / "mp_rank_00_model_states.pt",
        )
        commit_step_dir(step, save_dir, f"global_step{n}", run_config_yaml="a: 1\n")
        assert (save_dir / "latest").read_text() == f"global_step{n}"
        assert (save_dir / f"global_step{n}" / "manifest.json").is_file()
        assert (save_dir / f"global_step{n}" / "configs" / "config.yaml").is_file()
    removed = prune_checkpoints(save_dir, keep_last=2)
    assert [p.name for p in removed] == ["global_step1", "global_step2"]
    assert sorted(p.name for p in save_dir.glob("global_step*")) == ["global_step3", "global_step4"]
    # `latest` pointing at an old step protects it
    (save_dir / "latest").write_text("global_step3")
    assert prune_checkpoints(save_dir, keep_last=1) == []


def test_step_tag_must_be_positive(tmp_path):
    step = tmp_path / "x" / "global_step0"
    step.mkdir(parents=True)
    with pytest.raises(ValueError):
        commit_step_dir(step, tmp_path / "save", "global_step0")
    assert not Path(tmp_path / "save" / "latest").exists()
