"""`task=finetune`: prepare data and base weights, then train with DeepSpeed; auto-resumes.

python launch.py                                     # the demo: evo2_tiny on the example data, CPU
python launch.py cluster.tasks=2 train.zero_stage=2  # two local processes
python launch.py model=evo2_7b ckpt=savanna_evo2_7b ckpt.path=/ckpts/savanna_evo2_7b.pt ckpt.context=4096

Run folder (`output_dir`): config.yaml, checkpoints/{latest, global_stepN/}, metrics.jsonl,
tensorboard/, loss.png. The prepared base weights live in paths.cache_dir/base_checkpoints/ (shared).
Starting the same command again in the same folder continues from `checkpoints/latest`.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import yaml
from omegaconf import OmegaConf

from evo2_hydra.config import ClusterKind, Precision, RunConfig
from evo2_hydra.distributed import DistInfo, launched_externally, setup_distributed
from evo2_hydra.errors import UserError
from evo2_hydra.io_utils import write_text_atomic

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"
# Settings that may change between a run and its continuation (schedule length, cadence, where
# it runs); anything else differing means the folder belongs to another run.
RESUMABLE_CHANGES = {
    "train.steps",
    "train.save_every",
    "train.keep_last",
    "train.eval_every",
    "train.eval_steps",
    "train.log_every",
    "train.resume",
}
IDENTITY_SECTIONS = ("model", "ckpt", "data", "train", "seed")


def config_yaml(run: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(run))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(saved: dict, run: RunConfig) -> list[str]:
    """Keys (with both values) where the run folder's config and this run's config differ."""
    now = yaml.safe_load(config_yaml(run))
    diffs = []
    for section in IDENTITY_SECTIONS:
        a, b = _flatten(saved.get(section), section), _flatten(now.get(section), section)
        for key in sorted(set(a) | set(b)):
            if key not in RESUMABLE_CHANGES and a.get(key) != b.get(key):
                diffs.append(f"{key}: {a.get(key)!r} in the folder, {b.get(key)!r} now")
    return diffs


def _archive_previous(run_dir: Path) -> Path:
    """train.resume=false in a used folder: move the old run's outputs aside (never delete)."""
    dest = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True)
    for name in (RUN_CONFIG, "checkpoints", "metrics.jsonl", "tensorboard", "loss.png"):
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), str(dest / name))
    return dest


def check_run_folder(run_dir: Path, run: RunConfig) -> Path | None:
    """Decide fresh start vs resume (rank 0). Returns the verified step folder to resume from.

    Refuses a folder holding another run's config unless train.resume=false (then the old
    outputs move to previous/<time>/). A folder holding checkpoints always resumes from an
    intact one or stops (never starts over on top of them; train/saving.resume_step_dir).
    """
    from evo2_hydra.checkpoint.run_dir import read_config_file
    from evo2_hydra.train.saving import resume_step_dir

    saved = run_dir / RUN_CONFIG
    used = saved.is_file() or (run_dir / "checkpoints").exists()
    if not used:
        return None
    if not run.train.resume:
        dest = _archive_previous(run_dir)
        log.warning("train.resume=false: the previous run's outputs moved to %s", dest)
        return None
    if os.path.lexists(saved):
        diffs = config_differences(read_config_file(saved), run)
        if diffs:
            raise UserError(
                f"{saved}: this run folder holds another run's config ({'; '.join(diffs[:3])}"
                f"{'; ...' if len(diffs) > 3 else ''}); use a new folder (another run_name or "
                "hydra.run.dir=...) or train.resume=false to start over here"
            )
    return resume_step_dir(run_dir)


def _on_rank0_then_share(dist: DistInfo, fn) -> Any:
    """Run `fn` on rank 0 only and give its result (or its UserError) to every rank."""
    if dist.world_size == 1:
        return fn()
    payload: list[Any] = [None]
    error: BaseException | None = None
    if dist.rank == 0:
        try:
            payload[0] = ("ok", fn())
        except UserError as err:
            error, payload[0] = err, ("user_error", str(err))
        except BaseException as err:
            error, payload[0] = err, ("error", f"{type(err).__name__}: {err}")
    torch_dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if error is not None:
        raise error
    if status == "user_error":
        raise UserError(value)
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _client_state(run: RunConfig, step: int, plan, conditions: dict[str, str]) -> dict:
    """savanna's client state (iteration, args, data_loading) plus what resuming needs."""
    m = run.model
    return {
        "iteration": step,
        "args": {
            "num_layers": m.num_layers,
            "hidden_size": m.hidden_size,
            "num_attention_heads": m.num_attention_heads,
            "max_position_embeddings": run.ckpt.context,
            "make_vocab_size_divisible_by": 8,
            "padded_vocab_size": m.vocab_size,
            "tokenizer_type": "CharLevelTokenizer",
            "model_parallel_size": plan.model_parallel,
        },
        "data_loading": {
            # savanna's cursor: tokens consumed so far (spec §3.4 step 6)
            "train_data_token_index": step * plan.global_batch * run.ckpt.context,
            "micro_batches_per_rank": step * plan.grad_accum,
        },
        "condition_tokens": dict(conditions),
        "seed": run.seed,
        "world_size": plan.world_size,
    }


def finetune_this_rank(run: RunConfig) -> dict:
    """Everything one rank does (torchrun, submitit/Slurm task, or a local child process)."""
    from evo2_hydra import data as data_api
    from evo2_hydra.checkpoint.integrity import verify_step_dir
    from evo2_hydra.checkpoint.layout import locate_checkpoint
    from evo2_hydra.checkpoint.loader import load_module_state_dict
    from evo2_hydra.checkpoint.prepare import prepare_shared_base_checkpoint
    from evo2_hydra.model import build_model, load_into_model
    from evo2_hydra.train import saving
    from evo2_hydra.train.engine import batch_plan, build_engine, deepspeed_config
    from evo2_hydra.train.loop import LoopSettings, StopFlag, train_loop
    from evo2_hydra.train.metrics import MetricsLogger, plot_losses, truncate_metrics
    from evo2_hydra.train.optim import AnnealingLR, build_optimizer

    train, context = run.train, run.ckpt.context
    run_dir = Path(run.output_dir)
    stop = StopFlag()
    with stop.installed():  # from the very start: a SIGTERM during setup still ends cleanly
        dist = setup_distributed(run.cluster)
        plan = batch_plan(dist.world_size, train.micro_batch_size, train.grad_accum_steps)

        def prepare():
            resume_step = check_run_folder(run_dir, run)
            resume = resume_step is not None
            if not resume and run.ckpt.path is not None:
                locate_checkpoint(run.ckpt.path)  # a missing checkpoint fails before data prep
            run_dir.mkdir(parents=True, exist_ok=True)
            prepared = data_api.prepare_data(run.data, context, run.data.cache_dir)
            base = (
                None
                if resume
                else prepare_shared_base_checkpoint(run.ckpt, run.model, run.paths.cache_dir)
            )
            if base is not None:
                # DeepSpeed unpickles with weights_only=False: verify the cached copy first
                verify_step_dir(locate_checkpoint(base).step_dir)
            if not resume:
                write_text_atomic(run_dir / RUN_CONFIG, config_yaml(run))
            return resume_step, prepared, base

        resume_step, prepared, base = _on_rank0_then_share(dist, prepare)
        resume = resume_step is not None
        conditions = dict(prepared.condition_tokens)

        # Model: same seed on every rank (identical fresh weights where no checkpoint covers them).
        _seed_everything(run.seed)
        zero3 = train.zero_stage == 3
        model = build_model(
            run.model,
            context,
            device=dist.device,
            checkpoint_activations=train.activation_checkpointing,
        )
        if base is not None and zero3 and not resume:
            # ZeRO-3 partitions the module at initialize, and DeepSpeed's module-only load would
            # look for ZeRO-3 shard files: load the (MP=1) base weights before partitioning.
            state, _ = load_module_state_dict(base, trust_pickle=run.ckpt.trust_pickle)
            load_into_model(model, state, run.model, context)
            del state
        optimizer = build_optimizer(model, train, dist.device)
        scheduler = AnnealingLR(optimizer, train)
        ds_config = deepspeed_config(train, plan, gpu=dist.device.type == "cuda")
        engine = build_engine(model, optimizer, scheduler, ds_config)

        start_step, last_saved = 0, None
        if resume:
            client = saving.load_training_checkpoint(engine, resume_step, dist.rank)
            start_step = last_saved = int(client["iteration"])
            log.info("resuming from %s (step %d of %d)", resume_step, start_step, train.steps)
        else:
            _seed_everything(run.seed + dist.rank)  # per-rank streams of randomness from here on
            if base is not None and not zero3:
                # savanna `finetune: true`: module only; optimizer, LR schedule, data cursor fresh.
                # Not strict: CKPT's check already accounted for every key (unused norms and TE
                # _extra_state may be absent or extra), shapes were checked there.
                loaded, _ = engine.load_checkpoint(
                    str(base),
                    load_module_only=True,
                    load_optimizer_states=False,
                    load_lr_scheduler_states=False,
                    load_module_strict=False,
                )
                if loaded is None:
                    raise UserError(f"{base}: DeepSpeed found no checkpoint to load")
            elif base is None:
                log.warning(
                    "no base checkpoint (ckpt.random_init=true): training from fresh weights"
                )

        stream = data_api.build_train_stream(
            run.data,
            prepared,
            context,
            train.micro_batch_size,
            dist.rank,
            dist.world_size,
            run.seed,
            start_step=start_step * train.grad_accum_steps,
        )
        eval_batches = data_api.build_eval_batches(
            run.data,
            prepared,
            context,
            train.micro_batch_size,
            dist.rank,
            dist.world_size,
            run.seed,
            train.eval_steps,
        )
        if dist.is_main:
            # records after the checkpoint we continue from (or all, when starting over in a
            # folder whose earlier attempt never saved) would otherwise appear twice
            truncate_metrics(run_dir, start_step if resume else -1)
        metrics = MetricsLogger(run_dir, train.steps, start_step, enabled=dist.is_main)
        yaml_text = config_yaml(run)

        def save(step: int) -> None:
            saving.save_training_checkpoint(
                engine,
                run_dir,
                step,
                rank=dist.rank,
                client_state=_client_state(run, step, plan, conditions),
                config_yaml=yaml_text,
                conditions=conditions,
                keep_last=train.keep_last,
            )

        settings = LoopSettings(
            total_steps=train.steps,
            grad_accum=train.grad_accum_steps,
            tokens_per_step=plan.tokens_per_step(context),
            eval_every=train.eval_every,
            save_every=train.save_every,
            log_every=train.log_every,
            eval_at_start=not resume,
            manual_grad_norm=train.zero_stage == 0 and train.precision == Precision.fp32,
        )
        try:
            result = train_loop(
                engine,
                stream,
                eval_batches,
                loss_fn=data_api.lm_loss,
                settings=settings,
                start_step=start_step,
                last_saved_step=last_saved,
                device=dist.device,
                metrics=metrics,
                save=save,
                stop=stop,
            )
        finally:
            metrics.close()
    plot = plot_losses(run_dir) if dist.is_main else None
    summary = {
        "run_dir": str(run_dir),
        "world_size": dist.world_size,
        "start_step": start_step,
        "last_step": result.last_step,
        "last_saved_step": result.last_saved_step,
        "stopped_by": result.stopped_by,
        "losses": result.losses,
        "valid_losses": result.valid_losses,
        "plot": str(plot) if plot else None,
    }
    if dist.is_main:
        _log_summary(summary)
    return summary


def _log_summary(summary: dict) -> None:
    valid = summary["valid_losses"]
    if valid:
        first, last = min(valid), max(valid)
        log.info(
            "valid loss %.4f (step %d) -> %.4f (step %d)", valid[first], first, valid[last], last
        )
    if summary["stopped_by"]:
        log.warning(
            "stopped by %s at step %d; run again to continue",
            summary["stopped_by"],
            summary["last_step"],
        )
    else:
        log.info("finished %d steps; outputs in %s", summary["last_step"], summary["run_dir"])


def _needs_local_spawn(run: RunConfig) -> bool:
    """cluster=local with several tasks, started as one plain process: we start the ranks."""
    return (
        run.cluster.kind == ClusterKind.local
        and run.cluster.tasks > 1
        and not launched_externally()
    )


def run_finetune(run: RunConfig) -> dict:
    """Task entry (cli.TASKS[finetune]): check the memory plan, then train on this rank or ranks."""
    from evo2_hydra.train.memory import check_fits

    check_fits(run)
    if _needs_local_spawn(run):
        from evo2_hydra.train.local_launch import spawn_local_ranks

        return spawn_local_ranks(run.cluster.tasks, finetune_this_rank, run)
    return finetune_this_rank(run)
