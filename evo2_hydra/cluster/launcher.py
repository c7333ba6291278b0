"""`hydra/launcher: evo2_slurm`: hydra-submitit-launcher's SlurmLauncher with the checks it lacks.

On the submitting machine (`launch()`):
- every sweep point is composed and validated (RunConfig rules) before anything is submitted;
- one resource shape per multirun: the plugin builds ONE executor from the master config, and
  hydra-core 1.3.8 silently ignores a swept `cluster.*` / `hydra.launcher.*` value, so a sweep that
  changes them is refused with an explanation;
- the site is checked with sinfo (reachable, partition, GPUs, CPUs, memory);
- `dry_run=true` or `task=plan` prints the sbatch script and the per-rank world layout instead of
  submitting (task=plan then runs the plan locally);
- after submission: job ids, log paths and a squeue/sacct hint; with `cluster.wait=false` it
  returns right away, otherwise it waits and reports failed tasks with their log tail.

Inside each Slurm task (`__call__`): a run stopped by a signal (TRAIN's SIGTERM checkpoint) exits
without a submitit result, so the requeued job's result is the one the launcher waits for; the
time-limit signal (USR2) first asks training to checkpoint, then requeues (`max_num_timeout`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from evo2_hydra.cluster.site import check_site, tasks_per_node
from evo2_hydra.config import (
    REPO_ROOT,
    ClusterConfig,
    ConfigError,
    RunConfig,
    Task,
    check_known_keys,
)
from evo2_hydra.errors import UserError

log = logging.getLogger(__name__)

# hydra.launcher fields that conf/cluster/slurm.yaml interpolates from cluster.*: a direct
# hydra.launcher.X override would make the runtime's world-size check disagree with the job.
MIRRORED = {
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "nodes": "nodes",
    "cpus_per_task": "cpus_per_task",
    "timeout_min": "timeout_min",
    "constraint": "constraint",
    "mem_gb": "mem_gb",
    "max_num_timeout": "max_num_timeout",
    "array_parallelism": "array_parallelism",
}
LOG_TAIL_LINES = 15


@dataclass
class Evo2SlurmQueueConf(SlurmQueueConf):
    """Hydra's Slurm launcher config, pointing at our launcher class."""

    _target_: str = "hydra_plugins.evo2_slurm_launcher.Evo2SlurmLauncher"


def register_launcher() -> None:
    """Store `hydra/launcher: evo2_slurm` in Hydra's ConfigStore."""
    ConfigStore.instance().store(
        group="hydra/launcher", name="evo2_slurm", node=Evo2SlurmQueueConf, provider="evo2_hydra"
    )


@dataclass
class SweepPoint:
    """One point of a multirun: its overrides, validated config and run folder."""

    overrides: list[str]
    run: RunConfig
    output_dir: Path

    @property
    def label(self) -> str:
        return " ".join(filter_overrides(self.overrides)) or "(no overrides)"


# ----------------------------------------------------------------------------------------------
# pure helpers (unit-tested without Hydra or Slurm)


def to_run_config(cfg: DictConfig, where: str) -> RunConfig:
    """The point's config as dataclasses (runs the cross-field rules); UserError naming the point."""
    try:
        check_known_keys(cfg)
        run = OmegaConf.to_object(cfg)
    except (ConfigError, UserError) as err:
        raise UserError(f"{where}: {err}") from None
    except OmegaConfBaseException as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else None
        raise UserError(f"{where}: {cause or str(err).splitlines()[0]}") from None
    return run


def check_one_shape(master: DictConfig, points: Sequence[tuple[list[str], DictConfig]]) -> None:
    """Refuse a multirun whose points would need different Slurm resources or launcher settings."""

    def section(cfg: DictConfig, key: str) -> dict:
        node = OmegaConf.select(cfg, key)
        return {} if node is None else OmegaConf.to_container(node, resolve=key == "cluster")

    for overrides, cfg in points:
        for key in ("cluster", "hydra.launcher"):
            base, now = section(master, key), section(cfg, key)
            diff = sorted(k for k in set(base) | set(now) if base.get(k) != now.get(k))
            if diff:
                name = diff[0]
                raise UserError(
                    f"{key}.{name} differs in sweep point '{' '.join(overrides)}' "
                    f"({now.get(name)!r} vs {base.get(name)!r}): one multirun submits ONE Slurm "
                    "resource shape (hydra-submitit-launcher builds a single executor, and "
                    "hydra-core 1.3 would silently give every point the same shape); run one "
                    f"`launch.py -m` per {key}.{name} value"
                )


def check_launcher_mirrors(params: dict[str, Any], cluster: ClusterConfig) -> None:
    """Refuse a `hydra.launcher.X` set directly where `cluster.*` is the one source of truth."""
    for launcher_key, cluster_key in MIRRORED.items():
        want = getattr(cluster, cluster_key)
        if launcher_key in params and params[launcher_key] != want:
            raise UserError(
                f"hydra.launcher.{launcher_key}={params[launcher_key]!r} disagrees with "
                f"cluster.{cluster_key}={want!r}: set cluster.{cluster_key} instead (the job's "
                "world-size check reads cluster.*)"
            )


def executor_params(params: dict[str, Any], cluster: ClusterConfig) -> dict[str, Any]:
    """The launcher's parameters with the resource shape taken from cluster.*.

    One task per GPU (tasks_per_node = gpus_per_node), or cluster.tasks_per_node on CPU nodes;
    list/dict site values (setup lines, extra sbatch options) are merged from cluster.* here
    because interpolating them into hydra.launcher fails at compose time.
    """
    out = dict(params)
    for launcher_key, cluster_key in MIRRORED.items():
        out[launcher_key] = getattr(cluster, cluster_key)
    out["tasks_per_node"] = tasks_per_node(cluster)
    out["gpus_per_node"] = cluster.gpus_per_node or None  # no --gpus-per-node on CPU partitions
    # The job unpickles this launcher (hydra_plugins.evo2_slurm_launcher) and imports evo2_hydra:
    # make both importable whatever folder launch.py was started from.
    pythonpath = f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"
    out["setup"] = [pythonpath, *(params.get("setup") or []), *cluster.setup]
    # One rank failing must end the job: the others would wait in init_process_group or a
    # collective until its timeout. The task re-raises a failure (non-zero exit), srun kills the rest.
    out["srun_args"] = ["--kill-on-bad-exit=1", *(params.get("srun_args") or [])]
    out["additional_parameters"] = {
        **(params.get("additional_parameters") or {}),
        **cluster.additional_parameters,
    }
    return out


def world_layout(cluster: ClusterConfig) -> list[str]:
    """One line per rank: node, local rank, device (what setup_distributed will pick)."""
    per_node = tasks_per_node(cluster)
    lines = []
    for node in range(cluster.nodes):
        for local in range(per_node):
            device = f"cuda:{local}" if cluster.gpus_per_node > 0 else "cpu"
            lines.append(
                f"  rank {node * per_node + local:>4}: node {node} (SLURM_NODEID), "
                f"local_rank {local}, device {device}"
            )
    return lines


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last lines of a log file (none when it cannot be read)."""
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def failure_report(job_id: str, label: str, state: str, folder: Path, ntasks: int) -> str:
    """Which task failed, where its log is, and the last lines of its error stream."""
    from submitit.core.utils import JobPaths

    logs = [JobPaths(folder, job_id=job_id, task_id=t) for t in range(ntasks)]
    # the rank whose stderr shows an error, else rank 0
    chosen = next(
        (p for p in logs if any("Error" in ln or "error" in ln for ln in log_tail(p.stderr))),
        logs[0],
    )
    tail = log_tail(chosen.stderr) or log_tail(chosen.stdout)
    body = "\n".join(f"    | {ln}" for ln in tail) or "    (the log is empty)"
    return (
        f"Slurm job {job_id} ({label}) failed: {state}\n"
        f"  log: {chosen.stderr} (stdout: {chosen.stdout})\n  last lines:\n{body}"
    )


# ----------------------------------------------------------------------------------------------


class Evo2SlurmLauncherBase(SlurmLauncher):
    """The evo2_slurm launcher: one Slurm array per multirun, checked before anything is submitted."""

    def _load_point(self, overrides: list[str]) -> tuple[DictConfig, SweepPoint]:
        """Compose one sweep point as the job will, with its output folder filled in."""
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        hydra_cfg = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(cfg)
        try:
            out = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
                cfg.hydra.runtime.output_dir = str(out.absolute())
            task_cfg = copy.deepcopy(cfg)  # what run_job hands the task: the config minus hydra
            with read_write(task_cfg), open_dict(task_cfg):
                del task_cfg["hydra"]
                task_cfg.output_dir = str(out.absolute())
            run = to_run_config(task_cfg, f"sweep point '{' '.join(overrides)}'")
        finally:
            HydraConfig.instance().cfg = hydra_cfg
        return cfg, SweepPoint(list(overrides), run, out.absolute())

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        try:
            return self._launch(job_overrides, initial_job_idx)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def _launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        import submitit
        from submitit.core.utils import JobPaths

        assert self.config is not None
        loaded = [self._load_point(list(o)) for o in job_overrides]
        check_one_shape(self.config, [(p.overrides, cfg) for cfg, p in loaded])
        points = [p for _, p in loaded]
        cluster = points[0].run.cluster
        check_launcher_mirrors(self.params, cluster)
        first = points[0].run
        previewing = first.dry_run or first.task == Task.plan
        try:
            check_site(cluster)
        except UserError as err:
            if not previewing:
                raise
            # a dry run is also for machines without Slurm: show what would be submitted
            print(f"warning: {err}", file=sys.stderr)
        if not previewing:
            from evo2_hydra.train.memory import check_fits

            for point in points:  # refuse before submitting anything, as a local run would
                if point.run.task == Task.finetune:
                    check_fits(point.run)
        params = executor_params(self.params, cluster)

        folder = Path(str(params.pop("submitit_folder"))).absolute()
        executor = submitit.AutoExecutor(
            folder=folder, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
        )
        base_keys = {
            "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb",
            "nodes", "name", "stderr_to_stdout",
        }  # fmt: skip
        executor.update_parameters(
            **{k if k in base_keys else f"slurm_{k}": v for k, v in params.items()}
        )

        if previewing:
            self._print_plan(executor, points, cluster)
            if first.task == Task.plan and not first.dry_run:
                return [self._run_here(p.overrides, i) for i, p in enumerate(points)]
            return [JobReturn(status=JobStatus.COMPLETED, _return_value=None) for _ in points]

        state = Singleton.get_state()  # what the base launcher hands each job
        job_params = [
            (p.overrides, "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{i}", state)
            for i, p in enumerate(points)
        ]
        jobs = executor.map_array(self, *zip(*job_params))

        array_id = jobs[0].job_id.split("_")[0]
        print(
            f"submitted Slurm {'array job' if len(jobs) > 1 else 'job'} {array_id}: "
            f"{len(jobs)} task group(s) x "
            f"{cluster.world_size} rank(s), partition {cluster.partition}"
        )
        for job, point in zip(jobs, points):
            paths = JobPaths(folder, job_id=job.job_id, task_id=0)
            print(f"  job {job.job_id}: {point.label}\n    run folder: {point.output_dir}")
            print(f"    log: {paths.stdout}  (errors: {paths.stderr})")
        print(
            f"  watch: squeue -j {array_id}  |  sacct -j {array_id} -o JobID,State,Elapsed,ExitCode"
            f"  |  cancel: scancel {array_id}"
        )
        sys.stdout.flush()
        if not cluster.wait:
            print("cluster.wait=false: not waiting for the jobs")
            return [JobReturn(status=JobStatus.COMPLETED, _return_value=None) for _ in points]
        return self._collect(jobs, points, folder, cluster.world_size)

    def _collect(self, jobs, points, folder: Path, ntasks: int) -> list[JobReturn]:
        returns, failures = [], []
        for job, point in zip(jobs, points):
            try:
                ret = job.results()[0]
            # UncompletedJobError (no result: killed, cancelled, timed out) / FailedJobError
            except Exception as err:
                first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
                state = f"state {job.state}" if job.state else first_line
                failures.append(failure_report(job.job_id, point.label, state, folder, ntasks))
                continue
            if ret.status == JobStatus.FAILED:
                err = ret._return_value
                failures.append(
                    failure_report(
                        job.job_id, point.label, f"{type(err).__name__}: {err}", folder, ntasks
                    )
                )
                continue
            returns.append(ret)
        if failures:
            raise UserError(
                f"{len(failures)} of {len(jobs)} Slurm job(s) failed\n" + "\n".join(failures)
            )
        return returns

    def _print_plan(self, executor, points: list[SweepPoint], cluster: ClusterConfig) -> None:
        from submitit.slurm.slurm import _make_sbatch_string

        slurm = executor._executor  # the SlurmExecutor behind AutoExecutor
        script = _make_sbatch_string(
            command="python -u -m submitit.core._submit <folder>",
            folder=slurm.folder,
            map_count=len(points) if len(points) > 1 else None,
            **slurm.parameters,
        )
        print("dry run: nothing submitted. The sbatch script would be:")
        print("\n".join(f"  {ln}" for ln in script.splitlines() if ln.strip()))
        print(
            f"world: {cluster.nodes} node(s) x {tasks_per_node(cluster)} task(s) = "
            f"{cluster.world_size} rank(s) per job (MASTER_ADDR = first node of the job)"
        )
        print("\n".join(world_layout(cluster)))
        print(f"{len(points)} job(s):")
        from evo2_hydra.dry_run import describe

        for point in points:
            print(f"  {point.label} -> {point.output_dir}")
            print("\n".join(f"    {line}" for line in describe(point.run)))

    def _run_here(self, overrides: list[str], idx: int) -> JobReturn:
        """task=plan: computed on this machine (no GPU needed), one per sweep point."""
        assert self.hydra_context is not None and self.config is not None and self.task_function
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = idx
        return run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=cfg,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )

    # ------------------------------------------------------------------------------------------
    # inside the Slurm task

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        timeout_signal = _TimeLimitSignal()
        with timeout_signal.installed():
            ret = super().__call__(*args, **kwargs)
        if ret.status == JobStatus.FAILED:
            # Raise instead of returning a FAILED result with exit code 0: the non-zero exit makes
            # srun (--kill-on-bad-exit) stop the other ranks, and submitit records the traceback.
            raise ret._return_value
        value = ret._return_value if ret.status == JobStatus.COMPLETED else None
        stopped_by = value.get("stopped_by") if isinstance(value, dict) else None
        if stopped_by:
            # Training saved a checkpoint on a signal and returned. Leave NO result for this
            # attempt: the launcher must wait for the requeued job (scontrol requeue, preemption,
            # or the time-limit requeue below), which resumes from that checkpoint.
            if timeout_signal.received:
                _requeue_after_time_limit()
            log.warning("stopped by %s: exiting without a result (the job is requeued)", stopped_by)
            sys.stdout.flush()
            sys.exit(0)
        return ret


class _TimeLimitSignal:
    """Slurm sends USR2 `signal_delay_s` before the time limit (sbatch --signal). submitit would
    requeue at once from inside the handler (rank 0 only, mid-step, no checkpoint); instead we
    turn it into the SIGTERM training already handles on every rank (finish the step, save), and
    requeue after training returned.
    """

    def __init__(self) -> None:
        self.received = False

    def _handler(self, signum, _frame) -> None:
        self.received = True
        log.warning("time-limit signal: checkpointing, then requeue")
        os.kill(os.getpid(), signal.SIGTERM)

    @contextlib.contextmanager
    def installed(self):
        # the same signal submitit asks sbatch for (SUBMITIT_PREEMPT_SIGNAL, default USR2)
        sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        old = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            signal.signal(sig, old)


def _requeue_after_time_limit() -> None:
    """Rank 0: what submitit's USR2 handler does, after training saved (max_num_timeout)."""
    import submitit
    from submitit.core.job_environment import _checkpoint
    from submitit.core.utils import DelayedSubmission, UncompletedJobError

    env = submitit.JobEnvironment()
    if env.global_rank != 0:
        return
    path = env.paths.submitted_pickle
    delayed = DelayedSubmission.load(path)
    countdown = delayed._timeout_countdown - 1
    if countdown < 0:
        raise UncompletedJobError("Job not requeued: timed out too many times (max_num_timeout)")
    reason = _checkpoint(delayed, path, countdown)
    if reason:
        raise UncompletedJobError(f"Job not requeued: {reason}")
    env._requeue(countdown)
