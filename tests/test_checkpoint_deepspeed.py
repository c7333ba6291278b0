"""Against real DeepSpeed 0.19.8 (CPU, gloo): its own checkpoints pass safe_load, and it accepts ours.

One subprocess (DeepSpeed needs a process group) saves ZeRO 0/1/3 checkpoints of a small module
with savanna's client state, and loads our prepared base checkpoint into evo2_tiny with
`load_checkpoint(dir, load_module_only=True)`; this process then checks every file it wrote.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest

from evo2_hydra.checkpoint import load_module_state_dict, locate_checkpoint, prepare_base_checkpoint
from evo2_hydra.checkpoint.safe_load import safe_load
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.conftest import REPO, to_obj

CHILD = r"""
import json, random, sys
import numpy as np, torch, deepspeed
from evo2_hydra.model import build_model
from evo2_hydra.checkpoint.loader import load_module_state_dict
out_dir, prepared, model_json = sys.argv[1], sys.argv[2], sys.argv[3]
from evo2_hydra.config import ModelConfig
cfg = ModelConfig(**json.loads(model_json))
for stage in (0, 1, 3):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}}
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), optimizer=opt, config=ds_cfg)
    loss = engine(torch.randn(1, 4, dtype=torch.bfloat16)).float().sum()
    engine.backward(loss)
    engine.step()
    client = {"iteration": 1, "args": {"num_layers": 2}, "np_rng_state": np.random.get_state(),
              "random_rng_state": random.getstate(), "torch_rng_state": torch.get_rng_state()}
    engine.save_checkpoint(f"{out_dir}/zero{stage}", tag="global_step1", client_state=client)
# our prepared base checkpoint, loaded the way TRAIN loads it
model = build_model(cfg, 512, device="cpu")
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
    optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5),
    config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}})
path, client = engine.load_checkpoint(prepared, load_module_only=True)
expected, _ = load_module_state_dict(prepared)
got = engine.module.state_dict()
same = all(torch.equal(got[k].float(), v.float()) for k, v in expected.items() if torch.is_tensor(v))
print(json.dumps({"loaded_from": path, "same": same, "iteration": client.get("iteration")}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=evo2_tiny"])
    model, ckpt = to_obj(cfg.model), to_obj(cfg.ckpt)
    tmp = tmp_path_factory.mktemp("ds")
    src = make_random_savanna_checkpoint(tmp / "src", model, 256, layout="step", mp=2)
    prepared = prepare_base_checkpoint(
        dataclasses.replace(ckpt, path=str(src), context=512), model, tmp / "base"
    )
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}  # fmt: skip
    model_json = json.dumps(
        {k: v.value if hasattr(v, "value") else v for k, v in dataclasses.asdict(model).items()}
    )
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp / "ds"), str(prepared), model_json],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "ds", json.loads(res.stdout.strip().splitlines()[-1])


def test_deepspeed_files_pass_safe_load(deepspeed_run):
    ds_dir, _ = deepspeed_run
    files = sorted(ds_dir.rglob("*.pt"))
    names = {f.name for f in files}
    # model states for ZeRO 0/1, per-rank files for ZeRO-3, optimizer states with DeepSpeed objects
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt",
            "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= names  # fmt: skip
    for f in files:
        state = safe_load(f)  # raises on anything off the allowlist
        assert isinstance(state, dict) and state, f
    states = safe_load(ds_dir / "zero1" / "global_step1" / "mp_rank_00_model_states.pt")
    assert states["np_rng_state"][0] == "MT19937" and states["iteration"] == 1


def test_deepspeed_layouts_detected(deepspeed_run):
    ds_dir, _ = deepspeed_run
    module, meta = load_module_state_dict(ds_dir / "zero1")  # via `latest`
    assert set(module) == {"0.weight", "0.bias", "1.weight", "1.bias"} and meta["iteration"] == 1
    loc = locate_checkpoint(ds_dir / "zero3")
    assert loc.is_zero3 and loc.step_dir.name == "global_step1"


def test_deepspeed_loads_our_prepared_checkpoint(deepspeed_run):
    _, result = deepspeed_run
    assert result["loaded_from"].endswith("global_step1/mp_rank_00_model_states.pt")
    assert result["same"] is True and result["iteration"] == 1
