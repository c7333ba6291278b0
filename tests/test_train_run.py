"""Finetuning with the real DeepSpeed engine on CPU (gloo): every ZeRO stage, save/load, the exact
resume test, faults (NaN, SIGTERM, missing inputs, a folder of another run), two processes.

Single-rank runs share this pytest process (one process group of world size 1); two-rank runs
spawn their ranks. evo2_tiny at context 64 from a random checkpoint in the real savanna layout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

import evo2_hydra.data.loss as data_loss
from evo2_hydra.checkpoint.loader import load_module_state_dict
from evo2_hydra.config import RunConfig
from evo2_hydra.errors import UserError
from evo2_hydra.train.loop import TrainingDiverged
from evo2_hydra.train.metrics import read_metrics
from evo2_hydra.train.run import config_yaml, run_finetune
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.conftest import CONF, REPO

CONTEXT = 64


def compose_run(out: Path, *overrides: str) -> RunConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.output_dir = str(out)
        cfg.paths.output_root = str(out.parent / "outputs")
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A random evo2_tiny base checkpoint (savanna `latest` layout) and a shared data cache."""
    root = tmp_path_factory.mktemp("train_shared")
    model_cfg = compose_run(root / "x").model
    base = make_random_savanna_checkpoint(root / "base", model_cfg, CONTEXT, layout="latest")
    return {"base": base, "cache": root / "data_cache", "model": model_cfg}


@pytest.fixture
def make_run(shared, tmp_path):
    def _make(name: str, *overrides: str) -> RunConfig:
        return compose_run(
            tmp_path / name,
            f"ckpt.context={CONTEXT}",
            f"ckpt.path={shared['base']}",
            f"data.cache_dir={shared['cache']}",
            "data.truncate=true",
            "train.micro_batch_size=2",
            "train.eval_steps=2",
            "train.lr=1e-3",
            "train.min_lr=1e-4",
            "train.warmup=0.2",
            *overrides,
        )

    return _make


def ckpt_dir(run: RunConfig) -> Path:
    return Path(run.output_dir) / "checkpoints"


def latest(run: RunConfig) -> str:
    return (ckpt_dir(run) / "latest").read_text()


@pytest.mark.parametrize(
    "stage,precision", [(0, "float32"), (1, "bfloat16"), (2, "float32"), (3, "bfloat16")]
)
def test_zero_stage_trains_saves_and_resumes(make_run, stage, precision):
    args = (f"train.zero_stage={stage}", f"train.precision={precision}", "train.save_every=2")
    args += (f"train.activation_checkpointing={stage in (0, 3)}",)  # recompute blocks in backward
    run = make_run("run", *args, "train.steps=3", "train.keep_last=1", "train.eval_every=3")
    out = run_finetune(run)
    assert out["last_step"] == 3 and out["stopped_by"] is None
    run_dir = Path(run.output_dir)

    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[0]["lr"] == 0.0  # fresh AnnealingLR: the first update uses lr 0
    assert train[1]["lr"] > 0
    for r in train:
        assert all(
            torch.isfinite(torch.tensor(r[k])) for k in ("loss", "grad_norm", "tokens_per_s")
        )
        assert r["memory_gb"] > 0
    assert [r["step"] for r in records if r["kind"] == "valid"] == [0, 3]
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    # keep_last=1 pruned global_step2; the committed step has DeepSpeed's files and ours
    assert latest(run) == "global_step3"
    assert sorted(p.name for p in ckpt_dir(run).glob("global_step*")) == ["global_step3"]
    step = ckpt_dir(run) / "global_step3"
    model_file = (
        "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    )
    for name in (model_file, "rng_rank0.pt", "manifest.json", "configs/config.yaml"):
        assert (step / name).is_file(), name
    assert json.loads((step / "conditions.json").read_text()) == {"A": "1", "B": "2"}
    if stage in (1, 2):
        prefix = "bf16_" if precision == "bfloat16" else ""
        assert (step / f"{prefix}zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    if stage != 3:  # the model states are savanna-loadable by our own loader
        state, meta = load_module_state_dict(run_dir)
        assert meta["iteration"] == 3
        assert state["sequential.3.mixer.mixer.filter.h"].shape == (4, CONTEXT)

    # run again with more steps: DeepSpeed loads model, optimizer and schedule from step 3
    more = make_run("run", *args, "train.steps=4", "train.keep_last=1", "train.eval_every=3")
    out = run_finetune(more)
    assert out["start_step"] == 3 and out["last_step"] == 4
    assert latest(more) == "global_step4"


def test_base_weights_are_loaded_module_only(make_run, shared):
    """savanna finetune: module from the base, fresh optimizer; step 1 runs at lr 0, so the
    weights saved after it are exactly the base weights (ZeRO-2 master copy refreshed)."""
    run = make_run("run", "train.zero_stage=2", "train.precision=float32", "train.steps=1")
    run_finetune(run)
    saved, _ = load_module_state_dict(Path(run.output_dir))
    base, _ = load_module_state_dict(shared["base"])
    for key, tensor in base.items():
        if torch.is_tensor(tensor) and key in saved and not key.endswith("filter.t"):
            assert torch.equal(saved[key], tensor.float()), key


def _signal_at(monkeypatch, train_call: int, *, nan: bool = False, sig: bool = False):
    """Wrap lm_loss: at the `train_call`-th training micro-step, SIGTERM this process (the
    handler runs in the middle of the step) or return NaN."""
    real = data_loss.lm_loss
    calls = {"n": 0}

    def wrapped(logits, batch):
        loss = real(logits, batch)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == train_call:
                if sig:
                    os.kill(os.getpid(), signal.SIGTERM)
                if nan:
                    return loss * float("nan")
        return loss

    monkeypatch.setattr(data_loss, "lm_loss", wrapped)


def test_exact_resume_after_sigterm_mid_step(make_run, monkeypatch):
    args = (
        "train.zero_stage=1",
        "train.precision=float32",
        "train.steps=6",
        "train.grad_accum_steps=2",
    )
    args += ("train.save_every=100", "train.eval_every=100")
    reference = run_finetune(make_run("uninterrupted", *args))

    # SIGTERM arrives during micro-step 1 of step 3: step 3 completes, is saved, the run stops
    _signal_at(monkeypatch, train_call=5, sig=True)
    interrupted = make_run("interrupted", *args)
    first = run_finetune(interrupted)
    assert first["stopped_by"] == "SIGTERM" and first["last_step"] == 3
    assert latest(interrupted) == "global_step3"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again
    monkeypatch.undo()

    second = run_finetune(interrupted)  # same command, same folder: auto-resume
    assert second["start_step"] == 3 and second["last_step"] == 6
    losses = {**first["losses"], **second["losses"]}
    assert losses == reference["losses"]  # bit-identical per-step losses
    assert [
        r["step"] for r in read_metrics(Path(interrupted.output_dir)) if r["kind"] == "train"
    ] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


@pytest.mark.parametrize("stage,offload", [(2, "optimizer"), (3, "optimizer_and_params")])
def test_offload_trains_as_without_and_resumes_exactly(make_run, monkeypatch, stage, offload):
    """train.offload on CPU: DeepSpeed's engine really offloads (ZeRO-Offload / ZeRO-Infinity
    code paths), the losses equal the same run without offload, and a SIGTERM + auto-resume of
    the offloaded run continues them exactly."""
    from evo2_hydra.train import engine as engine_module

    args = (f"train.zero_stage={stage}", "train.precision=float32", "train.steps=4")
    args += ("train.save_every=100", "train.eval_every=100")
    reference = run_finetune(make_run("plain", *args))

    engines = []
    real_build = engine_module.build_engine

    def recording_build(*a, **kw):
        engines.append(real_build(*a, **kw))
        return engines[-1]

    monkeypatch.setattr(engine_module, "build_engine", recording_build)
    _signal_at(monkeypatch, train_call=2, sig=True)  # step 2 finishes, is saved, the run stops
    offloaded = make_run("offloaded", *args, f"train.offload={offload}")
    first = run_finetune(offloaded)
    assert first["stopped_by"] == "SIGTERM" and first["last_step"] == 2
    assert engines[0].zero_cpu_offload()  # the optimizer states live in CPU memory
    assert bool(engines[0].zero_offload_param()) == (offload == "optimizer_and_params")
    monkeypatch.undo()
    second = run_finetune(offloaded)  # auto-resume, offloaded optimizer state included
    assert second["start_step"] == 2 and second["last_step"] == 4
    losses = {**first["losses"], **second["losses"]}
    assert losses.keys() == reference["losses"].keys()
    for step, loss in reference["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), (step, losses, reference["losses"])


def test_second_ctrl_c_after_the_commit_reports_the_saved_step(make_run, monkeypatch):
    """The second Ctrl-C arrives after the stop's checkpoint was committed but before the save
    returned (here: while old checkpoints are pruned; with several ranks, at the last barrier):
    `Interrupted` names the committed step, so the one line does not say "without saving"."""
    from evo2_hydra.checkpoint import writer
    from evo2_hydra.errors import Interrupted

    real_loss, real_prune = data_loss.lm_loss, writer.prune_checkpoints
    calls = {"n": 0}

    def first_ctrl_c(logits, batch):
        if torch.is_grad_enabled():  # a training micro-step (not validation)
            calls["n"] += 1
            if calls["n"] == 2:  # during step 2: it finishes, then saves
                os.kill(os.getpid(), signal.SIGINT)
        return real_loss(logits, batch)

    def second_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_prune(*args, **kwargs)

    monkeypatch.setattr(data_loss, "lm_loss", first_ctrl_c)
    monkeypatch.setattr(writer, "prune_checkpoints", second_ctrl_c)
    args = ("train.zero_stage=1", "train.precision=float32", "train.steps=6")
    run = make_run("twice", *args, "train.save_every=100", "train.eval_every=100")
    with pytest.raises(Interrupted) as err:
        run_finetune(run)
    assert err.value.saved_step == 2
    assert latest(run) == "global_step2"


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(make_run, monkeypatch):
    run = make_run("run", "train.zero_stage=0", "train.steps=5", "train.save_every=2")
    _signal_at(monkeypatch, train_call=4, nan=True)
    with pytest.raises(
        TrainingDiverged, match=r"loss is nan at step 4.*global_step2 is the last good"
    ):
        run_finetune(run)
    assert latest(run) == "global_step2"
    assert sorted(p.name for p in ckpt_dir(run).glob("global_step*")) == ["global_step2"]


def test_folder_of_another_run_is_refused_unless_resume_false(make_run):
    other = make_run("run", "train.lr=5e-4")
    Path(other.output_dir).mkdir(parents=True)
    (Path(other.output_dir) / "config.yaml").write_text(config_yaml(other))
    run = make_run("run", "train.steps=1")
    with pytest.raises(
        UserError, match=r"another run's config \(train.lr: 0.0005 in the folder, 0.001 now"
    ):
        run_finetune(run)
    assert not ckpt_dir(run).exists()
    fresh = make_run("run", "train.steps=1", "train.resume=false")
    assert run_finetune(fresh)["last_step"] == 1
    (archived,) = (Path(run.output_dir) / "previous").iterdir()
    assert "0.0005" in (archived / "config.yaml").read_text()


def test_missing_data_or_checkpoint(make_run, tmp_path):
    run = make_run("run", f"data.input={tmp_path / 'nope.jsonl'}")
    with pytest.raises(UserError, match="nope.jsonl"):
        run_finetune(run)
    run = make_run("run2", f"ckpt.path={tmp_path / 'missing_ckpt'}")
    with pytest.raises(UserError, match="missing_ckpt: no such file"):
        run_finetune(run)
    assert not ckpt_dir(run).exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_two_local_processes(make_run, stage):
    args = (f"train.zero_stage={stage}", "cluster.tasks=2", "train.precision=bfloat16")
    run = make_run("run", *args, "train.steps=2")
    out = run_finetune(run)  # spawns rank 0 and rank 1
    assert out["world_size"] == 2 and out["last_step"] == 2
    step = ckpt_dir(run) / "global_step2"
    assert (step / "rng_rank0.pt").is_file() and (step / "rng_rank1.pt").is_file()
    if stage == 2:
        for r in (0, 1):
            assert (step / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").is_file()
        # the 2-rank checkpoint loads back: both ranks resume from it
        out = run_finetune(make_run("run", *args, "train.steps=3"))
        assert out["start_step"] == 2 and out["last_step"] == 3
    else:
        for r in (0, 1):
            assert (step / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").is_file()
        # the ZeRO-3 shards gather back into a full state dict the model loads strictly
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from evo2_hydra.model import build_model, load_into_model

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir(run)))
        model = build_model(run.model, CONTEXT, device="cpu")
        full = {**{k: v for k, v in model.state_dict().items() if k not in state}, **state}
        load_into_model(model, full, run.model, CONTEXT)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cli_sigterm_saves_and_exits_cleanly(shared, tmp_path):
    """A real signal to a real `python launch.py` process (as Slurm sends on preemption)."""
    out = tmp_path / "outputs"
    cmd = [
        sys.executable, str(REPO / "launch.py"),
        f"ckpt.context={CONTEXT}", f"ckpt.path={shared['base']}", f"data.cache_dir={shared['cache']}",
        "data.truncate=true", "train.steps=500", "train.eval_every=1000", "train.save_every=1000",
        f"paths.output_root={out}", "run_name=sig",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = out / "runs/sig/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not metrics.is_file() or metrics.read_text().count('"train"') < 2
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout + stderr
    tag = (out / "runs/sig/checkpoints/latest").read_text()
    assert int(tag.removeprefix("global_step")) >= 2


def test_cli_missing_checkpoint_is_one_line(run_entry, tmp_path):
    res = run_entry("launch.py", f"ckpt.path={tmp_path / 'nope.pt'}", "ckpt.context=64")
    assert res.returncode == 2
    assert (
        res.stderr.strip().splitlines()[-1]
        == f"error: ckpt.path={tmp_path / 'nope.pt'}: no such file or folder"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_finetune_steps_with_nccl(make_run):
    """The same code on a GPU: nccl, fused AdamW, bf16, CUDA memory in the metrics."""
    run = make_run("run", "cluster.device=cuda", "train.zero_stage=1", "train.steps=3")
    out = run_finetune(run)
    assert out["last_step"] == 3
    train = [r for r in read_metrics(Path(run.output_dir)) if r["kind"] == "train"]
    assert all(r["memory_gb"] > 0 for r in train)
