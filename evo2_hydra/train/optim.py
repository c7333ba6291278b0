"""Optimizer and learning-rate schedule exactly as savanna trained Evo 2 (savanna
`savanna/training.py` `get_optimizer`, `savanna/learning_rates.py` `AnnealingLR`).

- `param_groups`: savanna's two groups (decay, no-decay) built from each module's *direct*
  parameters, or a conventional set (`train.no_decay_set=conventional`).
- `build_optimizer`: torch AdamW (decoupled weight decay, like savanna's FusedAdam with
  adam_w_mode), fused on GPU. Torch's own AdamW needs no DeepSpeed JIT build.
- `AnnealingLR`: savanna's schedule as a torch LR scheduler; DeepSpeed steps it after each
  optimizer step and saves/restores its `state_dict` in checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from evo2_hydra.config import DecayStyle, NoDecaySet, Offload, TrainConfig
from evo2_hydra.errors import UserError
from evo2_hydra.model.layers import (
    ExplicitDecayFilter,
    HcsOperator,
    ModalFilter,
    RMSNorm,
)


def _savanna_no_decay(module: nn.Module, name: str) -> bool:
    """savanna `get_params_for_weight_decay_optimization` (`savanna/model/utils.py`) on the Evo 2
    configs.

    Exempt: savanna's own norm classes (Evo 2 uses TransformerEngine's RMSNorm instead, which is
    NOT exempt: our `RMSNorm` stands for that one, so norms are decayed), the hcm
    `ExplicitSingleDecayFilter` (`filter.h`), `ParallelShortHyenaOperator`'s direct parameters
    (our `HcsOperator`: it has none) and any parameter named exactly `bias` (`mixer.dense.bias`).
    Decayed: everything else, including hcl `filter.gamma/R/p`, `conv_bias`, short convs,
    embeddings and norms. Odd, but it is what trained Evo 2.
    """
    return isinstance(module, (ExplicitDecayFilter, HcsOperator)) or name == "bias"


def _conventional_no_decay(module: nn.Module, name: str) -> bool:
    """No decay for every norm, bias (also `conv_bias`), Hyena filter and embedding."""
    return isinstance(
        module, (RMSNorm, ExplicitDecayFilter, ModalFilter, nn.Embedding)
    ) or name.endswith("bias")


def split_decay_params(
    model: nn.Module, no_decay_set: NoDecaySet
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay) parameter lists, in module registration order; frozen params dropped."""
    exempt = _savanna_no_decay if no_decay_set == NoDecaySet.savanna else _conventional_no_decay
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()  # a tied parameter appears once
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if exempt(module, name) else decay).append(param)
    return decay, no_decay


def param_groups(model: nn.Module, train: TrainConfig) -> list[dict]:
    """savanna's `[{decay}, {no_decay, weight_decay: 0}]`; empty groups are left out.

    With weight decay 0 savanna makes one group of everything.
    """
    decay, no_decay = split_decay_params(model, train.no_decay_set)
    if train.weight_decay == 0:
        return [{"params": decay + no_decay, "weight_decay": 0.0}]
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, train: TrainConfig, device: torch.device):
    """AdamW with savanna's betas/eps/decay: torch's (fused on GPU), or DeepSpeed's CPU Adam
    when the optimizer states are offloaded from a GPU (the step then runs on the CPU; DeepSpeed
    requires its own vectorised CPU optimizer there). Only trainable parameters are passed (a
    LoRA run's frozen base gets no optimizer state).
    """
    groups = param_groups(model, train)
    if not groups or not any(g["params"] for g in groups):
        raise UserError("no trainable parameters: every parameter of the model is frozen")
    betas = (train.adam_beta1, train.adam_beta2)
    if train.offload != Offload.none and device.type == "cuda":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(
            groups,
            lr=train.lr,
            betas=betas,
            eps=train.adam_eps,
            weight_decay=train.weight_decay,
            adamw_mode=True,
        )
    return torch.optim.AdamW(
        groups,
        lr=train.lr,
        betas=betas,
        eps=train.adam_eps,
        weight_decay=train.weight_decay,
        fused=device.type == "cuda" and train.offload == Offload.none,
    )


def annealing_lr(
    step: int,
    *,
    start_lr: float,
    min_lr: float,
    warmup_iters: float,
    decay_iters: int,
    style: DecayStyle,
) -> float:
    """savanna `AnnealingLR.get_lr` for `num_iters = step` (0 at the first optimizer step).

    Warmup is linear from 0 and not clamped to min_lr (so the first update uses lr 0); the
    cosine decays over `decay_iters` counted from the end of warmup but divides by
    `decay_iters`, not `decay_iters - warmup`, so it ends above min_lr when warmup > 0.
    """
    w, e = warmup_iters, decay_iters
    n = min(step, e - w)
    if w > 0 and step <= w:
        return float(start_lr) * n / w
    n -= w
    if style == DecayStyle.linear:
        lr = start_lr * (e - n) / e
    elif style == DecayStyle.cosine:
        lr = start_lr / 2.0 * (math.cos(math.pi * n / e) + 1)
    elif style == DecayStyle.exponential:
        lr = start_lr * math.exp(-0.693 * n / e)
    else:
        lr = start_lr
    return max(lr, min_lr)


class AnnealingLR(torch.optim.lr_scheduler.LRScheduler):
    """savanna's AnnealingLR as a torch scheduler: `last_epoch` is savanna's `num_iters`.

    Construction applies the lr of step 0; every `step()` (DeepSpeed calls it after each
    optimizer step) moves to the next. The state dict has savanna's keys, so checkpoints carry
    the same `lr_scheduler` entry savanna writes.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig) -> None:
        self.start_lr = train.lr
        self.min_lr = train.min_lr
        self.end_iter = train.lr_decay_steps or train.steps
        self.warmup_iter = train.warmup * self.end_iter  # a float, as in savanna
        self.decay_style = DecayStyle(train.decay_style)
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        return annealing_lr(
            step,
            start_lr=self.start_lr,
            min_lr=self.min_lr,
            warmup_iters=self.warmup_iter,
            decay_iters=self.end_iter,
            style=self.decay_style,
        )

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch) for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {
            "start_lr": self.start_lr,
            "warmup_iter": self.warmup_iter,
            "num_iters": self.last_epoch,
            "decay_style": self.decay_style.value,
            "end_iter": self.end_iter,
            "min_lr": self.min_lr,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume: take the schedule and position from the checkpoint (savanna forces
        `use_checkpoint_lr_scheduler` when resuming), then re-apply the lr of that step.
        """
        self.start_lr = state_dict["start_lr"]
        self.warmup_iter = state_dict["warmup_iter"]
        self.end_iter = state_dict["end_iter"]
        self.decay_style = DecayStyle(state_dict["decay_style"])
        self.min_lr = state_dict["min_lr"]
        self.last_epoch = state_dict["num_iters"]
        lr = self.lr_at(self.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr for _ in self.optimizer.param_groups]
