"""`cluster=slurm` against the REAL single-node Slurm that scripts/run_tests.sh brings up
(`bash scripts/slurm_cluster.sh start` for a manual run). These tests never skip: no Slurm is a
failure that says how to start it.

Every test uses its own output root, hence its own submitit folder (job ids restart at 1 on a fresh
cluster; an old folder keyed by %j would hand back a stale result). evo2_tiny at context 64-128,
a few steps, ZeRO-2 over gloo on CPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from evo2_hydra.cluster.site import check_site
from evo2_hydra.config import ClusterConfig, ClusterKind
from evo2_hydra.errors import UserError
from tests.conftest import REPO

pytestmark = pytest.mark.slurm

PARTITION = os.environ.get("EVO2_TEST_SLURM_PARTITION", "debug")
CONTEXT = 64
STEPS = 8


def _require_slurm() -> None:
    ok = (
        shutil.which("sinfo")
        and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    )
    if not ok:
        pytest.fail(
            "no local Slurm: run `bash scripts/slurm_cluster.sh start` (scripts/run_tests.sh does)"
        )


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A random evo2_tiny base checkpoint (savanna layout) and the run settings every test uses."""
    _require_slurm()
    from tests.ckpt_factory import make_random_savanna_checkpoint
    from tests.test_train_run import compose_run

    root = tmp_path_factory.mktemp("slurm_shared")
    model_cfg = compose_run(root / "x").model
    base = make_random_savanna_checkpoint(root / "base", model_cfg, CONTEXT, layout="latest")
    return {"base": base, "root": root}


def slurm_args(shared, out: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "cluster=slurm",
        f"cluster.partition={PARTITION}",
        "cluster.gpus_per_node=0",
        "cluster.cpus_per_task=1",
        "cluster.device=cpu",
        "cluster.timeout_min=10",
        f"ckpt.path={shared['base']}",
        "data.truncate=true",
        "train.micro_batch_size=2",
        "train.eval_steps=1",
        "train.eval_every=100",
        "train.precision=float32",
        "train.zero_stage=2",
        "train.lr=1e-3",
        "train.min_lr=1e-4",
        f"paths.output_root={out}",
        *extra,
    ]


def launch_cmd(args: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "launch.py"), *args]


def launch_env() -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("EVO2_SLURM_PARTITION", None)
    return env


def run_launch(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        launch_cmd(args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=launch_env(),
    )


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def run_folders(stdout: str) -> list[Path]:
    """The sweep points' folders, as the launcher printed them at submission."""
    marker = "run folder: "
    return [Path(ln.split(marker, 1)[1]) for ln in stdout.splitlines() if marker in ln]


TWO_TASK = (f"ckpt.context={CONTEXT}", "train.save_every=2", f"train.steps={STEPS}")


def job_folders(out: Path) -> list[Path]:
    """submitit's per-job folders (<job id> or <array id>_<index>) of one output root."""
    root = out / "sweeps" / "evo2_tiny" / ".submitit"
    return sorted(f for f in root.iterdir() if re.fullmatch(r"\d+(_\d+)?", f.name))


class Launch:
    """One `launch.py -m ... cluster=slurm` in the background; `result()` waits for it."""

    def __init__(self, out: Path, args: list[str]) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            launch_cmd(args),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=launch_env(),
        )
        self._result: subprocess.CompletedProcess | None = None

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        if self._result is None:
            stdout, stderr = self.proc.communicate(timeout=timeout)
            self._result = subprocess.CompletedProcess(
                self.proc.args, self.proc.returncode, stdout, stderr
            )
        return self._result


def requeue_after_first_checkpoint(launch: Launch, record: dict) -> None:
    """What an operator (or preemption) does: requeue the running job once it has a checkpoint."""
    deadline = time.time() + 240
    latest = None
    while time.time() < deadline and launch.proc.poll() is None and latest is None:
        latest = next(iter(launch.out.glob("sweeps/evo2_tiny/*/checkpoints/latest")), None)
        time.sleep(0.1)
    if latest is None:
        record["error"] = "no checkpoint appeared before the job ended"
        return
    job_id = record["job_id"] = job_folders(launch.out)[0].name
    record["latest_at_requeue"] = latest.read_text().strip()
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    # Slurm holds a requeued job for ~2 minutes (BeginTime); release it once it is pending.
    while time.time() < deadline:
        state = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True
        ).stdout.strip()
        if state == "PENDING":
            subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
            return
        time.sleep(0.2)
    record["error"] = f"job {job_id} never went back to PENDING after scontrol requeue"


@pytest.fixture(scope="module")
def launched(shared):
    """Submit every Slurm job of this module at once (the node advertises 8 CPUs: 2+2+2+1 tasks
    run side by side), so the tests wait for the slowest job instead of the sum of all jobs."""
    root = shared["root"]
    jobs = {
        "two_task": Launch(
            root / "two_task",
            slurm_args(shared, root / "two_task", "cluster.tasks_per_node=2", *TWO_TASK),
        ),
        "requeue": Launch(
            root / "requeue",
            slurm_args(shared, root / "requeue", "cluster.tasks_per_node=2", *TWO_TASK),
        ),
        "sweep": Launch(
            root / "sweep",
            slurm_args(
                shared,
                root / "sweep",
                "cluster.tasks_per_node=1",
                "data.packing=contiguous",
                "train.steps=2",
                "train.save_every=2",
                "ckpt.context=64,128",
            ),
        ),
        "failing": Launch(
            root / "failing",
            slurm_args(
                shared,
                root / "failing",
                "cluster.tasks_per_node=1",
                f"ckpt.path={root / 'missing.pt'}",
                "ckpt.context=64",
                "train.steps=1",
            ),
        ),
    }
    record: dict = {}
    driver = threading.Thread(target=requeue_after_first_checkpoint, args=(jobs["requeue"], record))
    driver.start()
    yield jobs, record
    driver.join(timeout=300)
    for job in jobs.values():
        if job.proc.poll() is None:
            job.proc.kill()


def test_two_task_finetune_trains_checkpoints_and_loads(launched):
    job = launched[0]["two_task"]
    res = job.result()
    assert res.returncode == 0, res.stderr[-3000:]
    assert "submitted Slurm job" in res.stdout and "squeue -j" in res.stdout
    (run_dir,) = run_folders(res.stdout)
    # named after its overrides, under the sweep dir
    assert run_dir.parent == job.out / "sweeps" / "evo2_tiny"
    assert "ckpt.context=64" in run_dir.name and f"train.steps={STEPS}" in run_dir.name
    step_dir = run_dir / "checkpoints" / f"global_step{STEPS}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == step_dir.name
    # ZeRO-2 over 2 ranks: one optimizer shard per rank
    assert sorted(p.name for p in step_dir.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert len(train_losses(run_dir)) == STEPS
    # the saved checkpoint loads back (CKPT's reader, as score/convert use it)
    from evo2_hydra.checkpoint.loader import load_module_state_dict

    state, _ = load_module_state_dict(run_dir)
    assert state and all(torch.isfinite(t.float()).all() for t in state.values())
    # both ranks ran as tasks of one Slurm job
    (job_dir,) = job_folders(job.out)
    assert len(list(job_dir.glob("*_log.out"))) == 2


def test_requeue_resumes_from_checkpoint_with_the_same_final_loss(launched):
    jobs, record = launched
    ref = jobs["two_task"].result()
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = train_losses(run_folders(ref.stdout)[0])

    res = jobs["requeue"].result()
    assert "error" not in record, record
    assert res.returncode == 0, res.stderr[-3000:]
    job_id = record["job_id"]
    info = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    assert "Restarts=1" in info.stdout, info.stdout
    out = jobs["requeue"].out
    logs = "".join(p.read_text() for p in (job_folders(out)[0]).glob("*_log.*"))
    assert "stopped by SIGTERM" in logs  # the first attempt saved on the signal ...
    assert "resuming from" in logs  # ... and the requeued attempt continued from a checkpoint
    (run_dir,) = run_folders(res.stdout)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] == pytest.approx(reference[STEPS], abs=1e-6)


def test_context_sweep_is_one_array_sharing_prepared_data(launched):
    job = launched[0]["sweep"]
    res = job.result()
    assert res.returncode == 0, res.stderr[-3000:]
    folders = [f for f in job_folders(job.out) if "_" in f.name]  # <array id>_<index>
    array_ids = {f.name.split("_")[0] for f in folders}
    assert len(folders) == 2 and len(array_ids) == 1, folders  # one array job, two task groups
    run_dirs = run_folders(res.stdout)
    assert [d.name.split(",")[0] for d in run_dirs] == ["ckpt.context=64", "ckpt.context=128"]
    for run_dir in run_dirs:
        assert (run_dir / "checkpoints/latest").read_text().strip() == "global_step2"
    # one prepared base checkpoint per context, in the shared cache
    bases = sorted(p.name.split("-")[1] for p in (job.out / "cache/base_checkpoints").glob("evo2*"))
    assert bases == ["ctx128", "ctx64"]
    # one prepared dataset for both points: contiguous packing does not depend on the context,
    # and the content-hash cache (with its lock) preprocessed each file once
    cache = job.out / "cache" / "data" / "jsonl"
    assert sorted(p.name.split("-")[0] for p in cache.iterdir() if p.is_dir()) == [
        "train",
        "valid",
    ]
    logs = "".join(p.read_text() for f in folders for p in f.glob("*_log.out"))
    assert logs.count("data: preprocessing") == 2  # train + valid, once
    assert logs.count("data: reusing") == 2  # the other point reused both


def test_failed_task_reports_log_path_and_error(launched):
    res = launched[0]["failing"].result()
    assert res.returncode == 2
    assert "Slurm job" in res.stderr and "failed" in res.stderr, res.stderr
    assert "_log.err" in res.stderr and "last lines:" in res.stderr
    assert "missing.pt" in res.stderr  # the task's own error, from its log


def test_dry_run_and_shape_refusal_submit_nothing(shared, tmp_path):
    res = run_launch(
        slurm_args(
            shared, tmp_path, "cluster.tasks_per_node=2", "ckpt.context=64,128", "dry_run=true"
        )
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "#SBATCH --ntasks-per-node=2" in res.stdout and "#SBATCH --array=0-1%2" in res.stdout
    assert "rank    1: node 0 (SLURM_NODEID), local_rank 1, device cpu" in res.stdout
    assert not (tmp_path / "sweeps/evo2_tiny/.submitit").exists()

    res = run_launch(slurm_args(shared, tmp_path, "cluster.nodes=1,2"))
    assert res.returncode == 2
    assert "cluster.nodes differs" in res.stderr and "ONE Slurm resource shape" in res.stderr
    assert not (tmp_path / "sweeps/evo2_tiny/.submitit").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"partition": "nope"}, f"no such Slurm partition (partitions here: {PARTITION})"),
        ({"gpus_per_node": 1}, "have no GPUs (no gpu GRES)"),
        ({"nodes": 2}, "has only 1 node(s)"),
        ({"partition": None}, "cluster.partition is not set"),
    ],
)
def test_site_checks_against_the_real_cluster(overrides, message):
    _require_slurm()
    cluster = ClusterConfig(kind=ClusterKind.slurm, **{"partition": PARTITION, **overrides})
    with pytest.raises(UserError) as err:
        check_site(cluster)
    assert message in str(err.value)


# ---- sharded inference on Slurm ----------------------------------------------------------------

TEXTS = ["ACGTTGCAAC", "GGGCCCATATAT" * 3, "acgtNNaccc", "TTTTTTTTTTTTTTTTTA", "GATTACA" * 5]


def test_score_embed_vep_split_across_slurm_tasks(shared, tmp_path, compose_cfg, monkeypatch):
    """task=score|embed|vep with cluster=slurm: each task of one Slurm job (its rank from Slurm)
    takes its block of the input, one of them merges in input order; equal to one process. The
    score job resumes: a shard an earlier attempt finished (marked here) is not recomputed."""
    import numpy as np

    from evo2_hydra.distributed import SINGLE_MARKER
    from evo2_hydra.infer.embed import run_embed
    from evo2_hydra.infer.vep import run_vep
    from evo2_hydra.score import run_score
    from tests.conftest import to_obj

    seqs = tmp_path / "seqs.jsonl"
    seqs.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))  # fmt: skip
    example = REPO / "examples" / "vep"
    tasks = {
        "score": [f"score.input={seqs}", "score.log_probs=true"],
        "embed": [f"embed.input={seqs}", "embed.layers=[blocks.3,norm]"],
        "vep": [
            f"vep.reference={example / 'reference.fa'}",
            f"vep.variants={example / 'variants.vcf'}",
            "vep.window=48",
        ],
    }
    common = [f"ckpt.path={shared['base']}", f"ckpt.context={CONTEXT}", "cluster.device=cpu"]

    # the score job's rank 0 finished in an earlier attempt: its shard is there, marked
    score_out = tmp_path / "slurm_score"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv(SINGLE_MARKER, raising=False)
    args = [*common, "task=score", *tasks["score"], f"score.output={score_out}", "cluster.tasks=2"]
    run_score(to_obj(compose_cfg(args)))
    shard0 = tmp_path / ".slurm_score.shards" / "00000-of-00002" / "scores.jsonl"
    marked = [dict(json.loads(line), marker="earlier") for line in shard0.read_text().splitlines()]
    shard0.write_text("".join(json.dumps(r) + "\n" for r in marked))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")

    jobs = {
        task: Launch(
            tmp_path / f"sub_{task}",
            slurm_args(
                shared,
                tmp_path / f"sub_{task}",
                f"cluster.tasks_per_node={3 if task == 'vep' else 2}",
                f"task={task}",
                f"ckpt.context={CONTEXT}",
                *extra,
                f"{task}.output={tmp_path / ('slurm_' + task)}",
            ),
        )
        for task, extra in tasks.items()
    }
    single = {
        task: run(
            to_obj(
                compose_cfg(
                    [*common, f"task={task}", *extra, f"{task}.output={tmp_path / ('one_' + task)}"]
                )
            )
        )  # fmt: skip
        for (task, extra), run in zip(tasks.items(), (run_score, run_embed, run_vep), strict=True)
    }
    for task, job in jobs.items():
        res = job.result()
        assert res.returncode == 0, (task, res.stderr[-3000:])
        (job_dir,) = job_folders(job.out)
        logs = "".join(p.read_text() for p in sorted(job_dir.glob("*_log.*")))
        assert len(list(job_dir.glob("*_log.out"))) == (3 if task == "vep" else 2)
        assert "merged" in logs and f"shards into {tmp_path / ('slurm_' + task)}" in logs, logs[
            -3000:
        ]

    rows = [json.loads(ln) for ln in (score_out / "scores.jsonl").read_text().splitlines()]
    ref = [json.loads(ln) for ln in (single["score"] / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(len(TEXTS))]
    assert [r.get("marker") for r in rows] == ["earlier"] * 2 + [None] * 3  # rank 0 skipped
    for a, b in zip(ref, rows, strict=True):
        assert a["sum_log_likelihood"] == pytest.approx(b["sum_log_likelihood"], abs=1e-6)
    embed_out = tmp_path / "slurm_embed"
    for layer in ("blocks.3", "norm"):
        np.testing.assert_allclose(
            np.load(single["embed"] / f"{layer}.npy"),
            np.load(embed_out / f"{layer}.npy"),
            atol=1e-6,
        )
    assert (single["embed"] / "index.jsonl").read_text() == (embed_out / "index.jsonl").read_text()
    vep_out = tmp_path / "slurm_vep"
    assert (single["vep"] / "vep.tsv").read_text() == (vep_out / "vep.tsv").read_text()
    assert not list(tmp_path.glob(".slurm_*.shards"))  # shards removed after the merge
