"""What a run reports: `metrics.jsonl` and TensorBoard in the run folder, a console progress bar,
and `loss.png` at the end. Only rank 0 writes; the other ranks get a logger that does nothing.

Reporting never stops a run: a write that fails (a full disk, a folder made read-only) turns that
output off with one warning, and training and checkpointing go on.

metrics.jsonl holds one JSON object per line:
  {"kind": "train", "step": 12, "loss": 1.23, "lr": 1e-4, "grad_norm": 0.8, "tokens_per_s": 5e3,
   "memory_gb": 0.4, "time_s": 30.1}
  {"kind": "valid", "step": 10, "loss": 1.30, "perplexity": 3.67}
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import sys
from pathlib import Path

import torch

from evo2_hydra.io_utils import atomic_file

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "loss.png"


def memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA max allocated on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl ([] when there is none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """On resume: drop records of steps after the checkpoint we resume from (they get redone)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    try:
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
        with atomic_file(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    except (OSError, ValueError) as err:
        log.warning(
            "%s: not trimmed to step %d (%s); it may list some steps twice", path, last_step, err
        )


class MetricsLogger:
    """Rank 0: append to metrics.jsonl, TensorBoard scalars, a tqdm bar on the console."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        try:
            self._file = open(self.run_dir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115
        except OSError as err:
            self._file_failed(err)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=start_step + 1)
        except ImportError:  # tensorboard is a dependency, but metrics must not die with it
            log.warning("tensorboard is not installed; metrics go to %s only", METRICS_FILE)
        except OSError as err:
            self._tb_failed(err)
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="finetune",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            # a terminal redraws in place; a Slurm log file would get a line per refresh
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
            disable=os.environ.get("EVO2_NO_PROGRESS") == "1",
        )

    def _file_failed(self, err: OSError) -> None:
        log.warning(
            "%s: cannot write metrics (%s); training goes on without them",
            self.run_dir / METRICS_FILE,
            err.strerror or err,
        )
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = None

    def _tb_failed(self, err: OSError) -> None:
        log.warning(
            "%s: cannot write TensorBoard events (%s); training goes on without them",
            self.run_dir / TENSORBOARD_DIR,
            err.strerror or err,
        )
        tb, self._tb = self._tb, None
        if tb is not None:
            with contextlib.suppress(Exception):
                tb.close()

    def _write(self, record: dict) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as err:
            self._file_failed(err)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is None:
            return
        try:
            self._tb.add_scalar(tag, value, step)
        except OSError as err:
            self._tb_failed(err)

    def train_step(self, record: dict) -> None:
        if not self.enabled:
            return
        self._write({"kind": "train", **record})
        step = record["step"]
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "memory_gb"):
            if record.get(key) is not None:
                self._scalar(f"train/{key}", record[key], step)
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            refresh=False,
        )

    def valid(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 80.0))
        self._write({"kind": "valid", "step": step, "loss": loss, "perplexity": ppl})
        self._scalar("valid/loss", loss, step)
        self._scalar("valid/perplexity", ppl, step)
        log.info("step %d: valid loss %.4f, perplexity %.3f", step, loss, ppl)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            try:
                self._tb.close()
            except OSError as err:
                self._tb_failed(err)
        if self._file is not None:
            try:
                self._file.close()
            except OSError as err:
                self._file_failed(err)


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png; a plot that cannot be written is a warning, never the end of a run."""
    try:
        return _plot_losses(run_dir)
    except Exception as err:  # noqa: BLE001 - matplotlib and disk errors alike: report, go on
        log.warning("%s: no loss plot (%s)", Path(run_dir) / PLOT_FILE, err)
        return None


def _plot_losses(run_dir: Path) -> Path | None:
    """loss.png: train loss per step and validation loss per evaluation."""
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    valid = [(r["step"], r["loss"]) for r in records if r["kind"] == "valid"]
    if not train and not valid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.8)
    if valid:
        ax.plot(*zip(*valid), label="valid", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / PLOT_FILE
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
