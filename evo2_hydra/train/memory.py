"""Per-GPU memory estimate for a finetune: model states by ZeRO stage, plus activations.

Model states per parameter (the ZeRO paper's accounting, N = data-parallel ranks):

  precision  weights  grads  optimizer (Adam)                       stage 0  1          2              3
  bf16       2        2      12 (fp32 master 4 + exp_avg 4 + sq 4)  16       4 + 12/N   2 + 14/N       16/N
  fp32       4        4      8  (exp_avg 4 + exp_avg_sq 4)          16       8 + 8/N    4 + 12/N       16/N

Buffers (hcm `decay`, hcl `t`, RoPE `inv_freq`) are replicated: 2 bytes each in bf16 (4 in fp32;
`t` is always fp32).

Activations kept for backward, bytes per token (D hidden, F MLP width, V vocab, b = 2 bf16 / 4 fp32):
  block (no checkpointing)  b * (16 D + 4 F)  norms, 3D projection and its conv, gating, mixer
                                               output, MLP w1/w2/activation/product
  + Hyena mixers (S, D, H)  24 D              float32 convolution input, FFT spectra, output
  checkpointed block        b * D             only the block input; one block is recomputed at a
                                               time, so one full block's activations are added once
  logits                    10 V              logits in the compute dtype, their float32 copy and
                                               its gradient (the loss upcasts)
times micro_batch x context. Plus a fixed 2 GiB for the CUDA context, kernels and fragmentation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from evo2_hydra.config import Dtype, ModelConfig, RunConfig, TrainConfig
from evo2_hydra.errors import UserError

GIB = 2**30
OVERHEAD_BYTES = 2 * GIB
HYENA_FP32_BYTES_PER_CHANNEL = 24


@dataclass(frozen=True)
class MemoryEstimate:
    """The per-GPU memory estimate of a finetune, by part, and whether it fits."""

    params: int  # trainable parameters
    buffer_bytes: int
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    buffers_gb: float
    activations_gb: float
    overhead_gb: float
    total_gb: float  # per GPU
    gpu_memory_gb: float  # what the cluster config says one GPU has
    fits: bool

    def as_dict(self) -> dict:
        return asdict(self)


def count_parameters(model: ModelConfig, context: int) -> tuple[int, int, int]:
    """(trainable parameters, buffer elements, float32 buffer elements) from a meta build."""
    from evo2_hydra.model import build_model

    module = build_model(model, context, device="meta")
    params = sum(p.numel() for p in module.parameters())
    buffers = list(module.buffers())
    return (
        params,
        sum(b.numel() for b in buffers),
        sum(b.numel() for b in buffers if b.dtype.is_floating_point and b.element_size() == 4),
    )


def model_state_bytes_per_param(
    zero_stage: int, precision: Dtype, dp: int
) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes per parameter on one rank (table in the module docstring)."""
    w, g, o = (2.0, 2.0, 12.0) if precision == Dtype.bfloat16 else (4.0, 4.0, 8.0)
    if zero_stage >= 1:
        o /= dp
    if zero_stage >= 2:
        g /= dp
    if zero_stage >= 3:
        w /= dp
    return w, g, o


def activation_bytes(
    model: ModelConfig, context: int, micro_batch: int, precision: Dtype, checkpointing: bool
) -> float:
    """Activation bytes per GPU for one micro-batch (with or without activation checkpointing)."""
    b = 2 if precision == Dtype.bfloat16 else 4
    d, f, v = model.hidden_size, model.mlp_inner_size, model.vocab_size
    per_block = [
        b * (16 * d + 4 * f) + (HYENA_FP32_BYTES_PER_CHANNEL * d if kind != "attention" else 0)
        for kind in model.layer_types()
    ]
    if checkpointing:
        per_token = b * d * len(per_block) + max(per_block)
    else:
        per_token = sum(per_block)
    per_token += 10 * v
    return float(per_token) * context * micro_batch


def estimate_memory(
    model: ModelConfig,
    context: int,
    train: TrainConfig,
    world_size: int,
    gpu_memory_gb: float,
    mp: int = 1,
) -> MemoryEstimate:
    """Memory one GPU needs for this finetune; `fits` compares it with `gpu_memory_gb`."""
    params, buffers, fp32_buffers = count_parameters(model, context)
    dp = max(world_size // mp, 1)
    params_per_rank = params / mp
    w, g, o = model_state_bytes_per_param(train.zero_stage, train.precision, dp)
    buf_b = 2 if train.precision == Dtype.bfloat16 else 4
    buffer_bytes = (buffers - fp32_buffers) * buf_b + fp32_buffers * 4
    act = activation_bytes(
        model, context, train.micro_batch_size, train.precision, train.activation_checkpointing
    )
    parts = {
        "weights_gb": w * params_per_rank / GIB,
        "grads_gb": g * params_per_rank / GIB,
        "optimizer_gb": o * params_per_rank / GIB,
        "buffers_gb": buffer_bytes / GIB,
        "activations_gb": act / GIB,
        "overhead_gb": OVERHEAD_BYTES / GIB,
    }
    total = sum(parts.values())
    return MemoryEstimate(
        params=params,
        buffer_bytes=buffer_bytes,
        total_gb=total,
        gpu_memory_gb=gpu_memory_gb,
        fits=total <= gpu_memory_gb,
        **parts,
    )


def run_memory_estimate(run: RunConfig) -> MemoryEstimate:
    """The memory estimate for this run's model, context, training settings and world size."""
    return estimate_memory(
        run.model, run.ckpt.context, run.train, run.cluster.world_size, run.cluster.gpu_memory_gb
    )


def describe(est: MemoryEstimate) -> str:
    """The estimate as one line (total and parts, in GiB)."""
    return (
        f"{est.total_gb:.1f} GiB per GPU (weights {est.weights_gb:.1f}, grads {est.grads_gb:.1f}, "
        f"optimizer {est.optimizer_gb:.1f}, buffers {est.buffers_gb:.2f}, activations "
        f"{est.activations_gb:.1f}, overhead {est.overhead_gb:.1f}) of {est.gpu_memory_gb:g} GiB"
    )


def check_fits(run: RunConfig) -> MemoryEstimate:
    """Refuse a finetune the plan says cannot fit on one GPU, unless plan.force=true."""
    est = run_memory_estimate(run)
    if not est.fits and not run.plan.force:
        raise UserError(
            f"plan: {run.model.name} at ckpt.context={run.ckpt.context} needs about "
            f"{describe(est)} (cluster.gpu_memory_gb); set train.activation_checkpointing=true, "
            "a higher train.zero_stage, more GPUs, a smaller train.micro_batch_size or "
            "ckpt.context, or plan.force=true to run anyway"
        )
    return est
