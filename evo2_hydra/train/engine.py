"""The DeepSpeed engine, built from the typed config.

`batch_plan` and `deepspeed_config` are pure functions (tested with explicit world sizes);
`build_engine` is the only place that calls `deepspeed.initialize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evo2_hydra.config import Dtype, TrainConfig
from evo2_hydra.errors import UserError


@dataclass(frozen=True)
class BatchPlan:
    """How samples are split over ranks and micro-steps for one optimizer step."""

    world_size: int  # processes in the job
    model_parallel: int  # processes sharing one model replica (1: no tensor parallelism)
    data_parallel: int  # model replicas = world_size / model_parallel
    micro_batch: int  # samples per process per micro-step
    grad_accum: int  # micro-steps per optimizer step
    global_batch: int  # samples per optimizer step = micro_batch x grad_accum x data_parallel

    def tokens_per_step(self, context: int) -> int:
        return self.global_batch * context


def batch_plan(world_size: int, micro_batch: int, grad_accum: int, mp: int = 1) -> BatchPlan:
    """Global batch from the real world size (savanna: train_batch_size = micro x acc x dp)."""
    for name, value in (
        ("world size", world_size),
        ("train.micro_batch_size", micro_batch),
        ("train.grad_accum_steps", grad_accum),
        ("model parallel size", mp),
    ):
        if value <= 0:
            raise UserError(f"{name}={value}: must be positive")
    if world_size % mp:
        raise UserError(f"world size {world_size} is not divisible by the model-parallel size {mp}")
    dp = world_size // mp
    return BatchPlan(world_size, mp, dp, micro_batch, grad_accum, micro_batch * grad_accum * dp)


# savanna's ZeRO settings (spec §7.4); overlap_comm only pays off with CUDA streams.
_BUCKET = 500_000_000


def deepspeed_config(train: TrainConfig, plan: BatchPlan, *, gpu: bool = False) -> dict:
    """The DeepSpeed config dict for this run (no optimizer/scheduler: we pass our own)."""
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage in (1, 2):
        zero.update(
            allgather_partitions=True,
            allgather_bucket_size=_BUCKET,
            reduce_scatter=True,
            reduce_bucket_size=_BUCKET,
            contiguous_gradients=True,
            overlap_comm=gpu,
        )
    elif train.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=_BUCKET,
            stage3_max_live_parameters=1_000_000_000,
            stage3_param_persistence_threshold=0,
            reduce_bucket_size=_BUCKET,
            contiguous_gradients=True,
            overlap_comm=gpu,
        )
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": train.precision == Dtype.bfloat16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves (metrics.jsonl, TensorBoard, console)
        "wall_clock_breakdown": False,
    }


def prepare_for_zero3(model: nn.Module) -> None:
    """Make ZeRO-3 gather every parameter a forward actually touches.

    ZeRO-3 gathers a module's *direct* parameters when that module's forward runs. Our Hyena
    filters and short convs are parameter holders read by their parent operator (their own
    forward never runs), and the output layer reads the tied embedding outside the embedding
    module. So: each mixer is a ZeRO-3 leaf (gathers all its parameters at once, as savanna's
    optional leaf modules did), and the tied weight is registered as an external parameter of
    the root module.
    """
    from deepspeed.runtime.zero import register_external_parameter
    from deepspeed.utils import set_z3_leaf_modules

    from evo2_hydra.model.layers import AttentionMixer, HyenaMixer

    set_z3_leaf_modules(model, [HyenaMixer, AttentionMixer])
    register_external_parameter(model, model.embedding.weight)


def build_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ds_config: dict,
):
    """`deepspeed.initialize` with our torch optimizer and scheduler; returns the engine."""
    import deepspeed

    if ds_config["zero_optimization"]["stage"] == 3:
        prepare_for_zero3(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine
