"""`dry_run=true`: validate, print what the run would do, run nothing.

The same report for every cluster option: `cluster=local` prints it here (nothing is trained,
no folder is made); `cluster=slurm` prints it under the sbatch script for each sweep point. It uses
only pure functions (batch plan, DeepSpeed config, memory estimate): no model is built, no data is
read, DeepSpeed is not imported.
"""

from __future__ import annotations

import json
from pathlib import Path

from evo2_hydra.config import DataConfig, RunConfig, Task


def describe(run: RunConfig) -> list[str]:
    """The dry-run report of one run, as lines."""
    lines = [
        f"task: {run.task.value}, model {run.model.name}, ckpt {run.ckpt.name} "
        f"(context {run.ckpt.context}), cluster {run.cluster.kind.value}",
        f"run folder: {Path(run.output_dir).absolute()}",
    ]
    if run.task in (Task.finetune, Task.preprocess):
        lines += [
            f"data: {DataConfig.as_list(run.data.input) or '(none)'}, "
            f"packing {run.data.packing.value}, cache {run.data.cache_dir}",
        ]
    if run.task in (Task.finetune, Task.score, Task.generate):
        lines.append(f"weights: {run.ckpt.path or '(fresh initialisation)'}")
    if run.task == Task.score:
        lines.append(f"score: {run.score.input} -> {run.score.output or '<run folder>/score'}")
    if run.task == Task.generate:
        lines.append(f"generate: {run.generate.n} x {run.generate.length} tokens")
    if run.task == Task.finetune:
        from evo2_hydra.train.engine import batch_plan, deepspeed_config
        from evo2_hydra.train.memory import describe as describe_memory
        from evo2_hydra.train.memory import run_memory_estimate

        t = run.train
        plan = batch_plan(run.cluster.world_size, t.micro_batch_size, t.grad_accum_steps)
        lines += [
            f"batch plan: {plan.micro_batch} (micro batch) x {plan.grad_accum} (accumulation) x "
            f"{plan.data_parallel} (data-parallel ranks) = {plan.global_batch} samples, "
            f"{plan.tokens_per_step(run.ckpt.context)} tokens per step; {t.steps} steps",
            "DeepSpeed config: " + json.dumps(deepspeed_config(t, plan), sort_keys=True),
            "memory: " + describe_memory(run_memory_estimate(run)),
        ]
    return lines


def print_dry_run(run: RunConfig) -> None:
    """Print the report for `cluster=local` and run nothing."""
    print("dry run: nothing runs.")
    print("\n".join(describe(run)))
