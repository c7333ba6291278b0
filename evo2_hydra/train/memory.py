"""Per-GPU memory estimate for a finetune, and the candidate set-ups `task=plan` ranks.

Model states per parameter (the ZeRO paper's accounting, N = data-parallel ranks):

  precision  weights  grads  optimizer (Adam)                       stage 0  1          2              3
  bf16       2        2      12 (fp32 master 4 + exp_avg 4 + sq 4)  20 (*)   4 + 12/N   2 + 14/N       16/N
  fp32       4        4      8  (exp_avg 4 + exp_avg_sq 4)          16       8 + 8/N    4 + 12/N       16/N

(*) DeepSpeed's bf16 path without ZeRO (FP16_Optimizer over bf16) also holds a flat fp32 copy of
the gradients: 4 more bytes. Weights and optimizer bytes per stage are checked against a real
engine in tests/test_plan_fit.py.

LoRA (`peft=lora`): the frozen base holds weights only (2 bytes bf16 / 4 fp32, split over N at
ZeRO-3); the adapters (r x (in + out) per adapted linear) carry weights, grads and optimizer state
as in the table.

ZeRO-3 also gathers full parameters while a layer runs: the layer being computed and the one
prefetched, 2 x the largest block's weights (`live_gb`).

Offload (`train.offload`): `optimizer` moves the optimizer states and an fp32 gradient partition
(4/N bytes per trainable parameter) to CPU memory; `optimizer_and_params` (ZeRO-3) also the weight
partitions. What moves is counted per node in `host_gb` (ranks per node x per-rank share) and
compared with the node's memory (cluster.mem_gb, or this machine's RAM for cluster=local).

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
  LoRA                      b * r per adapted linear (the adapter's hidden activation)
times micro_batch x context. Plus a fixed 2 GiB for the CUDA context, kernels and fragmentation.

Relative cost (the plan's ranking; a model, not a measurement): FLOPs per token relative to a
full finetune without recomputation (forward 1 + backward 2 = 3 units): LoRA skips the weight
gradients of the frozen base (backward ~1 unit: 2 in all), activation checkpointing adds one
forward (+1). Then fixed factors for communication and host traffic: ZeRO-3 on more than one rank
x1.15 (parameter all-gathers in forward and backward), optimizer offload x1.3 (CPU Adam and the
PCIe round trip of gradients and weights; x1.02 for LoRA's small states), parameter offload x1.6,
micro batch 1 instead of a larger one x1.1 (lower GPU utilisation per step).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, replace

from evo2_hydra.config import (
    ClusterKind,
    Dtype,
    ModelConfig,
    Offload,
    PeftConfig,
    PeftMethod,
    RunConfig,
    TrainConfig,
)
from evo2_hydra.errors import UserError

GIB = 2**30
OVERHEAD_BYTES = 2 * GIB
HYENA_FP32_BYTES_PER_CHANNEL = 24
ZERO3_COMM_FACTOR = 1.15
OFFLOAD_OPTIMIZER_FACTOR = 1.3
OFFLOAD_OPTIMIZER_FACTOR_LORA = 1.02
OFFLOAD_PARAMS_FACTOR = 1.6
MICRO_BATCH_ONE_FACTOR = 1.1


@dataclass(frozen=True)
class MemoryEstimate:
    """The per-GPU memory estimate of a finetune, by part, and whether it fits."""

    params: int  # all parameters of the model
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
    trainable: int = 0  # parameters with gradients and optimizer state (adapters under LoRA)
    live_gb: float = 0.0  # ZeRO-3: full parameters gathered while layers run
    host_gb: float = 0.0  # offloaded to CPU memory, per node
    host_memory_gb: float | None = None  # CPU memory per node (None: unknown)
    host_fits: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=32)
def _shapes(model_json: str, context: int) -> tuple[dict, dict, int, int, int]:
    """(parameter shapes, linear module shapes, buffer elements, fp32 buffer elements, largest
    block's parameters) from a meta build; cached (a 40B meta build takes a moment).
    """
    from torch import nn

    from evo2_hydra.model import build_model

    model = build_model(ModelConfig(**json.loads(model_json)), context, device="meta")
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    linears = {
        n: (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }
    buffers = list(model.buffers())
    largest = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    return (
        params,
        linears,
        sum(b.numel() for b in buffers),
        sum(b.numel() for b in buffers if b.dtype.is_floating_point and b.element_size() == 4),
        largest,
    )


def _model_key(model: ModelConfig) -> str:
    return json.dumps(asdict(model), sort_keys=True, default=str)


def count_parameters(model: ModelConfig, context: int) -> tuple[int, int, int]:
    """(parameters, buffer elements, float32 buffer elements) from a meta build."""
    params, _, buffers, fp32_buffers, _ = _shapes(_model_key(model), context)
    return sum(_numel(s) for s in params.values()), buffers, fp32_buffers


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def lora_targets(model: ModelConfig, context: int, peft: PeftConfig) -> dict[str, tuple[int, int]]:
    """Adapted linear modules -> (in, out), resolved as training resolves them (bad patterns or
    ranks raise the same one-line errors).
    """
    from torch import nn

    from evo2_hydra.peft.lora import resolve_targets

    _, linears, *_ = _shapes(_model_key(model), context)
    holder = nn.Module()  # resolve_targets only needs named_modules() of linear layers
    for name, (i, o) in linears.items():
        module: nn.Module = holder
        parts = name.split(".")
        for part in parts[:-1]:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.add_module(parts[-1], nn.Linear(i, o, bias=False, device="meta"))
    return {name: linears[name] for name in resolve_targets(holder, peft)}


def lora_parameters(model: ModelConfig, context: int, peft: PeftConfig) -> int:
    """Adapter parameters: r x (in + out) per adapted linear."""
    return sum(peft.rank * (i + o) for i, o in lora_targets(model, context, peft).values())


def model_state_bytes_per_param(
    zero_stage: int, precision: Dtype, dp: int
) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes per parameter on one rank (table in the module docstring)."""
    w, g, o = (2.0, 2.0, 12.0) if precision == Dtype.bfloat16 else (4.0, 4.0, 8.0)
    if zero_stage == 0 and precision == Dtype.bfloat16:
        g += 4.0  # DeepSpeed's bf16 wrapper without ZeRO keeps a flat fp32 gradient copy
    if zero_stage >= 1:
        o /= dp
    if zero_stage >= 2:
        g /= dp
    if zero_stage >= 3:
        w /= dp
    return w, g, o


def activation_bytes(
    model: ModelConfig,
    context: int,
    micro_batch: int,
    precision: Dtype,
    checkpointing: bool,
    lora_rank_per_token: int = 0,
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
    per_token += 10 * v + b * lora_rank_per_token
    return float(per_token) * context * micro_batch


def host_memory_gb(run: RunConfig) -> float | None:
    """CPU memory of one node: cluster.mem_gb, else this machine's RAM for cluster=local."""
    if run.cluster.mem_gb is not None:
        return float(run.cluster.mem_gb)
    if run.cluster.kind == ClusterKind.local:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        except (ValueError, OSError):
            return None
    return None


def ranks_per_node(run: RunConfig) -> int:
    """Processes sharing one node's CPU memory (for offload accounting)."""
    c = run.cluster
    if c.kind == ClusterKind.local:
        return c.tasks
    return c.gpus_per_node if c.gpus_per_node > 0 else c.tasks_per_node


def estimate_memory(
    model: ModelConfig,
    context: int,
    train: TrainConfig,
    world_size: int,
    gpu_memory_gb: float,
    mp: int = 1,
    *,
    peft: PeftConfig | None = None,
    host_memory: float | None = None,
    node_ranks: int = 1,
) -> MemoryEstimate:
    """Memory one GPU needs for this finetune; `fits` compares it with `gpu_memory_gb` (and, when
    something is offloaded, the node's CPU memory with `host_memory`).
    """
    params, buffers, fp32_buffers = count_parameters(model, context)
    largest_block = _shapes(_model_key(model), context)[4]
    dp = max(world_size // mp, 1)
    stage = train.zero_stage
    b = 2 if train.precision == Dtype.bfloat16 else 4
    w, g, o = model_state_bytes_per_param(stage, train.precision, dp)
    lora = peft is not None and peft.method == PeftMethod.lora
    if lora:
        trainable = lora_parameters(model, context, peft)
        frozen = params
        lora_act = peft.rank * len(lora_targets(model, context, peft)) // max(model.num_layers, 1)
        lora_act *= model.num_layers if not train.activation_checkpointing else 1
    else:
        trainable, frozen, lora_act = params, 0, 0
    per_rank = 1 / mp
    weights = (frozen * (b / dp if stage >= 3 else b) + w * trainable) * per_rank
    grads = g * trainable * per_rank
    optimizer = o * trainable * per_rank
    host = 0.0
    if train.offload != Offload.none:
        fp32_grads = 4.0 * trainable * per_rank / (dp if stage >= 1 else 1)
        host += optimizer + fp32_grads
        optimizer = 0.0
        if train.offload == Offload.optimizer_and_params:
            host += weights
            weights = 0.0
    live = 2 * largest_block * b / mp if stage >= 3 else 0.0
    buffer_bytes = (buffers - fp32_buffers) * b + fp32_buffers * 4
    act = activation_bytes(
        model,
        context,
        train.micro_batch_size,
        train.precision,
        train.activation_checkpointing,
        lora_act,
    )
    parts = {
        "weights_gb": weights / GIB,
        "grads_gb": grads / GIB,
        "optimizer_gb": optimizer / GIB,
        "buffers_gb": buffer_bytes / GIB,
        "activations_gb": act / GIB,
        "overhead_gb": OVERHEAD_BYTES / GIB,
        "live_gb": live / GIB,
    }
    total = sum(parts.values())
    host_gb = host * node_ranks / GIB
    host_fits = host_memory is None or host_gb <= host_memory
    return MemoryEstimate(
        params=params,
        buffer_bytes=buffer_bytes,
        total_gb=total,
        gpu_memory_gb=gpu_memory_gb,
        fits=total <= gpu_memory_gb and host_fits,
        trainable=trainable,
        host_gb=host_gb,
        host_memory_gb=host_memory,
        host_fits=host_fits,
        **parts,
    )


def run_memory_estimate(run: RunConfig) -> MemoryEstimate:
    """The memory estimate for this run's model, context, training settings and world size."""
    return estimate_memory(
        run.model,
        run.ckpt.context,
        run.train,
        run.cluster.world_size,
        run.cluster.gpu_memory_gb,
        peft=run.peft,
        host_memory=host_memory_gb(run) if run.train.offload != Offload.none else None,
        node_ranks=ranks_per_node(run),
    )


def describe(est: MemoryEstimate) -> str:
    """The estimate as one line (total and parts, in GiB)."""
    live = f", gathered {est.live_gb:.1f}" if est.live_gb else ""
    host = f"; {est.host_gb:.1f} GiB offloaded per node" if est.host_gb else ""
    return (
        f"{est.total_gb:.1f} GiB per GPU (weights {est.weights_gb:.1f}, grads {est.grads_gb:.1f}, "
        f"optimizer {est.optimizer_gb:.1f}, buffers {est.buffers_gb:.2f}, activations "
        f"{est.activations_gb:.1f}{live}, overhead {est.overhead_gb:.1f}) of "
        f"{est.gpu_memory_gb:g} GiB{host}"
    )


# ---- candidates: what the plan ranks ----------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One set-up the plan considers: method, ZeRO stage, recomputation, offload, micro batch."""

    lora: bool
    zero_stage: int
    checkpointing: bool
    offload: Offload
    micro_batch: int
    estimate: MemoryEstimate
    cost: float  # relative to a full finetune, ZeRO-1, no recomputation, no offload

    def overrides(self, run: RunConfig) -> str:
        """The exact launch.py overrides that select this set-up."""
        out = [
            f"peft={'lora' if self.lora else 'none'}",
            f"train.zero_stage={self.zero_stage}",
            f"train.activation_checkpointing={'true' if self.checkpointing else 'false'}",
            f"train.offload={self.offload.value}",
            f"train.micro_batch_size={self.micro_batch}",
        ]
        if self.micro_batch != run.train.micro_batch_size:
            # keep the global batch: more micro-steps per optimizer step
            accum = run.train.grad_accum_steps * run.train.micro_batch_size // self.micro_batch
            out.append(f"train.grad_accum_steps={max(accum, 1)}")
        return " ".join(out)

    def label(self) -> str:
        return (
            f"{'LoRA' if self.lora else 'full'} ZeRO-{self.zero_stage} "
            f"ckpt={'on' if self.checkpointing else 'off'} offload={self.offload.value} "
            f"micro={self.micro_batch}"
        )


def relative_cost(
    lora: bool, zero_stage: int, checkpointing: bool, offload: Offload, micro_one: bool, dp: int
) -> float:
    """Time per token relative to a full finetune at ZeRO-1 without recomputation (1.0)."""
    units = (2.0 if lora else 3.0) + (1.0 if checkpointing else 0.0)
    cost = units / 3.0
    if zero_stage == 3 and dp > 1:
        cost *= ZERO3_COMM_FACTOR
    if offload != Offload.none:
        cost *= OFFLOAD_OPTIMIZER_FACTOR_LORA if lora else OFFLOAD_OPTIMIZER_FACTOR
    if offload == Offload.optimizer_and_params:
        cost *= OFFLOAD_PARAMS_FACTOR
    if micro_one:
        cost *= MICRO_BATCH_ONE_FACTOR
    return cost


def candidates(run: RunConfig) -> list[Candidate]:
    """Every set-up the plan considers for this model, context and cluster, cheapest first."""
    lora_peft = run.peft if run.peft.enabled else PeftConfig(method=PeftMethod.lora)
    micro_batches = sorted({run.train.micro_batch_size, 1}, reverse=True)
    dp = max(run.cluster.world_size, 1)
    host = host_memory_gb(run)
    out = []
    for lora in (False, True):
        for stage in (0, 1, 2, 3):
            offloads = [Offload.none]
            if stage >= 1:
                offloads.append(Offload.optimizer)
            if stage == 3:
                offloads.append(Offload.optimizer_and_params)
            for offload in offloads:
                for ckpt in (False, True):
                    for micro in micro_batches:
                        train = replace(
                            run.train,
                            zero_stage=stage,
                            activation_checkpointing=ckpt,
                            offload=offload,
                            micro_batch_size=micro,
                        )
                        est = estimate_memory(
                            run.model,
                            run.ckpt.context,
                            train,
                            run.cluster.world_size,
                            run.cluster.gpu_memory_gb,
                            peft=lora_peft if lora else None,
                            host_memory=host if offload != Offload.none else None,
                            node_ranks=ranks_per_node(run),
                        )
                        cost = relative_cost(
                            lora, stage, ckpt, offload, micro < run.train.micro_batch_size, dp
                        )
                        out.append(Candidate(lora, stage, ckpt, offload, micro, est, cost))
    return sorted(out, key=lambda c: (c.cost, c.estimate.total_gb))


def recommend(run: RunConfig, cands: list[Candidate] | None = None) -> Candidate | None:
    """The cheapest candidate that fits, keeping the run's method (full or LoRA) when any of that
    method fits; else the cheapest of the other method; None when nothing fits.
    """
    cands = candidates(run) if cands is None else cands
    fitting = [c for c in cands if c.estimate.fits]
    same = [c for c in fitting if c.lora == run.peft.enabled]
    pick = same or fitting
    return pick[0] if pick else None


def short_table(run: RunConfig, cands: list[Candidate]) -> list[Candidate]:
    """The candidates worth showing: per method, those no other candidate beats on both memory
    and cost (the Pareto front), cheapest first.
    """
    shown = []
    for lora in (False, True):
        best_mem = float("inf")
        for c in sorted(
            (c for c in cands if c.lora == lora), key=lambda c: (c.cost, c.estimate.total_gb)
        ):
            if c.estimate.total_gb < best_mem - 1e-9:
                shown.append(c)
                best_mem = c.estimate.total_gb
    return sorted(shown, key=lambda c: (c.lora, c.cost))


def _shape(run: RunConfig) -> str:
    c = run.cluster
    nodes = 1 if c.kind == ClusterKind.local else c.nodes
    per_node = ranks_per_node(run)
    return f"{nodes}x{per_node} GPUs of {c.gpu_memory_gb:g} GiB"


def check_fits(run: RunConfig) -> MemoryEstimate:
    """Refuse a finetune the plan says cannot fit, naming the cheapest set-up that does (one
    line), unless plan.force=true. Offload beyond the node's CPU memory is refused the same way.
    """
    est = run_memory_estimate(run)
    if est.fits or run.plan.force:
        return est
    where = f"{run.model.name} at ckpt.context={run.ckpt.context} on {_shape(run)}"
    if not est.host_fits:
        problem = (
            f"train.offload={run.train.offload.value} puts {est.host_gb:.1f} GiB in CPU memory per "
            f"node but the node has {est.host_memory_gb:.1f} GiB (cluster.mem_gb)"
        )
    else:
        problem = f"needs about {describe(est)} (cluster.gpu_memory_gb)"
    best = recommend(run)
    if best is None:
        advice = (
            "no set-up fits (full or LoRA, any ZeRO stage, offload, micro batch 1): use more or "
            "larger GPUs or a shorter ckpt.context"
        )
    else:
        advice = (
            f"cheapest set-up that fits: {best.label()} at {best.estimate.total_gb:.1f} GiB per "
            f"GPU, use: {best.overrides(run)}"
        )
    raise UserError(f"plan: {where}: {problem}; {advice} (or plan.force=true to run anyway)")
