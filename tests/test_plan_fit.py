"""The memory model behind task=plan: hand-computed values, the candidate table and its
recommendation, refusals that name the set-up that fits, and the model-state bytes measured on a
real DeepSpeed engine (CPU, world sizes 1 and 2) per ZeRO stage, full and LoRA."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from evo2_hydra.config import Dtype, Offload, PeftConfig, PeftMethod, TrainConfig
from evo2_hydra.errors import UserError
from evo2_hydra.train.memory import (
    GIB,
    check_fits,
    count_parameters,
    estimate_memory,
    lora_parameters,
    recommend,
    run_memory_estimate,
)
from tests.conftest import to_obj

LORA = PeftConfig(method=PeftMethod.lora)  # rank 16, the five default targets


def test_lora_parameters_by_hand(compose_cfg):
    m = to_obj(compose_cfg(["model=evo2_7b", "ckpt.context=8192"])).model
    d, f, r = 4096, 11008, 16
    # per block: dense_projection r(D+3D), dense r(D+D), w1 r(D+F), w2 r(D+F), w3 r(F+D)
    per_block = r * (4 * d + 2 * d + 3 * (d + f))
    assert lora_parameters(m, 8192, LORA) == 32 * per_block == 35_782_656


def test_lora_zero3_offload_estimates_by_hand(compose_cfg):
    m = to_obj(compose_cfg(["model=evo2_7b", "ckpt.context=8192"])).model
    p, _, _ = count_parameters(m, 8192)
    a = lora_parameters(m, 8192, LORA)
    train = TrainConfig(zero_stage=1, precision=Dtype.bfloat16, activation_checkpointing=True)
    est = estimate_memory(m, 8192, train, world_size=8, gpu_memory_gb=80, peft=LORA)
    assert est.trainable == a
    assert est.weights_gb == pytest.approx((2 * p + 2 * a) / GIB)  # frozen base + adapters
    assert est.grads_gb == pytest.approx(2 * a / GIB)
    assert est.optimizer_gb == pytest.approx(12 * a / 8 / GIB)
    assert est.live_gb == 0

    # ZeRO-3: everything split over 8, plus two blocks' weights gathered while they run
    z3 = estimate_memory(m, 8192, replace(train, zero_stage=3), 8, 80)
    d, f = 4096, 11008
    # the largest block is a Hyena-MR one: projections, dense + bias, MLP, 4 norms, the
    # featurizer conv [3D, 3], conv_bias [D] and the context-wide filter h [256 groups, 8192]
    largest = 4 * d * d + d + 3 * d * f + 4 * d + 9 * d + d + 256 * 8192
    assert z3.weights_gb == pytest.approx(2 * p / 8 / GIB)
    assert z3.live_gb == pytest.approx(2 * 2 * largest / GIB)

    # offload=optimizer at ZeRO-2: optimizer off the GPU; per node 8 ranks x (12 + 4)/8 bytes
    off = estimate_memory(
        m, 8192, replace(train, zero_stage=2, offload=Offload.optimizer), 8, 80, node_ranks=8
    )
    assert off.optimizer_gb == 0
    assert off.host_gb == pytest.approx(8 * (12 + 4) / 8 * p / GIB)
    assert off.grads_gb == pytest.approx(2 * p / 8 / GIB)


def test_plan_recommends_what_fits_and_the_refusal_names_it(compose_cfg):
    args = ["model=evo2_40b", "ckpt.context=8192", "cluster=slurm", "cluster.partition=gpu"]
    args += ["cluster.gpus_per_node=8", "cluster.mem_gb=2048"]
    run = to_obj(compose_cfg(args))
    assert not run_memory_estimate(run).fits  # 40B full at ZeRO-1 on 8x80 GB
    best = recommend(run)
    assert best is not None and not best.lora and best.estimate.fits
    with pytest.raises(UserError) as err:
        check_fits(run)
    msg = str(err.value)
    assert "\n" not in msg and f"use: {best.overrides(run)}" in msg
    # applying the printed overrides gives a run the check accepts
    fixed = to_obj(compose_cfg(args + best.overrides(run).split()))
    assert check_fits(fixed).fits
    # a 24 GB card: 7B full does not fit anywhere; LoRA does, and is recommended
    small = to_obj(
        compose_cfg(
            ["model=evo2_7b", "ckpt.context=8192", "cluster.gpu_memory_gb=24", "cluster.mem_gb=64"]
        )  # fmt: skip
    )
    pick = recommend(small)
    assert pick is not None and pick.lora


def test_offload_beyond_host_memory_is_refused(compose_cfg):
    args = ["model=evo2_40b", "ckpt.context=8192", "cluster=slurm", "cluster.partition=gpu"]
    args += ["cluster.gpus_per_node=8", "cluster.mem_gb=256", "train.zero_stage=3"]
    args += ["train.offload=optimizer"]
    with pytest.raises(
        UserError,
        match=r"train.offload=optimizer puts \d+\.\d GiB in CPU memory per node but the node has 256.0 GiB",
    ):
        check_fits(to_obj(compose_cfg(args)))


def test_plan_prints_the_candidate_table(run_entry):
    res = run_entry(
        "launch.py", "task=plan", "model=evo2_7b", "ckpt.context=8192", "cluster.gpu_memory_gb=24",
        "cluster.mem_gb=64",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "candidates (per GPU" in out and "<- cheapest that fits" in out
    assert "recommended: peft=lora" in out


# ---- measured on a real DeepSpeed engine ------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure_engine(model_cfg, stage: int, precision: Dtype, lora: bool, world: int = 1) -> dict:
    """Build the engine exactly as task=finetune does, take one step, count what this rank holds."""
    from evo2_hydra.config import ClusterConfig
    from evo2_hydra.distributed import setup_distributed
    from evo2_hydra.model import build_model
    from evo2_hydra.peft.lora import add_lora
    from evo2_hydra.train.engine import batch_plan, build_engine, deepspeed_config
    from evo2_hydra.train.optim import AnnealingLR, build_optimizer

    info = setup_distributed(ClusterConfig(tasks=world))
    train = TrainConfig(zero_stage=stage, precision=precision, steps=2)
    torch.manual_seed(0)
    model = build_model(model_cfg, 64, device="cpu")
    if lora:
        add_lora(model, LORA)
    opt = build_optimizer(model, train, info.device)
    engine = build_engine(
        model, opt, AnnealingLR(opt, train), deepspeed_config(train, batch_plan(world, 1, 1))
    )
    loss = engine(torch.randint(0, 255, (1, 64))).float().mean()
    engine.backward(loss)
    engine.step()
    params = list(engine.module.parameters())
    weights = sum(_tensor_bytes(p.ds_tensor if hasattr(p, "ds_tensor") else p.data) for p in params)
    ds_opt = engine.optimizer
    inner = getattr(ds_opt, "optimizer", ds_opt)
    states = sum(
        _tensor_bytes(v)
        for st in inner.state.values()
        for v in st.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    masters = 0
    # fp32 master copies: ZeRO-1/2, ZeRO-3, and the ZeRO-0 bf16 wrapper (FP16_Optimizer)
    names = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat")
    names += ("fp32_groups",)  # FP16_UnfusedOptimizer: a list of tensors per group
    for attr in names:
        if hasattr(ds_opt, attr):
            tensors = getattr(ds_opt, attr)
            tensors = [t for g in tensors for t in (g if isinstance(g, list) else [g])]
            masters = sum(_tensor_bytes(t) for t in tensors)
            break
    trainable = sum(
        (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) for p in params if p.requires_grad
    )
    return {"weights": weights, "optimizer": states + masters, "trainable": trainable}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("lora", [False, True])
def test_model_states_match_a_real_engine(compose_cfg, stage, lora):
    """Weights and optimizer state of the estimate == bytes a DeepSpeed engine holds (bf16)."""
    model_cfg = to_obj(compose_cfg(["ckpt.context=64"])).model
    measured = measure_engine(model_cfg, stage, Dtype.bfloat16, lora)
    train = TrainConfig(zero_stage=stage, precision=Dtype.bfloat16)
    est = estimate_memory(model_cfg, 64, train, 1, 80, peft=LORA if lora else None)
    assert measured["trainable"] == est.trainable
    assert measured["weights"] == round(est.weights_gb * GIB)
    assert measured["optimizer"] == round(est.optimizer_gb * GIB)


def measure_every_stage_on_this_rank(model_cfg) -> dict:
    """One local rank's measurements for ZeRO 0-3, full and LoRA (spawn_local_ranks target)."""
    return {
        (stage, lora): measure_engine(model_cfg, stage, Dtype.bfloat16, lora, world=2)
        for stage in (0, 1, 2, 3)
        for lora in (False, True)
    }


def test_model_states_match_a_real_engine_on_two_ranks(compose_cfg):
    """Per-rank weights and optimizer state of the estimate at world size 2 == the bytes rank 0 of
    a 2-rank DeepSpeed engine holds, at every ZeRO stage, full and LoRA (evo2_tiny's sizes split
    evenly, so DeepSpeed adds no partition padding)."""
    from evo2_hydra.train.local_launch import spawn_local_ranks

    model_cfg = to_obj(compose_cfg(["ckpt.context=64"])).model
    measured = spawn_local_ranks(2, measure_every_stage_on_this_rank, model_cfg)
    for (stage, lora), got in measured.items():
        train = TrainConfig(zero_stage=stage, precision=Dtype.bfloat16)
        est = estimate_memory(model_cfg, 64, train, 2, 80, peft=LORA if lora else None)
        expected = {
            "weights": round(est.weights_gb * GIB),
            "optimizer": round(est.optimizer_gb * GIB),
            "trainable": est.trainable,
        }
        assert got == expected, (stage, lora)


def test_bench_train_tiny_runs():
    """benchmarks/bench_train.py's CPU configuration: four set-ups, FLOPs counted, LoRA smaller."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks/bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--tiny", "--steps", "1", "--warmup", "1"])
    assert len(results) == 4
    assert all(r["tokens_per_s"] > 0 and r["flops_per_step"] > 0 for r in results)
    full = next(r for r in results if not r["lora"] and not r["checkpointing"])
    recompute = next(r for r in results if not r["lora"] and r["checkpointing"])
    lora = next(r for r in results if r["lora"] and not r["checkpointing"])
    assert recompute["flops_per_step"] > full["flops_per_step"]  # the recomputed forward counts
    assert lora["trainable"] < full["trainable"]
