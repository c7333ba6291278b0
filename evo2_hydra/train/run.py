"""`task=finetune`: prepare data and base weights, then train with DeepSpeed; auto-resumes.

python launch.py                                     # the demo: evo2_tiny on the example data, CPU
python launch.py cluster.tasks=2 train.zero_stage=2  # two local processes
python launch.py model=evo2_7b ckpt=savanna_evo2_7b ckpt.path=/ckpts/savanna_evo2_7b.pt ckpt.context=4096

Run folder (`output_dir`): config.yaml, checkpoints/{latest, global_stepN/}, metrics.jsonl,
tensorboard/, loss.png. The prepared base weights live in paths.cache_dir/base_checkpoints/ (shared).
Starting the same command again in the same folder continues from `checkpoints/latest`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import yaml
from omegaconf import OmegaConf

from evo2_hydra.config import ClusterKind, Dtype, RunConfig
from evo2_hydra.distributed import DistInfo, launched_externally, setup_distributed
from evo2_hydra.errors import Interrupted, UserError
from evo2_hydra.io_utils import (
    LOCK_NAME,
    exclusive_lock,
    write_failure_as_os_error,
    write_text_atomic,
)
from evo2_hydra.run_identity import identity

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"


def config_yaml(run: RunConfig) -> str:
    """The run config as the YAML saved in the run folder."""
    return OmegaConf.to_yaml(OmegaConf.structured(run))


def config_differences(saved: dict, run: RunConfig) -> list[str]:
    """Keys (with both values) where the run folder's config and this run's config differ,
    among the settings that define a run (run_identity: not steps, cadence, cluster, cache).
    """
    before = identity(saved or {})
    now = identity(yaml.safe_load(config_yaml(run)))
    return [
        f"{key}: {before.get(key)!r} in the folder, {now.get(key)!r} now"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key)
    ]


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
            # savanna's cursor: tokens consumed so far (`train_data_token_index`, savanna
            # `training.py`)
            "train_data_token_index": step * plan.global_batch * run.ckpt.context,
            "micro_batches_per_rank": step * plan.grad_accum,
        },
        "condition_tokens": dict(conditions),
        "seed": run.seed,
        "world_size": plan.world_size,
    }


def _check_resumed_lora_base(step_dir: Path, base: Path, source: str | None) -> None:
    """A LoRA run resumes only onto the base its adapters were trained on (content hash)."""
    from evo2_hydra.checkpoint.layout import locate_checkpoint
    from evo2_hydra.peft.merge import base_content_hash, read_lora_record

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
    from evo2_hydra.checkpoint.integrity import verify_step_dir
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
    # from the very start: a SIGTERM/SIGINT during setup still ends cleanly; the run folder's
    # lock (rank 0) is held until the end, so a second run into this folder stops at once
    with stop.installed(), contextlib.ExitStack() as held:
        dist = setup_distributed(run.cluster)
        plan = batch_plan(dist.world_size, train.micro_batch_size, train.grad_accum_steps)

        def prepare():
            check_inputs(run)  # cheap: before the folder is judged or locked
            run_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(exclusive_lock(run_dir / LOCK_NAME, f"run folder {run_dir}"))
            resume_step = check_run_folder(run_dir, run)
            resume = resume_step is not None
            if not resume and run.ckpt.path is not None:
                locate_checkpoint(run.ckpt.path)  # a missing checkpoint fails before data prep
            prepared = data_api.prepare_data(run.data, context, run.data.cache_dir)
            # a LoRA run needs its (frozen) base on resume too: its checkpoints hold adapters only
            base = (
                None
                if resume and not lora
                else prepare_shared_base_checkpoint(run.ckpt, run.model, run.paths.cache_dir)
            )
            if base is not None:
                # DeepSpeed unpickles with weights_only=False: verify the cached copy first
                verify_step_dir(locate_checkpoint(base).step_dir)
            record = None
            if lora:
                from evo2_hydra.peft.merge import base_content_hash

                if resume:
                    _check_resumed_lora_base(resume_step, base, run.ckpt.path)
                record = {"path": str(base), "sha256": base_content_hash(base)}
            if not resume:
                write_text_atomic(run_dir / RUN_CONFIG, config_yaml(run))
            return resume_step, prepared, base, record

        resume_step, prepared, base, base_record = _on_rank0_then_share(dist, prepare)
        resume = resume_step is not None
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
            check_zero3_resume(resume_step, dist.world_size)
            client = saving.load_training_checkpoint(engine, resume_step, dist.rank)
            start_step = last_saved = int(client["iteration"])
            log.info("resuming from %s (step %d of %d)", resume_step, start_step, train.steps)
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
            try:
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
            except Interrupted as err:
                # a second Ctrl-C during the save: `latest` says whether this step was committed
                # (rank 0 commits, then prunes and waits for the other ranks)
                raise Interrupted(step if _latest_is(run_dir, step) else err.saved_step) from None
            except (OSError, RuntimeError) as err:
                translated = checkpoint_save_error(run_dir, step, err)
                if translated is err:
                    raise
                if dist.is_main:  # free the room the partial save took; `latest` is untouched
                    shutil.rmtree(
                        saving.checkpoint_dir(run_dir) / saving.STAGING / saving.step_tag(step),
                        ignore_errors=True,
                    )
                raise translated from err

        settings = LoopSettings(
            total_steps=train.steps,
            grad_accum=train.grad_accum_steps,
            tokens_per_step=plan.tokens_per_step(context),
            eval_every=train.eval_every,
            save_every=train.save_every,
            log_every=train.log_every,
            eval_at_start=not resume,
            manual_grad_norm=train.zero_stage == 0 and train.precision == Dtype.float32,
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
            _log_summary(run, summary)
        return summary


def _latest_is(run_dir: Path, step: int) -> bool:
    """Whether the run's `checkpoints/latest` names step `step`."""
    from evo2_hydra.checkpoint.layout import read_latest
    from evo2_hydra.train.saving import checkpoint_dir, step_tag

    try:
        return read_latest(checkpoint_dir(run_dir)).name == step_tag(step)
    except UserError:  # no (readable) latest yet
        return False


def check_inputs(run: RunConfig) -> None:
    """The cheap checks of the training inputs (the files exist), before the run folder is
    judged: a typo in data.input is reported as such, not as a folder conflict.
    """
    from evo2_hydra.config import DataConfig
    from evo2_hydra.data.indexed import is_indexed_prefix
    from evo2_hydra.data.preprocess import is_sequence_file

    for key in ("input", "valid_input", "test_input"):
        for path in DataConfig.as_list(getattr(run.data, key)):
            if is_sequence_file(path) and not Path(path).is_file():
                raise UserError(f"data.{key}: {path} does not exist")
            if not is_sequence_file(path) and not is_indexed_prefix(path):
                raise UserError(
                    f"data.{key}: {path} is neither a sequence file (.jsonl[.gz], "
                    f".fa/.fasta/.fna[.gz]) nor a BIN/IDX prefix (expected {path}.bin and {path}.idx)"
                )


def checkpoint_save_error(run_dir: Path, step: int, err: BaseException) -> BaseException:
    """A failed checkpoint write as one line; the previous checkpoint stays `latest`.

    DeepSpeed writes through torch.save, whose C++ writer reports a full disk as a RuntimeError
    without the file or the cause (io_utils.write_failure_as_os_error). Other errors pass as
    they are (a bug keeps its traceback).
    """
    from evo2_hydra.checkpoint.layout import read_latest

    folder = run_dir / "checkpoints"
    os_error = write_failure_as_os_error(err, folder)
    if os_error is None:
        return err
    where = os_error.filename if os_error.filename else folder
    try:
        previous = read_latest(folder)
    except UserError:  # no (usable) `latest`: nothing was saved before
        previous = None
    kept = f"{previous.name} is still the latest checkpoint" if previous else "no step was saved"
    return UserError(
        f"{where}: saving step {step} failed ({os_error.strerror or os_error}); {kept}"
    )


def _quote(path: str) -> str:
    return shlex.quote(str(path))


def summary_text(run: RunConfig, summary: dict) -> str:
    """What a finished (or stopped) run prints: where everything is, what to run next."""
    from evo2_hydra.config import DataConfig
    from evo2_hydra.data.jsonl import is_jsonl
    from evo2_hydra.train.metrics import METRICS_FILE, TENSORBOARD_DIR

    run_dir = Path(summary["run_dir"])
    rd = _quote(run_dir)
    saved = summary["last_saved_step"]
    lines = []
    if summary["stopped_by"]:
        lines.append(
            f"stopped by {summary['stopped_by']} after step {summary['last_step']} of "
            f"{run.train.steps}; continue with: python launch.py resume={rd}"
        )
    else:
        lines.append(f"finished {summary['last_step']} steps in {run_dir}")
    valid = summary["valid_losses"]
    if valid:
        first, last = min(valid), max(valid)
        change = f" -> {valid[last]:.4f} (step {last})" if last != first else ""
        lines.append(f"  valid loss   {valid[first]:.4f} (step {first}){change}")
    ckpt = run_dir / "checkpoints" / f"global_step{saved}" if saved is not None else None
    lines.append(f"  checkpoint   {ckpt if ckpt else 'none saved'}")
    lines.append(
        f"  metrics      {run_dir / METRICS_FILE}  (tensorboard --logdir {run_dir / TENSORBOARD_DIR})"
    )
    if summary["plot"]:
        lines.append(f"  loss plot    {summary['plot']}")
    folder = os.environ.get("SUBMITIT_FOLDER")
    lines.append(
        f"  logs         {folder if folder else 'this console (nothing written to files)'}"
    )
    if ckpt is None:
        return "\n".join(lines)
    model = f"model={run.model.name} ckpt.context={run.ckpt.context}"
    jsonl = [
        p
        for p in DataConfig.as_list(run.data.valid_input) + DataConfig.as_list(run.data.input)
        if is_jsonl(p)
    ]
    seqs = _quote(jsonl[0]) if jsonl else "SEQUENCES.jsonl"
    condition = next(iter(run.data.condition.tokens), None)
    cond = f" generate.condition={condition}" if condition else ""
    lines += [
        "next:",
        f"  python convert.py target=vortex source={rd}",
        f"  python launch.py task=generate {model} ckpt.path={rd}{cond} generate.n=4",
        f"  python launch.py task=score {model} ckpt.path={rd} score.input={seqs}",
    ]
    return "\n".join(lines)


def _log_summary(run: RunConfig, summary: dict) -> None:
    # printed, not logged: a block without log prefixes, its commands ready to copy
    print(summary_text(run, summary), flush=True)


def _needs_local_spawn(run: RunConfig) -> bool:
    """cluster=local with several tasks, started as one plain process: we start the ranks."""
    return (
        run.cluster.kind == ClusterKind.local
        and run.cluster.tasks > 1
        and not launched_externally()
    )


def run_finetune(run: RunConfig) -> dict:
    """Task entry (cli.TASKS[finetune]): check the memory plan, then train on this rank or ranks."""
    from evo2_hydra.io_utils import remove_stale_temporaries
    from evo2_hydra.train.memory import check_fits
    from evo2_hydra.train.saving import checkpoint_dir

    if run.peft.enabled and run.ckpt.path is None:
        raise UserError(
            "peft=lora needs a base checkpoint to adapt: set ckpt.path (ckpt.random_init=true "
            "would train adapters on random weights)"
        )
    check_fits(run)
    # leftovers of a killed save or prune (`.tmp-global_stepN.*`, `.old-global_stepN.*`)
    remove_stale_temporaries(checkpoint_dir(Path(run.output_dir)))
    if _needs_local_spawn(run):
        from evo2_hydra.train.local_launch import spawn_local_ranks

        return spawn_local_ranks(run.cluster.tasks, finetune_this_rank, run)
    return finetune_this_rank(run)


# ---- resume=RUN_DIR ---------------------------------------------------------------------------


def _command_line_overrides(texts: list[str] | None = None) -> list[tuple[str, str]]:
    """(key, text) of each override on the command line (Hydra's record of them)."""
    if texts is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            texts = list(HydraConfig.get().overrides.task)
        except Exception:  # not under Hydra (a direct call from a test): nothing to check
            return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(texts)
    return [(o.key_or_group, text) for o, text in zip(parsed, texts)]


def resumed_config(cfg, overrides: list[str] | None = None):
    """`resume=RUN_DIR`: the run's saved config.yaml plus the command line's overrides of what
    may change on resume (run_identity); any other override is refused in one line.

    `overrides`: the command line's overrides (default: Hydra's record of them).
    """
    from omegaconf import DictConfig

    from evo2_hydra.checkpoint.run_dir import read_config_file
    from evo2_hydra.run_identity import may_change_on_resume

    run_dir = Path(str(cfg.resume)).expanduser()
    saved = run_dir / RUN_CONFIG
    if not saved.is_file():
        raise UserError(f"resume={run_dir}: no {RUN_CONFIG} there; expected a run folder")
    if str(cfg.task) not in ("finetune", "Task.finetune"):
        raise UserError(f"resume={run_dir} continues a finetune; task={cfg.task} cannot resume")
    overrides = _command_line_overrides(overrides)
    refused = [text for key, text in overrides if not may_change_on_resume(key)]
    if refused:
        raise UserError(
            f"resume={run_dir}: {', '.join(refused)} cannot change when a run continues (its "
            "saved config defines it); allowed: train.steps, train.save_every, train.keep_last, "
            "train.eval_every, train.eval_steps, train.log_every, cluster.*; start a new run instead"
        )
    tree = read_config_file(saved)  # size-limited, aliases refused (checkpoint/run_dir.py)
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged: DictConfig = OmegaConf.merge(OmegaConf.structured(RunConfig), tree)
    except OmegaConfBaseException as err:
        raise UserError(f"{saved}: {str(err).splitlines()[0]}") from None
    for key, _text in overrides:
        key = key.lstrip("+~")
        if key in ("resume", "task") or key.startswith(("hydra.", "hydra/")):
            continue
        OmegaConf.update(merged, key, OmegaConf.select(cfg, key), merge=False)
    merged.output_dir = str(run_dir)
    merged.resume = str(run_dir)
    log.info(
        "resume=%s: continuing with its saved config%s",
        run_dir,
        f" and {', '.join(t for k, t in overrides if k != 'resume')}" if len(overrides) > 1 else "",
    )
    return merged
