"""Pure parts of training, against hand-computed values: LR schedule, parameter groups, batch
plan, DeepSpeed config, memory estimate, distributed env detection."""

from __future__ import annotations

import math
import os

import pytest
import torch

from evo2_hydra.config import (
    ClusterConfig,
    DecayStyle,
    Device,
    Dtype,
    NoDecaySet,
    TrainConfig,
)
from evo2_hydra.errors import UserError
from evo2_hydra.train.engine import batch_plan, deepspeed_config
from evo2_hydra.train.memory import (
    GIB,
    activation_bytes,
    estimate_memory,
    model_state_bytes_per_param,
)
from evo2_hydra.train.optim import AnnealingLR, annealing_lr, param_groups, split_decay_params
from tests.conftest import to_obj


def lr(step, style=DecayStyle.cosine, warmup=10.0, min_lr=1e-4):
    return annealing_lr(
        step, start_lr=1e-3, min_lr=min_lr, warmup_iters=warmup, decay_iters=100, style=style
    )


def test_annealing_lr_matches_savanna_by_hand():
    # warmup W = 0.1 * 100 = 10: linear from 0, first update uses lr 0, not clamped to min_lr
    assert lr(0) == 0.0
    assert lr(5) == pytest.approx(5e-4)
    assert lr(10) == pytest.approx(1e-3)
    # cosine: n'' = 20 - 10 = 10, divided by E = 100 (not E - W = 90)
    assert lr(20) == pytest.approx(0.5e-3 * (math.cos(math.pi * 0.1) + 1))
    assert lr(20) == pytest.approx(9.755283e-4, rel=1e-6)
    # n' = min(n, E - W) = 90 -> n'' = 80: plateaus at 0.5e-3 * (cos(0.8 pi) + 1) = 9.549e-5 ...
    assert lr(100, min_lr=0.0) == pytest.approx(9.549150e-5, rel=1e-6)
    assert lr(500, min_lr=0.0) == lr(100, min_lr=0.0)
    # ... which min_lr = 1e-4 clamps
    assert lr(100) == 1e-4
    assert lr(20, DecayStyle.linear) == pytest.approx(1e-3 * 90 / 100)
    assert lr(20, DecayStyle.exponential) == pytest.approx(1e-3 * math.exp(-0.693 * 0.1))
    assert lr(20, DecayStyle.constant) == 1e-3
    # no warmup: the first step already uses the full lr
    assert lr(0, warmup=0.0) == pytest.approx(1e-3)


def test_annealing_scheduler_steps_and_state_round_trip():
    train = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup=0.1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=train.lr)
    sched = AnnealingLR(opt, train)
    assert opt.param_groups[0]["lr"] == 0.0  # construction applies step 0
    for _ in range(20):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr(20))
    state = sched.state_dict()
    assert state == {
        "start_lr": 1e-3,
        "warmup_iter": 10.0,
        "num_iters": 20,
        "decay_style": "cosine",
        "end_iter": 100,
        "min_lr": 1e-4,
    }
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=train.lr)
    sched2 = AnnealingLR(opt2, TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup=0.1))
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr(20))
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr(21))


@pytest.fixture(scope="module")
def tiny_model(tiny):
    from evo2_hydra.model import build_model

    return build_model(tiny, 64, device="meta"), tiny


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_savanna_no_decay_set_is_hcm_filter_h_and_dense_bias(tiny_model):
    model, cfg = tiny_model
    decay, no_decay = split_decay_params(model, NoDecaySet.savanna)
    # evo2_tiny "SDH*SDH*": blocks at sequential.2..9; hcm layers 1 and 5 -> sequential.3 and .7
    expected = {f"sequential.{i}.mixer.dense.bias" for i in range(2, 10)} | {
        "sequential.3.mixer.mixer.filter.h",
        "sequential.7.mixer.mixer.filter.h",
    }
    assert _names(model, no_decay) == expected
    decayed = _names(model, decay)
    # what savanna decays although one would not expect it
    for name in (
        "sequential.2.input_layernorm.weight",  # TE RMSNorm is not a savanna norm class
        "sequential.11.norm.weight",
        "sequential.4.mixer.mixer.filter.gamma",  # ImplicitModalFilter is not exempt
        "sequential.4.mixer.mixer.conv_bias",  # name is not exactly `bias`
        "sequential.2.mixer.mixer.short_conv.short_conv_weight",
        "sequential.0.word_embeddings.weight",
    ):
        assert name in decayed
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_conventional_no_decay_set(tiny_model):
    model, _ = tiny_model
    _, no_decay = split_decay_params(model, NoDecaySet.conventional)
    names = _names(model, no_decay)
    assert "sequential.2.input_layernorm.weight" in names
    assert "sequential.4.mixer.mixer.filter.R" in names
    assert "sequential.4.mixer.mixer.conv_bias" in names
    assert "sequential.0.word_embeddings.weight" in names
    assert "sequential.2.mixer.dense.weight" not in names
    assert "sequential.2.mlp.w1.weight" not in names


def test_param_groups_values(tiny_model):
    model, _ = tiny_model
    groups = param_groups(model, TrainConfig(weight_decay=0.1))
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert len(groups[1]["params"]) == 10
    (only,) = param_groups(model, TrainConfig(weight_decay=0.0))
    assert len(only["params"]) == len(list(model.parameters()))


def test_batch_plan():
    p = batch_plan(world_size=16, micro_batch=2, grad_accum=4)
    assert (p.data_parallel, p.global_batch) == (16, 128)
    assert p.tokens_per_step(8192) == 128 * 8192
    p = batch_plan(world_size=16, micro_batch=1, grad_accum=1, mp=4)
    assert (p.data_parallel, p.global_batch) == (4, 4)
    with pytest.raises(UserError, match="not divisible"):
        batch_plan(world_size=6, micro_batch=1, grad_accum=1, mp=4)
    with pytest.raises(UserError, match="micro_batch_size=0"):
        batch_plan(world_size=1, micro_batch=0, grad_accum=1)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config(stage):
    train = TrainConfig(
        zero_stage=stage, precision=Dtype.bfloat16, micro_batch_size=2, grad_accum_steps=3
    )
    cfg = deepspeed_config(train, batch_plan(4, 2, 3))
    assert cfg["train_batch_size"] == 24
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"]["stage"] == stage
    assert "optimizer" not in cfg and "scheduler" not in cfg  # ours are passed in
    fp32 = deepspeed_config(
        TrainConfig(zero_stage=stage, precision=Dtype.float32), batch_plan(1, 1, 1)
    )
    assert fp32["bf16"] == {"enabled": False}


def test_memory_model_states_by_hand():
    # bf16 on 8 ranks: stage 0 16 (+4: DeepSpeed's fp32 gradient copy without ZeRO),
    # stage 1 4 + 12/8, stage 2 2 + 14/8, stage 3 16/8 bytes/param
    totals = [sum(model_state_bytes_per_param(s, Dtype.bfloat16, 8)) for s in range(4)]
    assert totals == [20.0, 5.5, 3.75, 2.0]
    totals = [sum(model_state_bytes_per_param(s, Dtype.float32, 4)) for s in range(4)]
    assert totals == [16.0, 10.0, 7.0, 4.0]


def test_memory_estimate_by_hand(compose_cfg):
    run = to_obj(compose_cfg(["model=evo2_7b", "ckpt.context=8192"]))
    m = run.model  # D 4096, F 11008, 32 layers (27 Hyena, 5 attention), V 512
    d, f = 4096, 11008
    block = 2 * (16 * d + 4 * f)  # bf16
    hyena = block + 24 * d
    no_ckpt = (27 * hyena + 5 * block + 10 * 512) * 8192
    assert activation_bytes(m, 8192, 1, Dtype.bfloat16, False) == no_ckpt
    with_ckpt = (32 * 2 * d + hyena + 10 * 512) * 8192
    assert activation_bytes(m, 8192, 1, Dtype.bfloat16, True) == with_ckpt

    train = TrainConfig(zero_stage=1, precision=Dtype.bfloat16, activation_checkpointing=True)
    est = estimate_memory(m, 8192, train, world_size=8, gpu_memory_gb=80)
    p = est.params
    assert 6.4e9 < p < 6.6e9  # Evo 2 7B
    assert est.weights_gb == pytest.approx(2 * p / GIB)
    assert est.optimizer_gb == pytest.approx(12 * p / 8 / GIB)
    assert est.activations_gb == pytest.approx(with_ckpt / GIB)
    assert est.total_gb == pytest.approx((5.5 * p + est.buffer_bytes + with_ckpt) / GIB + 2.0)
    assert est.fits
    # without activation checkpointing at 8K the 7B does not fit in 80 GB
    train = TrainConfig(zero_stage=1, activation_checkpointing=False)
    no = estimate_memory(m, 8192, train, world_size=8, gpu_memory_gb=80)
    assert not no.fits and no.activations_gb == pytest.approx(no_ckpt / GIB)


def test_finetune_refuses_a_run_that_does_not_fit(compose_cfg):
    from evo2_hydra.train.memory import check_fits

    run = to_obj(compose_cfg(["model=evo2_7b", "ckpt.context=8192", "cluster.gpu_memory_gb=40"]))
    with pytest.raises(UserError, match=r"plan: evo2_7b .*plan.force=true"):
        check_fits(run)
    forced = to_obj(
        compose_cfg(
            ["model=evo2_7b", "ckpt.context=8192", "cluster.gpu_memory_gb=40", "plan.force=true"]
        )
    )
    assert not check_fits(forced).fits


def test_gpu_requested_where_none_exists(monkeypatch):
    from evo2_hydra.distributed import resolve_device_kind, setup_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="cluster.device=cuda but no CUDA GPU"):
        setup_distributed(ClusterConfig(device=Device.cuda))
    assert resolve_device_kind(Device.auto) == "cpu"


def test_world_size_mismatch_is_named(monkeypatch):
    from evo2_hydra.distributed import SINGLE_MARKER, export_launcher_env, setup_distributed

    monkeypatch.delenv(SINGLE_MARKER, raising=False)  # as if torchrun started this process
    for var, value in dict(
        RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"
    ).items():
        monkeypatch.setenv(var, value)
    assert export_launcher_env() == "torchrun"
    with pytest.raises(UserError, match=r"WORLD_SIZE=3.*cluster.world_size=2"):
        setup_distributed(ClusterConfig(tasks=2))


def test_single_process_env(monkeypatch):
    from evo2_hydra.distributed import export_launcher_env

    for var in (
        "RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "LOCAL_RANK",
        "SUBMITIT_EXECUTOR",
    ):
        monkeypatch.setenv(var, "x")  # recorded, so the test restores the caller's environment
        monkeypatch.delenv(var)
    assert export_launcher_env() == "single"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == (
        "0",
        "1",
        "0",
    )
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
