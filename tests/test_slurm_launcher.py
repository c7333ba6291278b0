"""The Slurm launcher's wiring and bad-input checks, without Slurm: a mocked AutoExecutor (as in
hydra's own submitit plugin tests) and a fake `sinfo`. The real-cluster tests are in
tests/test_slurm_cluster.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from unittest import mock

import pytest

from evo2_hydra.cluster import launcher as launcher_mod
from evo2_hydra.cluster.launcher import (
    check_launcher_mirrors,
    check_one_shape,
    executor_params,
    failure_report,
    world_layout,
)
from evo2_hydra.cluster.site import check_site, parse_gpu_count
from evo2_hydra.config import ClusterConfig, ClusterKind
from evo2_hydra.errors import UserError
from tests.conftest import REPO


def slurm_cluster(**kw) -> ClusterConfig:
    base = dict(kind=ClusterKind.slurm, partition="gpu", nodes=1, gpus_per_node=4, cpus_per_task=8)
    return ClusterConfig(**{**base, **kw})


def fake_sinfo(nodes: str, partitions: str = "gpu*\ncpu\n", rc: int = 0, err: str = ""):
    """A `sinfo` stand-in: node lines 'name|cpus|gres|mem_mb' for the -N query."""

    def run(argv):
        out = nodes if "-N" in argv else partitions
        return subprocess.CompletedProcess(argv, rc, stdout=out if rc == 0 else "", stderr=err)

    return run


FOUR_GPU_NODES = "n1|64|gpu:h100:4(S:0-1)|512000\nn2|64|gpu:h100:4(S:0-1)|512000\n"


def test_parse_gpu_count():
    assert parse_gpu_count("gpu:8") == 8
    assert parse_gpu_count("gpu:a100:4(S:0-1)") == 4
    assert parse_gpu_count("gpu:2,shard:8") == 2
    assert parse_gpu_count("(null)") == 0


def test_site_accepts_a_shape_the_nodes_have():
    nodes = check_site(slurm_cluster(nodes=2), run=fake_sinfo(FOUR_GPU_NODES))
    assert [n.gpus for n in nodes] == [4, 4]


@pytest.mark.parametrize(
    "cluster,sinfo,message",
    [
        (slurm_cluster(partition=None), FOUR_GPU_NODES, "cluster.partition is not set"),
        (slurm_cluster(partition="nope"), "", "cluster.partition=nope: no such Slurm partition"),
        (slurm_cluster(gpus_per_node=8), FOUR_GPU_NODES, "at most 4 GPU(s) per node"),
        (slurm_cluster(nodes=3), FOUR_GPU_NODES, "has only 2 node(s)"),
        (slurm_cluster(cpus_per_task=32), FOUR_GPU_NODES, "= 128 CPUs"),
        (slurm_cluster(mem_gb=4000), FOUR_GPU_NODES, "cluster.mem_gb=4000"),
        (slurm_cluster(gpus_per_node=1), "c1|8|(null)|2000\n", "no GPUs (no gpu GRES)"),
    ],
)
def test_site_refuses_bad_shapes(cluster, sinfo, message):
    with pytest.raises(UserError) as err:
        check_site(cluster, run=fake_sinfo(sinfo))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_site_unreachable_is_one_line():
    run = fake_sinfo("", rc=1, err="slurm_load_partitions: Unable to contact slurm controller\n")
    with pytest.raises(
        UserError, match="Slurm is not reachable: `sinfo` failed .*Unable to contact"
    ):
        check_site(slurm_cluster(), run=run)


def test_executor_params_one_task_per_gpu_and_site_lists():
    cluster = slurm_cluster(
        nodes=2, setup=["module load cuda"], additional_parameters={"mail-type": "END"}
    )
    params = executor_params({"setup": ["export A=1"], "signal_delay_s": 120}, cluster)
    assert params["tasks_per_node"] == 4 and params["gpus_per_node"] == 4 and params["nodes"] == 2
    assert params["setup"][1:] == ["export A=1", "module load cuda"]
    assert params["setup"][0].startswith(f"export PYTHONPATH={REPO}")
    assert params["additional_parameters"] == {"mail-type": "END"}
    assert params["signal_delay_s"] == 120
    cpu = executor_params({}, slurm_cluster(gpus_per_node=0, tasks_per_node=3))
    assert cpu["tasks_per_node"] == 3 and cpu["gpus_per_node"] is None
    assert cluster.world_size == 8 and len(world_layout(cluster)) == 8
    assert "  rank    5: node 1 (SLURM_NODEID), local_rank 1, device cuda:1" in world_layout(
        cluster
    )


def test_direct_launcher_override_is_refused():
    with pytest.raises(UserError, match=r"hydra.launcher.nodes=2 disagrees with cluster.nodes=1"):
        check_launcher_mirrors({"nodes": 2, "partition": "gpu"}, slurm_cluster())


def test_sweep_over_resources_is_refused(compose_cfg):
    master = compose_cfg(["cluster=slurm", "cluster.partition=gpu"])
    same = compose_cfg(["cluster=slurm", "cluster.partition=gpu", "ckpt.context=64"])
    other = compose_cfg(["cluster=slurm", "cluster.partition=gpu", "cluster.nodes=2"])
    check_one_shape(master, [(["ckpt.context=64"], same)])
    with pytest.raises(UserError, match=r"cluster.nodes differs .* ONE Slurm resource shape"):
        check_one_shape(master, [(["ckpt.context=64"], same), (["cluster.nodes=2"], other)])


def test_failure_report_names_log_and_tail(tmp_path):
    for task, text in [(0, "all fine\n"), (1, "Traceback\nValueError: boom\n")]:
        (tmp_path / f"7_0_{task}_log.err").write_text(text)
        (tmp_path / f"7_0_{task}_log.out").write_text("")
    report = failure_report("7_0", "ckpt.context=64", "state FAILED", tmp_path, 2)
    assert "Slurm job 7_0 (ckpt.context=64) failed: state FAILED" in report
    assert str(tmp_path / "7_0_1_log.err") in report
    assert "| ValueError: boom" in report


def test_launcher_submits_one_array_with_cluster_shape(tmp_path, monkeypatch, capsys):
    """Through Hydra's real multirun: one AutoExecutor, one map_array over both contexts."""
    import sys

    from hydra.core.utils import JobReturn, JobStatus

    monkeypatch.setattr(launcher_mod, "check_site", lambda cluster: [])
    executor = mock.MagicMock()
    job = mock.MagicMock()
    job.results.return_value = [JobReturn(status=JobStatus.COMPLETED, _return_value={"ok": 1})]
    jobs = []

    def map_array(fn, *columns):
        for i in range(len(columns[0])):
            j = mock.MagicMock()
            j.job_id = f"42_{i}"
            j.results.return_value = job.results.return_value
            jobs.append(j)
        return jobs

    executor.map_array.side_effect = map_array
    monkeypatch.setattr("submitit.AutoExecutor", mock.MagicMock(return_value=executor))
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "launch.py",
            "-m",
            "cluster=slurm",
            "cluster.partition=gpu",
            "cluster.nodes=2",
            "cluster.gpus_per_node=4",
            "cluster.setup=[module load cuda]",
            "ckpt.context=64,128",
            f"paths.output_root={tmp_path}",
        ],
    )
    import hydra

    from evo2_hydra.cli import run_launch

    app = hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="train")
    app(run_launch)()
    params = executor.update_parameters.call_args.kwargs
    assert params["nodes"] == 2 and params["tasks_per_node"] == 4 and params["gpus_per_node"] == 4
    assert params["slurm_partition"] == "gpu" and params["slurm_setup"][1:] == ["module load cuda"]
    assert executor.map_array.call_count == 1
    overrides = executor.map_array.call_args.args[1]
    assert sorted(o for ov in overrides for o in ov if o.startswith("ckpt.context")) == [
        "ckpt.context=128",
        "ckpt.context=64",
    ]
    out = capsys.readouterr().out
    assert "submitted Slurm array job 42" in out
    assert "squeue -j 42" in out and "sacct -j 42" in out
    assert str(Path(tmp_path) / "sweeps/evo2_tiny/ckpt.context=64") in out


def _task_side(monkeypatch, value):
    """Run the launcher's in-task wrapper around a task that returned `value`.

    (The base class is patched through launcher_mod: Hydra's plugin scan re-executes the plugin
    module, so a fresh import may hold a different SlurmLauncher class object.)"""
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn(status=JobStatus.COMPLETED, _return_value=value)
    monkeypatch.setattr(launcher_mod.SlurmLauncher, "__call__", lambda self, *a, **k: ret)
    requeued = []
    monkeypatch.setattr(launcher_mod, "_requeue_after_time_limit", lambda: requeued.append(1))
    return launcher_mod.Evo2SlurmLauncherBase()([], "hydra.sweep.dir", 0, "id", {}), requeued


def test_task_finished_returns_its_result(monkeypatch):
    ret, requeued = _task_side(monkeypatch, {"stopped_by": None, "last_step": 8})
    assert ret.return_value["last_step"] == 8 and not requeued


def test_task_stopped_by_signal_leaves_no_result(monkeypatch):
    """SystemExit inside the submitit task = no result pickle: the launcher waits for the
    requeued attempt instead of taking this interrupted one as the outcome."""
    with pytest.raises(SystemExit):
        _task_side(monkeypatch, {"stopped_by": "SIGTERM", "last_step": 3})


def test_time_limit_signal_checkpoints_then_requeues(monkeypatch):
    import os
    import signal

    from hydra.core.utils import JobReturn, JobStatus

    got_term = []

    def task(self, *args, **kwargs):
        # what training does: its own SIGTERM handler, then the time-limit signal arrives
        previous = signal.signal(signal.SIGTERM, lambda *a: got_term.append(1))
        try:
            os.kill(os.getpid(), signal.SIGUSR2)
        finally:
            signal.signal(signal.SIGTERM, previous)
        return JobReturn(status=JobStatus.COMPLETED, _return_value={"stopped_by": "SIGTERM"})

    monkeypatch.setattr(launcher_mod.SlurmLauncher, "__call__", task)
    requeued = []
    monkeypatch.setattr(launcher_mod, "_requeue_after_time_limit", lambda: requeued.append(1))
    with pytest.raises(SystemExit):
        launcher_mod.Evo2SlurmLauncherBase()([], "hydra.sweep.dir", 0, "id", {})
    assert got_term == [1] and requeued == [1]


def test_no_wait_returns_after_submission(tmp_path, monkeypatch, capsys):
    import hydra

    from evo2_hydra.cli import run_launch

    monkeypatch.setattr(launcher_mod, "check_site", lambda cluster: [])
    executor = mock.MagicMock()
    job = mock.MagicMock()
    job.job_id = "43"
    executor.map_array.return_value = [job]
    monkeypatch.setattr("submitit.AutoExecutor", mock.MagicMock(return_value=executor))
    monkeypatch.setattr(
        "sys.argv",
        ["launch.py", "cluster=slurm", "cluster.partition=gpu", "cluster.wait=false"]
        + [f"paths.output_root={tmp_path}"],
    )
    app = hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="train")
    app(run_launch)()
    job.results.assert_not_called()
    out = capsys.readouterr().out
    assert "submitted Slurm job 43" in out and "not waiting" in out


def test_run_the_memory_plan_refuses_is_not_submitted(tmp_path, monkeypatch, capsys):
    """7B at 1M context on one 80 GB GPU cannot fit: refused before submission (plan.force=false)."""
    import hydra

    from evo2_hydra.cli import run_launch

    monkeypatch.setattr(launcher_mod, "check_site", lambda cluster: [])
    auto_executor = mock.MagicMock()
    monkeypatch.setattr("submitit.AutoExecutor", auto_executor)
    monkeypatch.setattr(
        "sys.argv",
        ["launch.py", "cluster=slurm", "cluster.partition=gpu", "cluster.gpus_per_node=1"]
        + ["model=evo2_7b", "ckpt.context=1048576", f"paths.output_root={tmp_path}"],
    )
    app = hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="train")
    with pytest.raises(SystemExit) as exit_info:
        app(run_launch)()
    assert exit_info.value.code == 2
    assert "plan.force=true" in capsys.readouterr().err
    auto_executor.assert_not_called()
