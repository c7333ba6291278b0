"""The life of a run: the lock on its folder and on a conversion's output, Ctrl-C, unwritable
outputs and full disks (one line, exit 2, nothing half-written), where default outputs go, run
folder names, `resume=RUN_DIR`, and the summary a finished run prints.

Full disks and read-only folders are real: small tmpfs mounts (root only; skipped elsewhere).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from evo2_hydra import cli
from evo2_hydra.errors import UserError
from evo2_hydra.score import run_score
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.conftest import REPO, to_obj
from tests.vtx_reference import model_config

CONTEXT = 64
SEQS = ["ACGTTGCAAC", "GGGCCCATATATATGCGCGCAAT", "TTTTTTTTTTTTTTTTTA"]
HOLD_LOCK = (
    "import sys, time\n"
    "from evo2_hydra.io_utils import exclusive_lock\n"
    "with exclusive_lock(sys.argv[1], 'the thing'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)
LOCK_NAME = ".lock"  # the run folder's lock file (io_utils.LOCK_NAME)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "EVO2_NO_PROGRESS": "1"}


# ---- helpers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int, read_only: bool = False):
    """A real small (or read-only) file system at `path`."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size_kb}k" + (",ro" if read_only else "")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave_kb: int) -> None:
    """Fill `disk` until about `leave_kb` KiB are left."""
    with open(disk / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            while os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > leave_kb * 1024:
                f.write(b"\0" * 4096)
                f.flush()


def hold_lock(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


def launch_in_process(cfg, capsys) -> tuple[int, str]:
    """cli.run_launch / run_convert as the entry points call them: (exit code, last stderr line)."""
    entry = cli.run_convert if "target" in cfg else cli.run_launch
    with pytest.raises(SystemExit) as exit_info:
        entry(cfg)
    err = capsys.readouterr().err
    return exit_info.value.code, one_error_line(err)


def no_temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".tmp-*")] if folder.exists() else []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random evo2_tiny run folder of ours (checkpoints + config.yaml), a plain .pt, inputs."""
    root = tmp_path_factory.mktemp("life")
    cfg = model_config("evo2_tiny")
    single = make_random_savanna_checkpoint(root / "release", cfg, CONTEXT, layout="single")
    run = root / "runs" / "myrun"
    make_random_savanna_checkpoint(run / "checkpoints", cfg, CONTEXT, layout="step", iteration=2)
    (run / "checkpoints" / "latest").write_text("global_step2")
    saved = {"model": OmegaConf.structured(cfg), "ckpt": {"context": CONTEXT}}
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    seqs = root / "seqs.jsonl"
    seqs.write_text("".join(json.dumps({"id": i, "text": s}) + "\n" for i, s in enumerate(SEQS)))
    return {"root": root, "single": single, "run": run, "seqs": seqs}


def score_cfg(compose_cfg, tiny, *extra):
    return compose_cfg(
        [
            "task=score",
            f"ckpt.path={tiny['single']}",
            f"ckpt.context={CONTEXT}",
            f"score.input={tiny['seqs']}",
            *extra,
        ]
    )


# ---- the exclusive lock (io_utils) ------------------------------------------------------------


def test_lock_refuses_a_live_holder_naming_it_and_outlives_no_sigkill(tmp_path):
    from evo2_hydra.io_utils import LOCK_NAME as lock_name
    from evo2_hydra.io_utils import OutputLocked, exclusive_lock

    assert lock_name == LOCK_NAME
    lock = tmp_path / LOCK_NAME
    holder = hold_lock(lock)
    try:
        with pytest.raises(OutputLocked) as err:
            with exclusive_lock(lock, "run folder X"):
                pass
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(err.value)
        assert "run folder X is in use" in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock.exists()  # the killed holder could not clean up ...
    with exclusive_lock(lock, "run folder X"):  # ... and its lock is taken over at once
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_lock_staleness_rules(tmp_path, monkeypatch):
    import evo2_hydra.io_utils as io_utils
    from evo2_hydra.io_utils import OutputLocked, exclusive_lock

    lock = tmp_path / LOCK_NAME
    me = io_utils._holder_record()
    # our own pid, but another start time: the pid was reused by another process -> stale
    lock.write_text(json.dumps({**me, "start_time": "1"}))
    with exclusive_lock(lock, "x"):
        pass
    # another host, refreshed recently: may be alive -> refused; not refreshed -> stale
    lock.write_text(json.dumps({**me, "host": "elsewhere", "pid": 1}))
    with pytest.raises(OutputLocked, match="pid 1 on elsewhere"):
        with exclusive_lock(lock, "x"):
            pass
    old = time.time() - io_utils.STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    with exclusive_lock(lock, "x"):
        pass
    # a requeued Slurm job (same job id, another node) takes over its own earlier lock
    lock.write_text(json.dumps({**me, "host": "elsewhere", "pid": 1, "slurm_job_id": "77"}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with exclusive_lock(lock, "x"):
        pass
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    lock.write_text(json.dumps({**me, "host": "elsewhere", "pid": 1, "slurm_job_id": "77"}))
    with pytest.raises(OutputLocked, match="Slurm job 77"):
        with exclusive_lock(lock, "x"):
            pass


def test_lock_heartbeat_refreshes_the_file(tmp_path, monkeypatch):
    import evo2_hydra.io_utils as io_utils
    from evo2_hydra.io_utils import exclusive_lock

    monkeypatch.setattr(io_utils, "HEARTBEAT_S", 0.05)
    lock = tmp_path / LOCK_NAME
    with exclusive_lock(lock, "x"):
        old = time.time() - 1000
        os.utime(lock, (old, old))
        time.sleep(0.5)
        assert time.time() - lock.stat().st_mtime < 10


# ---- #13 item 16: two conversions into one output --------------------------------------------


def test_convert_refuses_an_output_another_conversion_is_writing(tiny, tmp_path, run_entry):
    out = tmp_path / "export"
    holder = hold_lock(out.parent / f".{out.name}{LOCK_NAME}")
    try:
        started = time.perf_counter()
        res = run_entry(
            "convert.py", "target=vortex", f"source={tiny['single']}", f"output={out}",
            f"ckpt.context={CONTEXT}", "verify=false",
        )  # fmt: skip
        assert res.returncode == 2
        line = one_error_line(res.stderr)
        assert line.startswith(f"error: output={out} is in use by pid {holder.pid}"), line
        assert not out.exists() and no_temporaries(tmp_path) == []
        assert "converted in" not in res.stdout + res.stderr  # refused before converting
        print(f"refused after {time.perf_counter() - started:.1f} s")
    finally:
        holder.kill()
        holder.wait()


# ---- #13 item 12: unwritable outputs, unreadable inputs ---------------------------------------


@pytest.mark.parametrize("case", ["parent_is_a_file", "read_only", "disk_full"])
def test_score_unwritable_output_is_one_line(compose_cfg, tiny, tmp_path, capsys, case):
    with contextlib.ExitStack() as stack:
        if case == "parent_is_a_file":
            (tmp_path / "afile").write_text("x")
            out, cause = (
                tmp_path / "afile" / "scores",
                f"{tmp_path / 'afile'} is a file, not a folder",
            )
        elif case == "read_only":
            disk = stack.enter_context(tmpfs(tmp_path / "ro", 64, read_only=True))
            out, cause = disk / "scores", "Read-only file system"
        else:
            disk = stack.enter_context(tmpfs(tmp_path / "full", 256))
            fill(disk, leave_kb=24)
            out, cause = disk / "scores", "No space left on device"
        cfg = score_cfg(compose_cfg, tiny, f"score.output={out}", "score.logits=true")
        code, line = launch_in_process(cfg, capsys)
        assert code == 2
        assert line == f"error: {out}: {cause}", line
        assert not out.exists() and no_temporaries(out.parent) == []


def test_score_input_gz_utf8_and_unreadable(compose_cfg, tiny, tmp_path, capsys, monkeypatch):
    gz = tmp_path / "seqs.jsonl.gz"
    gz.write_bytes(gzip.compress(tiny["seqs"].read_bytes()))
    out = run_score(to_obj(score_cfg(compose_cfg, tiny, f"score.input={gz}")))
    assert len((out / "scores.jsonl").read_text().splitlines()) == len(SEQS)

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ACGT"}\n{"text": "AC\xffGT"}\n')
    code, line = launch_in_process(score_cfg(compose_cfg, tiny, f"score.input={bad}"), capsys)
    assert code == 2 and line.startswith(f"error: {bad}:2: ") and "UTF-8" in line, line

    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(tiny["seqs"].read_bytes())[:-12])
    code, line = launch_in_process(score_cfg(compose_cfg, tiny, f"score.input={broken}"), capsys)
    assert code == 2 and line.startswith(f"error: {broken}: cannot read"), line

    # unreadable (root reads everything, so the refusal is the kernel's answer, simulated)
    import builtins

    real_open = builtins.open

    def deny(file, *args, **kwargs):
        if str(file) == str(tiny["seqs"]):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    code, line = launch_in_process(score_cfg(compose_cfg, tiny), capsys)
    assert code == 2 and line.startswith(f"error: {tiny['seqs']}: "), line
    assert "Permission denied" in line


def test_preprocess_and_convert_on_a_full_disk_are_one_line(compose_cfg, tiny, tmp_path, capsys):
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps({"text": "ACGT" * 200}) + "\n" for _ in range(400)))
    with tmpfs(tmp_path / "full", 256) as disk:
        fill(disk, leave_kb=32)
        prefix = disk / "tokens"
        cfg = compose_cfg(
            [
                "task=preprocess",
                "data=jsonl",
                "data.truncate=true",
                f"data.input={data}",
                f"data.output_prefix={prefix}",
            ]
        )
        code, line = launch_in_process(cfg, capsys)
        assert code == 2 and line.endswith(": No space left on device"), line
        assert str(disk) in line
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # nothing half-written

        out = disk / "export"
        cfg = compose_cfg(
            [
                "target=vortex",
                f"source={tiny['single']}",
                f"output={out}",
                f"ckpt.context={CONTEXT}",
                "verify=false",
            ],
            config_name="convert",
        )
        code, line = launch_in_process(cfg, capsys)
        assert code == 2 and line.startswith(f"error: {out}") and "No space left" in line, line
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


# ---- #17: default outputs ---------------------------------------------------------------------


def test_default_outputs_go_to_the_checkpoints_run_folder(compose_cfg, tiny, tmp_path):
    run = tiny["run"]
    for ckpt in (run, run / "checkpoints" / "global_step2"):
        cfg = to_obj(score_cfg(compose_cfg, tiny, f"ckpt.path={ckpt}"))
        first, second = run_score(cfg), run_score(cfg)  # a second score never collides
        assert first.parent == second.parent == run / "scores" and first != second
        assert (first / "scores.jsonl").is_file() and (second / "scores.jsonl").is_file()
    # a checkpoint outside our runs: a folder named after it under paths.output_root
    out = run_score(to_obj(score_cfg(compose_cfg, tiny)))
    assert out.parent == tmp_path / "outputs" / "scores" / Path(tiny["single"]).stem

    from evo2_hydra.generate import run_generate

    gen = run_generate(
        to_obj(
            compose_cfg(
                ["task=generate", f"ckpt.path={run}", "generate.length=4", "generate.prompt=AC"]
            )
        )
    )
    assert gen.parent == run / "generations" and (gen / "generations.fasta").is_file()


# ---- finetunes --------------------------------------------------------------------------------

TRAIN_ARGS = (
    f"ckpt.context={CONTEXT}",
    "data.truncate=true",
    "train.micro_batch_size=2",
    "train.eval_steps=2",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
    "train.warmup=0.2",
    "train.zero_stage=1",
    "train.precision=float32",
    "train.activation_checkpointing=false",
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random evo2_tiny base checkpoint and a data cache shared by this module's runs."""
    root = tmp_path_factory.mktemp("life_base")
    ckpt = make_random_savanna_checkpoint(
        root / "base", model_config("evo2_tiny"), CONTEXT, layout="latest"
    )
    return (f"ckpt.path={ckpt}", f"data.cache_dir={root / 'cache'}")


def train_run(base, out: Path, *overrides: str):
    from tests.test_train_run import compose_run

    return compose_run(out, *TRAIN_ARGS, *base, *overrides)


def test_checkpoint_save_on_a_full_disk_is_one_line(base, tmp_path):
    from evo2_hydra.train.run import run_finetune

    with tmpfs(tmp_path / "disk", 512) as disk:
        run = train_run(
            base,
            disk / "run",
            "train.steps=2",
            "train.save_every=1",
            f"paths.cache_dir={tmp_path / 'cache'}",  # the prepared base weights: elsewhere
        )
        with pytest.raises(UserError) as err:
            run_finetune(run)
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"{disk / 'run' / 'checkpoints'}: saving step 1 failed")
        assert "No space left on device" in message and "no step was saved" in message
        ckpts = disk / "run" / "checkpoints"
        assert not (ckpts / "latest").exists() and not list(ckpts.glob("global_step*"))
        assert not list((ckpts / ".staging").glob("*"))  # the partial save was removed


@pytest.mark.parametrize("broken", ["metrics", "tensorboard_and_plot"])
def test_metrics_and_plot_failures_never_stop_a_run(base, tmp_path, caplog, broken):
    """Reporting outputs that cannot be written (a folder or file in the way): warnings only."""
    from evo2_hydra.train.run import run_finetune

    run_dir = tmp_path / "run"
    run = train_run(base, run_dir, "train.steps=2")
    run_dir.mkdir()
    if broken == "metrics":
        (run_dir / "metrics.jsonl").mkdir()
        expected = ["metrics.jsonl: cannot write metrics"]
    else:
        (run_dir / "tensorboard").write_text("in the way")
        (run_dir / "loss.png").mkdir()
        expected = ["tensorboard: cannot write TensorBoard events", "loss.png: no loss plot"]
    out = run_finetune(run)
    assert out["last_step"] == 2 and out["last_saved_step"] == 2 and out["plot"] is None
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step2"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for text in expected:
        assert any(text in w for w in warnings), (text, warnings)


def test_run_folder_named_after_what_defines_the_run(compose_cfg):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONF

    def name(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=list(overrides))
        GlobalHydra.instance().clear()
        return cfg.run_name

    demo = name()
    assert demo.startswith("evo2_tiny-train-")  # <model>-<data>-<hash>
    assert name("train.steps=7", "train.save_every=3", "cluster.tasks=2") == demo  # resumable
    assert name("train.lr=1e-3") != demo
    own = name("data=jsonl", "data.input=/data/my_reads.jsonl.gz")
    assert own.startswith("evo2_tiny-my_reads-") and own != demo
    assert name("run_name=mine") == "mine"


def test_conflicting_folder_is_judged_after_the_input_checks(base, tmp_path):
    from evo2_hydra.train.run import RUN_CONFIG, config_yaml, run_finetune

    other = train_run(base, tmp_path / "run", "train.lr=5e-4")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_CONFIG).write_text(config_yaml(other))
    missing = tmp_path / "nope.jsonl"
    run = train_run(base, tmp_path / "run", "data=jsonl", f"data.input={missing}")
    with pytest.raises(UserError, match=f"data.input: {missing} does not exist"):
        run_finetune(run)


def test_resume_run_dir_continues_exactly(base, tmp_path, compose_cfg, capsys):
    from evo2_hydra.train.run import resumed_config, run_finetune

    # the LR schedule spans 4 steps in all three runs (by default it spans train.steps)
    args = ("train.save_every=100", "train.eval_every=100", "train.lr_decay_steps=4")
    reference = run_finetune(train_run(base, tmp_path / "ref", *args, "train.steps=4"))
    first = run_finetune(train_run(base, tmp_path / "run", *args, "train.steps=2"))
    summary = capsys.readouterr().out
    assert f"finished 2 steps in {tmp_path / 'run'}" in summary

    overrides = [f"resume={tmp_path / 'run'}", "train.steps=4"]
    resumed = to_obj(resumed_config(compose_cfg(overrides), overrides))
    assert resumed.output_dir == str(tmp_path / "run") and resumed.train.steps == 4
    second = run_finetune(resumed)
    assert second["start_step"] == 2 and second["last_step"] == 4
    assert {**first["losses"], **second["losses"]} == reference["losses"]  # bit-identical

    refused = [f"resume={tmp_path / 'run'}", "train.lr=0.5", "train.steps=6"]
    with pytest.raises(UserError, match=r"train.lr=0.5 cannot change when a run continues"):
        resumed_config(compose_cfg(refused), refused)


# ---- through the real entry point: summary, resume, lock, Ctrl-C -----------------------------


def launch_cmd(base, out: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "launch.py"),
        *TRAIN_ARGS,
        *base,
        f"paths.output_root={out}",
        *overrides,
    ]


def wait_for_steps(metrics: Path, proc: subprocess.Popen, steps: int, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file() and metrics.read_text().count('"train"') >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError(f"no {steps} steps in {metrics} after {timeout} s")


def test_cli_summary_and_resume_run_dir(base, tmp_path):
    out = tmp_path / "outputs"
    first = subprocess.run(
        launch_cmd(base, out, "train.steps=2"), cwd=REPO, capture_output=True, text=True, env=ENV
    )
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (out / "runs").iterdir()
    assert run_dir.name.startswith("evo2_tiny-train-")
    assert f"finished 2 steps in {run_dir}" in first.stdout
    for line in (
        f"checkpoint   {run_dir / 'checkpoints' / 'global_step2'}",
        f"metrics      {run_dir / 'metrics.jsonl'}",
        f"loss plot    {run_dir / 'loss.png'}",
        f"python convert.py target=vortex source={run_dir}",
        f"python launch.py task=generate model=evo2_tiny ckpt.context={CONTEXT} "
        f"ckpt.path={run_dir} generate.condition=A generate.n=4",
        f"python launch.py task=score model=evo2_tiny ckpt.context={CONTEXT} ckpt.path={run_dir} "
        f"score.input={REPO / 'examples' / 'data' / 'valid.jsonl'}",
    ):
        assert line in first.stdout, (line, first.stdout)

    refused = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), f"resume={run_dir}", "train.lr=0.5"],
        cwd=REPO, capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    assert refused.returncode == 2
    assert one_error_line(refused.stderr).startswith(
        f"error: resume={run_dir}: train.lr=0.5 cannot change when a run continues"
    )
    more = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), f"resume={run_dir}", "train.steps=3"],
        cwd=REPO, capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resuming from" in more.stdout + more.stderr
    assert f"finished 3 steps in {run_dir}" in more.stdout
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step3"
    assert sorted(p.name for p in (out / "runs").iterdir()) == [run_dir.name]  # no new folder


def test_cli_second_run_into_a_busy_folder_fails_and_ctrl_c_saves(base, tmp_path):
    out = tmp_path / "outputs"
    cmd = launch_cmd(base, out, "run_name=busy", "train.steps=500", "train.eval_every=1000")
    cmd += ["train.save_every=1000"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )  # fmt: skip
    try:
        wait_for_steps(out / "runs/busy/metrics.jsonl", proc, 2)
        second = subprocess.run(  # refused at once; without the lock it would train on
            cmd, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=300
        )
        assert second.returncode == 2
        assert (
            one_error_line(second.stderr)
            == (
                f"error: run folder {out / 'runs/busy'} is in use by pid {proc.pid} on "
                f"{socket.gethostname()}, since "
            )
            + one_error_line(second.stderr).split(", since ")[1]
        )
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    tag = (out / "runs/busy/checkpoints/latest").read_text()
    assert int(tag.removeprefix("global_step")) >= 2
    assert f"stopped by SIGINT after step {tag.removeprefix('global_step')}" in stdout
    assert not (out / "runs/busy" / LOCK_NAME).exists()


def test_cli_ctrl_c_with_two_local_ranks_saves_and_exits_cleanly(base, tmp_path):
    out = tmp_path / "outputs"
    cmd = launch_cmd(base, out, "run_name=two", "cluster.tasks=2", "train.steps=500")
    cmd += ["train.eval_every=1000", "train.save_every=1000"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_steps(out / "runs/two/metrics.jsonl", proc, 2)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "local ranks failed" not in stderr
    step = (out / "runs/two/checkpoints/latest").read_text()
    for rank in (0, 1):
        assert (out / "runs/two/checkpoints" / step / f"rng_rank{rank}.pt").is_file()
    assert "stopped by SIGINT" in stdout


def interrupt_twice(base, out: Path, tasks: int, after_save: bool) -> tuple[int, str, float]:
    """Train, Ctrl-C, then Ctrl-C again 50 ms later or (`after_save`) once the first Ctrl-C's
    checkpoint is complete; return the exit code, the last stderr line and the seconds the run
    took to stop after the second Ctrl-C.
    """
    cmd = launch_cmd(base, out, "run_name=twice", f"cluster.tasks={tasks}", "train.steps=500")
    cmd += ["train.eval_every=1000", "train.save_every=1000"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_steps(out / "runs/twice/metrics.jsonl", proc, 2)
        os.killpg(proc.pid, signal.SIGINT)
        if after_save:
            latest = out / "runs/twice/checkpoints/latest"
            deadline = time.time() + 120
            while not latest.exists() and time.time() < deadline:
                time.sleep(0.01)
        else:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):  # it may have finished by itself
            os.killpg(proc.pid, signal.SIGINT)
        started = time.time()
        _stdout, stderr = proc.communicate(timeout=120)
        seconds = time.time() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in stderr, stderr[-3000:]
    return proc.returncode, stderr.strip().splitlines()[-1], seconds


def assert_message_matches_disk(line: str, run_dir: Path) -> None:
    """The one line says what the checkpoints folder holds: no checkpoint, or the step saved
    (complete and verified); this run saves nowhere else (save_every is past the stop).
    """
    from evo2_hydra.checkpoint.integrity import verify_step_dir
    from evo2_hydra.checkpoint.layout import read_latest

    latest = run_dir / "checkpoints/latest"
    if line == "error: interrupted (Ctrl-C): stopped without saving":
        assert not latest.exists(), "said 'without saving' but a checkpoint was completed"
        return
    saved = read_latest(run_dir / "checkpoints")
    verify_step_dir(saved)
    assert line == (
        f"error: interrupted (Ctrl-C) after saving step {saved.name.removeprefix('global_step')}:"
        " the same command resumes from it"
    ), line


@pytest.mark.parametrize("tasks", [1, 2])
def test_cli_second_ctrl_c_stops_at_once(base, tmp_path, tasks):
    from evo2_hydra.io_utils import exclusive_lock

    out = tmp_path / "outputs"
    code, line, seconds = interrupt_twice(base, out, tasks, after_save=False)
    assert code == 130
    assert seconds < 60
    # the first Ctrl-C's save may complete before the second arrives (a tiny model's step takes
    # milliseconds); either way the line says what is on disk, and nothing is half-written
    assert_message_matches_disk(line, out / "runs/twice")
    # released, or (rank 0 was killed) left by a dead holder: the next run takes it over
    with exclusive_lock(out / "runs/twice" / LOCK_NAME, "the run folder"):
        pass


@pytest.mark.parametrize("tasks", [1, 2])
def test_cli_second_ctrl_c_after_the_save_says_it_saved(base, tmp_path, tasks):
    """The race of the test above, forced: the second Ctrl-C arrives once `latest` names the
    first Ctrl-C's checkpoint. The launcher alone prints one line, and it names the saved step
    (or the run had already ended with its summary and exit 130).
    """
    out = tmp_path / "outputs"
    code, line, _seconds = interrupt_twice(base, out, tasks, after_save=True)
    assert code == 130
    if line.startswith("error:"):
        assert "after saving step" in line, line
        assert_message_matches_disk(line, out / "runs/twice")
    else:  # it finished before the second Ctrl-C: the summary's last line
        assert (out / "runs/twice/checkpoints/latest").exists()
