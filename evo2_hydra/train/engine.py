"""The DeepSpeed engine, built from the typed config.

`batch_plan` and `deepspeed_config` are pure functions (tested with explicit world sizes);
`build_engine` is the only place that calls `deepspeed.initialize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evo2_hydra.config import Dtype, ModelConfig, Offload, TrainConfig
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


# savanna's ZeRO settings (its 7B configs); overlap_comm only pays off with CUDA streams.
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
    if train.offload != Offload.none:
        # ZeRO-Offload: optimizer states and the fp32 master partitions live in CPU memory and
        # the optimizer step runs on the CPU; ZeRO-Infinity also keeps the bf16 parameter
        # partitions there (stage 3), fetching each layer's to the GPU when it runs.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
        if train.offload == Offload.optimizer_and_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    return {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": train.precision == Dtype.bfloat16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # On CPU the torch optimizer already runs where the offloaded states are; on GPU we pass
        # DeepSpeedCPUAdam (optim.build_optimizer), which DeepSpeed asks for.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # we log ourselves (metrics.jsonl, TensorBoard, console)
        "wall_clock_breakdown": False,
    }


def prepare_for_zero3(model: nn.Module) -> None:
    """Make ZeRO-3 gather every parameter a forward actually touches.

    ZeRO-3 gathers a module's *direct* parameters when that module's forward runs. Our Hyena
    filters and short convs are parameter holders read by their parent (their own forward never
    runs), and the output layer reads the tied embedding outside the embedding module. So: each
    Hyena operator is a ZeRO-3 leaf (gathers its filter parameters at once, as savanna's optional
    leaf modules did), the featurizer short conv is an external parameter of its mixer, and the
    tied weight an external parameter of the root module. The projections stay ordinary modules
    with their own hooks, which LoRA adapters inside them need: with whole mixers as leaves,
    backward did not re-gather the adapters of `mixer.dense` (size-0 partition in the matmul).
    """
    from deepspeed.runtime.zero import register_external_parameter
    from deepspeed.utils import set_z3_leaf_modules

    from evo2_hydra.model.layers import HclOperator, HcmOperator, HcsOperator, HyenaMixer

    set_z3_leaf_modules(model, [HcsOperator, HcmOperator, HclOperator])
    for module in model.modules():
        if isinstance(module, HyenaMixer):
            register_external_parameter(module, module.hyena_proj_conv.short_conv_weight)
    register_external_parameter(model, model.embedding.weight)


def _return_large_frees_to_the_os() -> None:
    """CPU runs: serve allocations of 64 KiB and more by mmap, so freed ones go back to the OS.

    zero.Init allocates each module's full tensors and frees them once partitioned. glibc raises
    its mmap threshold adaptively after such frees, after which the next full-size temporaries come
    from the heap and their pages stay with the process: a 2-rank CPU build then kept the whole
    model's worth of memory per rank (measured: 59 MiB instead of 24 MiB for a 40 MiB model).
    A fixed threshold (mallopt M_MMAP_THRESHOLD, which also stops the adaptation) avoids that.
    GPU builds allocate on the device and are unaffected.
    """
    import ctypes
    import sys

    from deepspeed.accelerator import get_accelerator

    if not sys.platform.startswith("linux") or get_accelerator().device_name() != "cpu":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)


def build_zero3_model(
    cfg: ModelConfig,
    context: int,
    ds_config: dict,
    *,
    checkpoint_activations: bool,
    state: dict | None,
    rank: int,
    on_param_loaded=None,
) -> nn.Module:
    """Build the model straight into ZeRO-3 partitions and load `state` one parameter at a time.

    Under `deepspeed.zero.Init` each module's parameters are partitioned as soon as the module
    is constructed, so no rank ever holds the full model. Loading then gathers one parameter at a
    time (`GatheredParameters(param, modifier_rank=0)`): rank 0 copies the source tensor into it
    (the source is memory-mapped: file pages, not process memory), and leaving the block
    broadcasts and re-partitions it. Buffers (`decay`, `t`, `inv_freq`) are not partitioned;
    every rank takes them from the mapped file. `state=None` (resume): nothing is loaded, the
    ZeRO-3 checkpoint fills parameters and buffers.
    """
    import deepspeed

    from evo2_hydra.model.layers import HcmOperator
    from evo2_hydra.model.model import StripedHyena2, _keep_t_float32
    from evo2_hydra.model.state import OPTIONAL_SUFFIXES, check_state_dict, is_ignored

    if state is not None:
        check_state_dict(
            cfg, context, {k: tuple(v.shape) for k, v in state.items() if not is_ignored(k)}
        )
    _return_large_frees_to_the_os()
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = StripedHyena2(cfg, context, checkpoint_activations=checkpoint_activations)
    _keep_t_float32(model)
    if state is None:
        return model
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, HcmOperator) and prefix + "filter.h" in state:
            module.source_dtype = state[prefix + "filter.h"].dtype
        for name, param in module.named_parameters(recurse=False):
            key = prefix + name
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    source = state.get(key)
                    if source is None and key.endswith(OPTIONAL_SUFFIXES):
                        param.data.fill_(1.0)
                    elif source is None:
                        raise UserError(f"{key}: missing from the base checkpoint")
                    else:
                        param.data.copy_(source)
                if on_param_loaded is not None:
                    on_param_loaded(key)
        for name in list(module._buffers):
            if name in module._non_persistent_buffers_set or module._buffers[name] is None:
                continue
            key = prefix + name
            if key in state:
                module._buffers[name] = (
                    state[key].detach().to(module._buffers[name].device, copy=True)
                )
    return model


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


def check_zero3_resume(step_dir, world_size: int) -> None:
    """A ZeRO-3 checkpoint resumes only on the world size that wrote it (one shard per rank)."""
    from pathlib import Path

    from evo2_hydra.checkpoint.layout import ZERO3_FILE_RE

    ranks = [m for f in Path(step_dir).iterdir() if (m := ZERO3_FILE_RE.match(f.name))]
    saved = len({m.group(1) for m in ranks})
    if saved and saved != world_size:
        raise UserError(
            f"{step_dir}: a ZeRO-3 checkpoint of {saved} ranks, but this run has {world_size}; "
            f"resume with {saved} processes (cluster.tasks / nodes x gpus_per_node), or gather it "
            f"with `convert.py target=savanna source={step_dir}` and start a new finetune from the "
            "result (ckpt.path=...) on any world size"
        )
