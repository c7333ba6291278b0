"""The training loop: micro-steps through the DeepSpeed engine, evaluation, metrics, checkpoints,
and the two ways a run stops early.

- NaN/inf loss: every rank checks before `backward` (so no bad update is applied); the run stops
  with `TrainingDiverged` naming the step, and the last good checkpoint stays `latest`.
- SIGTERM (Slurm preemption, timeout, `kill`) or SIGINT (Ctrl-C): the handler only sets a flag,
  so a signal that arrives mid-step lets the step finish; then every rank saves a checkpoint and
  the loop returns normally (SIGTERM exits 0 so a requeued job auto-resumes from it; SIGINT exits
  130). A second Ctrl-C stops at once (`Interrupted`: one line at the CLI saying whether this
  stop's checkpoint completed first).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist

from evo2_hydra.errors import Interrupted, UserError
from evo2_hydra.train.metrics import MetricsLogger, memory_gb

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class LoopResult:
    """How the training loop ended: last step, last saved step, and what stopped it."""

    last_step: int  # optimizer steps done when the loop ended
    last_saved_step: int | None  # step of the newest checkpoint written or resumed from
    stopped_by: str | None = None  # "SIGTERM" when a signal ended the run early
    losses: dict[int, float] = field(default_factory=dict)  # train loss per step (this session)
    valid_losses: dict[int, float] = field(default_factory=dict)


class StopFlag:
    """Set by SIGTERM or SIGINT; the loop polls it at step boundaries (never interrupts a step).

    A second SIGINT (the user pressing Ctrl-C again) raises `Interrupted`: stop now; it carries
    the step this stop's checkpoint completed at, if it did before the second Ctrl-C.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.saved_step: int | None = None  # the step this stop's checkpoint completed at

    def __bool__(self) -> bool:
        return self.signal_name is not None

    @contextlib.contextmanager
    def installed(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be installed from the main thread
            return
        previous = {sig: signal.getsignal(sig) for sig in signals}

        def handler(signum, _frame):
            name = signal.Signals(signum).name
            if self.signal_name is not None:
                if signum == signal.SIGINT:
                    raise Interrupted(self.saved_step)
                return  # already stopping (Slurm may repeat SIGTERM)
            self.signal_name = name
            hint = " (Ctrl-C again to stop without saving)" if signum == signal.SIGINT else ""
            log.warning("%s received: finishing this step, then saving a checkpoint%s", name, hint)

        for sig in signals:
            signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is true on any rank (every rank must take the same branch)."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def _mean_over_ranks(value: float, device: torch.device) -> float:
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.item() / torch_dist.get_world_size()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()
    }


def _grad_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the gradients (DeepSpeed reports none at ZeRO-0 in fp32)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


@torch.no_grad()
def evaluate(engine, batches: list[dict], loss_fn: Callable, device: torch.device) -> float:
    """Mean validation loss over `batches` (each rank its own shard), averaged over ranks."""
    engine.eval()
    total = 0.0
    for batch in batches:
        batch = _to_device(batch, device)
        total += loss_fn(engine(batch["input_ids"]), batch).item()
    engine.train()
    return _mean_over_ranks(total / max(len(batches), 1), device)


@dataclass
class LoopSettings:
    """The loop's fixed settings: steps, accumulation, cadences."""

    total_steps: int
    grad_accum: int
    tokens_per_step: int  # global tokens per optimizer step (padding included)
    eval_every: int
    save_every: int
    log_every: int
    eval_at_start: bool  # a fresh run evaluates the base weights first (step 0)
    manual_grad_norm: bool  # ZeRO-0 fp32: DeepSpeed does not report the norm


def train_loop(
    engine,
    stream: Iterator[dict],
    eval_batches: list[dict],
    *,
    loss_fn: Callable,
    settings: LoopSettings,
    start_step: int,
    last_saved_step: int | None,
    device: torch.device,
    metrics: MetricsLogger,
    save: Callable[[int], None],
    stop: StopFlag,
) -> LoopResult:
    """Train from `start_step` to `settings.total_steps`; `save(step)` writes a checkpoint."""
    result = LoopResult(last_step=start_step, last_saved_step=last_saved_step)
    if settings.eval_at_start and eval_batches:
        result.valid_losses[start_step] = loss = evaluate(engine, eval_batches, loss_fn, device)
        metrics.valid(start_step, loss)
    step = start_step
    run_start = time.perf_counter()
    while step < settings.total_steps:
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]  # the lr this step's update uses
        micro_losses = []
        grad_norm = None
        for _ in range(settings.grad_accum):
            batch = _to_device(next(stream), device)
            loss = loss_fn(engine(batch["input_ids"]), batch)
            value = loss.item()
            if _any_rank(not torch.isfinite(loss).item(), device):
                where = (
                    f"checkpoints/global_step{result.last_saved_step} is the last good checkpoint"
                    if result.last_saved_step
                    else "no checkpoint of this run was written"
                )
                raise TrainingDiverged(
                    f"train: loss is {value} at step {step + 1}; stopped without applying it, "
                    f"{where} (lower train.lr or check the data)"
                )
            engine.backward(loss)
            if settings.manual_grad_norm and engine.is_gradient_accumulation_boundary():
                grad_norm = _grad_norm(engine.module)
            engine.step()
            micro_losses.append(value)
        step += 1
        step_loss = _mean_over_ranks(sum(micro_losses) / len(micro_losses), device)
        result.losses[step] = step_loss
        result.last_step = step
        if grad_norm is None:
            norm = engine.get_global_grad_norm()
            grad_norm = None if norm is None else float(norm)
        elapsed = time.perf_counter() - t0
        if step % settings.log_every == 0 or step == settings.total_steps:
            metrics.train_step(
                {
                    "step": step,
                    "loss": step_loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": settings.tokens_per_step / elapsed,
                    "memory_gb": memory_gb(device),
                    "time_s": time.perf_counter() - run_start,
                }
            )
        if eval_batches and (step % settings.eval_every == 0 or step == settings.total_steps):
            result.valid_losses[step] = loss = evaluate(engine, eval_batches, loss_fn, device)
            metrics.valid(step, loss)
        stopping = _any_rank(bool(stop), device)
        if step % settings.save_every == 0 or step == settings.total_steps or stopping:
            save(step)  # a second Ctrl-C inside it says itself whether the step was committed
            if stopping:
                stop.saved_step = step  # ... and from here on the flag says it
            result.last_saved_step = step
        if stopping:
            result.stopped_by = stop.signal_name or "signal on another rank"
            log.warning("stopped by %s after step %d; checkpoint saved", result.stopped_by, step)
            break
    return result
