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
IDENTITY_SECTIONS = ("model", "ckpt", "data", "train", "peft", "seed")


def config_yaml(run: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(run))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(saved_yaml: str, run: RunConfig) -> list[str]:
    """Keys (with both values) where the run folder's config and this run's config differ."""
    saved = yaml.safe_load(saved_yaml) or {}
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


def check_run_folder(run_dir: Path, run: RunConfig) -> bool:
    """Decide fresh start vs resume (rank 0). Returns True to resume from checkpoints/latest.

    Refuses a folder holding another run's config unless train.resume=false (then the old
    outputs move to previous/<time>/).
    """
    from evo2_hydra.train.saving import latest_step_dir

    saved = run_dir / RUN_CONFIG
    used = saved.is_file() or (run_dir / "checkpoints").exists()
    if not used:
        return False
    if not run.train.resume:
        dest = _archive_previous(run_dir)
        log.warning("train.resume=false: the previous run's outputs moved to %s", dest)
        return False
    if saved.is_file():
        diffs = config_differences(saved.read_text(), run)
        if diffs:
            raise UserError(
                f"{saved}: this run folder holds another run's config ({'; '.join(diffs[:3])}"
                f"{'; ...' if len(diffs) > 3 else ''}); use a new folder (another run_name or "
                "hydra.run.dir=...) or train.resume=false to start over here"
            )
    return latest_step_dir(run_dir) is not None


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


def _client_state(
    run: RunConfig, step: int, plan, conditions: dict[str, str], lora: dict | None = None
) -> dict:
    """savanna's client state (iteration, args, data_loading) plus what resuming needs.

    A LoRA run adds its record (rank, alpha, targets, the base folder and its content hash).
    """
    from evo2_hydra.peft.merge import LORA_RECORD

    m = run.model
    extra = {LORA_RECORD: lora} if lora is not None else {}
    return {
        **extra,
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


def _check_resumed_lora_base(run_dir: Path, base: Path, source: str | None) -> None:
    """A LoRA run resumes only onto the base its adapters were trained on (content hash)."""
    from evo2_hydra.checkpoint.layout import locate_checkpoint
    from evo2_hydra.peft.merge import base_content_hash, read_lora_record
    from evo2_hydra.train.saving import latest_step_dir

    step_dir = latest_step_dir(run_dir)
    record = read_lora_record(locate_checkpoint(step_dir))
    if record is None:
        raise UserError(
            f"{step_dir}: holds full weights, not LoRA adapters, but peft=lora; resume it with "
            "peft=none or start a new run folder"
        )
    found = base_content_hash(base)
    if found != record["base"]["sha256"]:
        raise UserError(
            f"{step_dir}: holds LoRA adapters for the base {record['base']['source']} (content "
            f"hash {record['base']['sha256'][:12]}), but ckpt.path={source} gives "
            f"{found[:12]}; resume with the original base or start a new run folder"
        )


def _build_lora_model(run: RunConfig, base: Path, device, *, checkpoint_activations: bool):
    """Base weights loaded (memory-mapped source), then LoRA adapters injected; base frozen."""
    from evo2_hydra.checkpoint.loader import load_module_state_dict
    from evo2_hydra.model import build_model, load_into_model
    from evo2_hydra.peft.lora import add_lora, install_adapter_only_state

    model = build_model(
        run.model, run.ckpt.context, device="meta", checkpoint_activations=checkpoint_activations
    )
    state, _ = load_module_state_dict(base, trust_pickle=run.ckpt.trust_pickle)
    load_into_model(model, state, run.model, run.ckpt.context, device=device)
    del state
    _seed_everything(run.seed)  # the same lora_A on every rank
    targets = add_lora(model, run.peft)
    install_adapter_only_state(model)
    return model, targets


def finetune_this_rank(run: RunConfig) -> dict:
    """Everything one rank does (torchrun, submitit/Slurm task, or a local child process)."""
    from evo2_hydra import data as data_api
    from evo2_hydra.checkpoint.layout import locate_checkpoint
    from evo2_hydra.checkpoint.loader import load_module_state_dict
    from evo2_hydra.checkpoint.prepare import prepare_shared_base_checkpoint
    from evo2_hydra.model import build_model
    from evo2_hydra.train import saving
    from evo2_hydra.train.engine import (
        batch_plan,
        build_engine,
        build_zero3_model,
        check_zero3_resume,
        deepspeed_config,
    )
    from evo2_hydra.train.loop import LoopSettings, StopFlag, train_loop
    from evo2_hydra.train.metrics import MetricsLogger, plot_losses, truncate_metrics
    from evo2_hydra.train.optim import AnnealingLR, build_optimizer

    train, context = run.train, run.ckpt.context
    lora = run.peft.enabled
    run_dir = Path(run.output_dir)
    stop = StopFlag()
    with stop.installed():  # from the very start: a SIGTERM during setup still ends cleanly
        dist = setup_distributed(run.cluster)
        plan = batch_plan(dist.world_size, train.micro_batch_size, train.grad_accum_steps)

        def prepare():
            resume = check_run_folder(run_dir, run)
            if not resume and run.ckpt.path is not None:
                locate_checkpoint(run.ckpt.path)  # a missing checkpoint fails before data prep
            run_dir.mkdir(parents=True, exist_ok=True)
            prepared = data_api.prepare_data(run.data, context, run.data.cache_dir)
            # a LoRA run needs its (frozen) base on resume too: its checkpoints hold adapters only
            base = (
                None
                if resume and not lora
                else prepare_shared_base_checkpoint(run.ckpt, run.model, run.paths.cache_dir)
            )
            record = None
            if lora:
                from evo2_hydra.peft.merge import base_content_hash

                if resume:
                    _check_resumed_lora_base(run_dir, base, run.ckpt.path)
                record = {"path": str(base), "sha256": base_content_hash(base)}
            if not resume:
                write_text_atomic(run_dir / RUN_CONFIG, config_yaml(run))
            return resume, prepared, base, record

        resume, prepared, base, base_record = _on_rank0_then_share(dist, prepare)
        conditions = dict(prepared.condition_tokens)

        # Model: same seed on every rank (identical fresh weights where no checkpoint covers them).
        _seed_everything(run.seed)
        zero3 = train.zero_stage == 3
        ds_config = deepspeed_config(train, plan, gpu=dist.device.type == "cuda")
        lora_info = None
        if lora:
            model, targets = _build_lora_model(
                run, base, dist.device, checkpoint_activations=train.activation_checkpointing
            )
            from evo2_hydra.peft.merge import lora_record

            lora_info = lora_record(run.peft, targets, base, run.ckpt.path, base_record["sha256"])
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            log.info(
                "LoRA: %d adapted modules, %s trainable of %s parameters (%.2f%%)",
                len(targets),
                f"{trainable:,}",
                f"{total:,}",
                100 * trainable / total,
            )
        elif zero3:
            # Straight into partitions: no rank ever holds the whole model (40B on 8 GPUs).
            if resume:
                state = None  # the ZeRO-3 checkpoint fills everything
            elif base is not None:
                state, _ = load_module_state_dict(base, trust_pickle=run.ckpt.trust_pickle)
            else:  # fresh weights: the same seeded full init a non-partitioned run gets
                state = build_model(run.model, context, device="cpu").state_dict()
            model = build_zero3_model(
                run.model,
                context,
                ds_config,
                checkpoint_activations=train.activation_checkpointing,
                state=state,
                rank=dist.rank,
            )
            del state
        else:
            model = build_model(
                run.model,
                context,
                device=dist.device,
                checkpoint_activations=train.activation_checkpointing,
            )
        optimizer = build_optimizer(model, train, dist.device)
        scheduler = AnnealingLR(optimizer, train)
        engine = build_engine(model, optimizer, scheduler, ds_config)

        start_step, last_saved = 0, None
        if resume:
            step_dir = saving.latest_step_dir(run_dir)
            check_zero3_resume(step_dir, dist.world_size)
            client = saving.load_training_checkpoint(engine, step_dir, dist.rank)
            start_step = last_saved = int(client["iteration"])
            log.info("resuming from %s (step %d of %d)", step_dir, start_step, train.steps)
        else:
            _seed_everything(run.seed + dist.rank)  # per-rank streams of randomness from here on
            if base is not None and not zero3 and not lora:
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
                client_state=_client_state(run, step, plan, conditions, lora_info),
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

    if run.peft.enabled and run.ckpt.path is None:
        raise UserError(
            "peft=lora needs a base checkpoint to adapt: set ckpt.path (ckpt.random_init=true "
            "would train adapters on random weights)"
        )
    check_fits(run)
    if _needs_local_spawn(run):
        from evo2_hydra.train.local_launch import spawn_local_ranks

        return spawn_local_ranks(run.cluster.tasks, finetune_this_rank, run)
    return finetune_this_rank(run)
