"""Verified loading (issue #13 items 1, 3-6, 8-10): what a run saved is checked before use.

A real finetune (DeepSpeed on CPU, ZeRO-1, evo2_tiny at context 64) saves global_step2 and
global_step4 once per module; each test copies that run folder, damages it the way an attacker,
a crash or a full disk would, and then resumes, scores, generates or converts from it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from evo2_hydra.checkpoint.integrity import all_finite, check_module, verify_step_dir
from evo2_hydra.checkpoint.layout import CheckpointLocation, locate_checkpoint
from evo2_hydra.checkpoint.loader import load_module_state_dict
from evo2_hydra.checkpoint.run_dir import parse_config_yaml, read_saved_run
from evo2_hydra.errors import UserError
from evo2_hydra.score import json_line, load_scoring_model
from evo2_hydra.train.run import resumed_config, run_finetune
from tests.ckpt_factory import make_random_savanna_checkpoint, random_savanna_module
from tests.test_train_run import CONTEXT, compose_run

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"
RNG = "rng_rank0.pt"


def run_overrides(base: Path, cache: Path, steps: int) -> list[str]:
    return [
        f"ckpt.context={CONTEXT}",
        f"ckpt.path={base}",
        f"data.cache_dir={cache}",
        "data.truncate=true",
        "train.micro_batch_size=2",
        "train.eval_steps=1",
        "train.eval_every=100",
        "train.zero_stage=1",
        "train.precision=float32",
        "train.save_every=2",
        "train.keep_last=3",
        f"train.steps={steps}",
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run folder holding checkpoints/global_step2 and global_step4 (latest)."""
    root = tmp_path_factory.mktemp("verified")
    model_cfg = compose_run(root / "x").model
    base = make_random_savanna_checkpoint(root / "base", model_cfg, CONTEXT, layout="latest")
    args = run_overrides(base, root / "cache", steps=4)
    run = compose_run(root / "finished", *args)
    assert run_finetune(run)["last_step"] == 4
    return {"dir": root / "finished", "base": base, "cache": root / "cache", "model": model_cfg}


@pytest.fixture
def run_copy(finished, tmp_path):
    """A fresh copy of the finished run, and a function resuming it (train.steps=5)."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished["dir"], run_dir, symlinks=True)

    def resume() -> dict:
        args = run_overrides(finished["base"], finished["cache"], steps=5)
        return run_finetune(compose_run(run_dir, *args))

    return run_dir, resume


def step(run_dir: Path, n: int) -> Path:
    return run_dir / "checkpoints" / f"global_step{n}"


class Evil:
    """Pickles as `os.system("touch MARKER")`: runs when unpickled with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def flip_tensor_bytes(path: Path, n: int = 64) -> None:
    """Invert `n` bytes inside the largest tensor of a torch zip file (zip CRCs left stale)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", fh.read(30)[26:30])
        start = info.header_offset + 30 + name_len + extra_len + 16
        fh.seek(start)
        data = fh.read(n)
        fh.seek(start)
        fh.write(bytes(b ^ 0xFF for b in data))


def truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging (an alias bomb spins forever in an unguarded loader)."""

    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- item 1: a pickle that runs code is refused before DeepSpeed touches it ------------------


@pytest.mark.parametrize("victim", [MODEL, OPTIM, RNG])
def test_resume_never_runs_code_from_a_checkpoint(run_copy, tmp_path, victim):
    run_dir, resume = run_copy
    marker = tmp_path / "pwned"
    torch.save({"module": Evil(marker), "iteration": 4}, step(run_dir, 4) / victim)
    with pytest.raises(UserError) as err:
        resume()
    assert not marker.exists()
    assert f"global_step4/{victim}: refused to load" in one_line(err)
    assert "posix.system" in str(err.value) or "os.system" in str(err.value)
    # stopped, not fell back: the evidence stays where it was, nothing was rewritten
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step4"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == [
        ".staging",
        "global_step2",
        "global_step4",
    ]


def test_cli_resume_with_a_malicious_file_exits_2(finished, tmp_path, run_entry):
    out = tmp_path / "outputs"
    run_dir = out / "runs" / "evil"
    shutil.copytree(finished["dir"], run_dir)
    marker = tmp_path / "pwned"
    torch.save({"module": Evil(marker)}, step(run_dir, 4) / MODEL)
    args = run_overrides(finished["base"], finished["cache"], steps=5)
    res = run_entry("launch.py", *args, f"paths.output_root={out}", "run_name=evil")
    assert res.returncode == 2, res.stderr[-2000:]
    assert not marker.exists()
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{MODEL}: refused to load" in last


# ---- items 3 and 5: no usable `latest` never means starting over --------------------------


def _latest_missing(save: Path) -> None:
    (save / "latest").unlink()


def _latest_loop(save: Path) -> None:
    (save / "latest").unlink()
    os.symlink("latest", save / "latest")


def _latest_directory(save: Path) -> None:
    (save / "latest").unlink()
    (save / "latest").mkdir()


def _latest_outside(save: Path) -> None:
    # another run's checkpoint, reached through `latest`
    other = save.parent.parent / "done"
    shutil.copytree(save.parent, other)
    (save / "latest").write_text("../../done/checkpoints/global_step2")


@pytest.mark.parametrize(
    "damage", [_latest_missing, _latest_loop, _latest_directory, _latest_outside]
)
def test_resume_without_a_usable_latest_takes_the_newest_intact_step(run_copy, damage, caplog):
    run_dir, resume = run_copy
    save = run_dir / "checkpoints"
    step4_model = (step(run_dir, 4) / MODEL).read_bytes()
    damage(save)
    with caplog.at_level(logging.WARNING):
        out = resume()
    assert out["start_step"] == 4 and out["last_step"] == 5
    assert "; resuming from the newest intact step global_step4" in caplog.text
    assert (save / "latest").read_text() == "global_step5"
    assert (step(run_dir, 4) / MODEL).read_bytes() == step4_model  # never rewritten


def test_reading_a_run_whose_latest_points_outside_is_refused(run_copy):
    run_dir, _ = run_copy
    _latest_outside(run_dir / "checkpoints")
    with pytest.raises(UserError, match=r"latest: names '\.\./\.\./done/checkpoints/global_step2'"):
        locate_checkpoint(run_dir)


# ---- items 4 and 6: corrupt or truncated files ----------------------------------------------


@pytest.mark.parametrize(
    ("victim", "damage", "message"),
    [
        (MODEL, flip_tensor_bytes, r"tensor '[^']+' does not match the manifest \(crc32"),
        (MODEL, truncate, "not a readable torch checkpoint"),
        (OPTIM, truncate, "not a readable torch checkpoint"),
        (RNG, truncate, "not a readable torch checkpoint"),
    ],
)
def test_resume_falls_back_to_the_previous_intact_step(run_copy, victim, damage, message, caplog):
    run_dir, resume = run_copy
    damage(step(run_dir, 4) / victim)
    with caplog.at_level(logging.WARNING):
        out = resume()
    assert out["start_step"] == 2 and out["last_step"] == 5
    warning = next(
        r.getMessage() for r in caplog.records if "damaged-global_step4" in r.getMessage()
    )
    assert f"global_step4/{victim}" in warning and re.search(message, warning)
    assert "Traceback" not in caplog.text
    # the damaged step is kept aside (never deleted), the new step 4 is intact
    assert (run_dir / "checkpoints" / "damaged-global_step4" / victim).is_file()
    verify_step_dir(step(run_dir, 4))


def test_resume_stops_when_no_step_is_intact(run_copy):
    run_dir, resume = run_copy
    for n in (2, 4):
        truncate(step(run_dir, n) / MODEL)
    with pytest.raises(UserError) as err:
        resume()
    assert "holds checkpoints but none is intact" in one_line(err)
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} >= {"global_step2", "global_step4"}


def test_score_and_convert_refuse_corrupt_weights(run_copy, compose_cfg, tmp_path):
    from evo2_hydra.convert.run import run_convert

    run_dir, _ = run_copy
    flip_tensor_bytes(step(run_dir, 4) / MODEL)
    expected = rf"global_step4/{MODEL}: tensor '[^']+' does not match the manifest"
    with pytest.raises(UserError, match=expected):
        load_module_state_dict(run_dir)
    ckpt = compose_run(tmp_path / "s", f"ckpt.path={run_dir}", f"ckpt.context={CONTEXT}").ckpt
    model = compose_run(tmp_path / "s").model
    with pytest.raises(UserError, match=expected):
        load_scoring_model(model, ckpt, torch.float32, torch.device("cpu"))
    conv = compose_cfg(
        ["target=savanna", f"source={run_dir}", f"output={tmp_path / 'out'}"],
        config_name="convert",
    )
    with pytest.raises(UserError, match=expected):
        run_convert(OmegaConf.to_object(conv))
    assert not (tmp_path / "out").exists()


# ---- items 8 and 9: saved configs are read with limits, aliases refused --------------------

ALIAS_BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(
            f"{chr(ord('a') + i + 1)}: &{chr(ord('a') + i + 1)} [{','.join(['*' + chr(ord('a') + i)] * 9)}]"
            for i in range(8)
        ),
        "model: *i",
        "ckpt: *i",
        "data: *i",
        "train: *i",
    ]
)


def _bomb(text: str) -> str:
    return ALIAS_BOMB


def _invalid_yaml(text: str) -> str:
    return text + "\nmodel: [unclosed\n"


def _bad_value(text: str) -> str:
    return re.sub(r"(?m)^  hidden_size: \d+$", "  hidden_size: abc", text)


BROKEN_CONFIGS = pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_bomb, r"config\.yaml: not a valid saved config \(line \d+\): alias \*"),
        (_invalid_yaml, r"config\.yaml: not a valid saved config \(line \d+\)"),
        (_bad_value, r"config\.yaml: .*hidden_size"),
    ],
)


def _break_configs(run_dir: Path, damage) -> None:
    for path in [run_dir / "config.yaml", *run_dir.glob("checkpoints/*/configs/config.yaml")]:
        path.write_text(damage(path.read_text()))


@BROKEN_CONFIGS
def test_broken_saved_config_is_one_line_everywhere(
    run_copy, compose_cfg, tmp_path, damage, message
):
    from evo2_hydra.convert.run import run_convert
    from evo2_hydra.generate import describe_source

    run_dir, resume = run_copy
    assert len(ALIAS_BOMB) < 4000
    _break_configs(run_dir, damage)
    gen = compose_run(tmp_path / "g", "task=generate", f"ckpt.path={run_dir}")
    conv = OmegaConf.to_object(
        compose_cfg(
            ["target=vortex", f"source={run_dir}", f"output={tmp_path / 'out'}"],
            config_name="convert",
        )
    )
    with time_limit(60):
        with pytest.raises(UserError) as err:
            describe_source(gen.ckpt, gen.model, gen.data)
        assert re.search(message, one_line(err))
        with pytest.raises(UserError) as err:
            run_convert(conv)
        assert re.search(message, one_line(err))
        if damage is not _bad_value:  # resume compares it to the command: another run's config
            message = message.replace(r"config\.yaml", r"run/config\.yaml")
        else:
            message = r"another run's config \(model\.hidden_size: 'abc'"
        with pytest.raises(UserError) as err:
            resume()
        assert re.search(message, one_line(err))
        if damage is not _bad_value:  # `resume=RUN_DIR` reads the same file first
            overrides = [f"resume={run_dir}", "train.steps=6"]
            with pytest.raises(UserError) as err:
                resumed_config(compose_cfg(overrides), overrides)
            assert re.search(message, one_line(err))
    assert not (tmp_path / "out").exists()
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step4"


def test_saved_config_reader_limits():
    with pytest.raises(UserError, match=r"x\.yaml: not a valid saved config .*alias \*a"):
        parse_config_yaml("a: &a [1]\nb: *a\n", "x.yaml")
    with pytest.raises(UserError, match="nested too deeply"):
        parse_config_yaml("[" * 5000, "x.yaml")
    with pytest.raises(UserError, match="expected a mapping"):
        parse_config_yaml("- 1\n", "x.yaml")
    assert parse_config_yaml("model: {name: evo2_tiny}\n", "x.yaml") == {
        "model": {"name": "evo2_tiny"}
    }


def test_saved_run_reader(run_copy):
    run_dir, _ = run_copy
    saved = read_saved_run(locate_checkpoint(run_dir))
    assert saved.config_path == step(run_dir, 4) / "configs" / "config.yaml"
    assert (saved.model().name, saved.context, saved.append_eod) == ("evo2_tiny", CONTEXT, True)
    assert saved.conditions() == {"A": "1", "B": "2"}
    (run_dir / "config.yaml").write_text("x" * (2 << 20))
    run_level = CheckpointLocation(
        source=run_dir, kind="step_dir", step_dir=None, iteration=None, model_files=[]
    )
    with pytest.raises(UserError, match=r"config\.yaml: larger than 1048576 bytes"):
        read_saved_run(run_level)


# ---- item 10: entries of `module` that must not load silently ------------------------------


def _entry(kind: str):
    """Damage `module[key]` in place, keeping its shape (so only the new checks can catch it)."""
    return {
        "int32": lambda m, k: m.__setitem__(k, (m[k] * 10).to(torch.int32)),
        "bool": lambda m, k: m.__setitem__(k, m[k] > 0),
        "complex": lambda m, k: m.__setitem__(k, torch.complex(m[k], m[k])),
        "nan": lambda m, k: m[k].view(-1).__setitem__(0, float("nan")),
        "inf": lambda m, k: m[k].view(-1).__setitem__(3, float("inf")),
        "list": lambda m, k: m.__setitem__(k, m[k].tolist()),
        "sparse": lambda m, k: m.__setitem__(k, m[k].to_sparse()),
        "meta": lambda m, k: m.__setitem__(k, torch.empty(m[k].shape, device="meta")),
        "int_key": lambda m, k: m.__setitem__(7, m[k]),
    }[kind]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("int32", r"module\['{key}'\] has dtype int32, expected float16, bfloat16 or float32"),
        ("bool", r"module\['{key}'\] has dtype bool"),
        ("complex", r"module\['{key}'\] has dtype complex64"),
        ("nan", r"module\['{key}'\] holds NaN or Inf values"),
        ("inf", r"module\['{key}'\] holds NaN or Inf values"),
        ("list", r"module\['{key}'\] is a list, expected a tensor"),
        ("sparse", r"module\['{key}'\] is a torch.sparse_coo tensor, expected a dense one"),
        ("meta", r"module\['{key}'\] is a meta tensor"),
        ("int_key", r"module key 7 is a int, expected a string"),
    ],
)
def test_scoring_refuses_bad_module_entries(tmp_path, kind, message):
    model = compose_run(tmp_path / "x").model
    module = random_savanna_module(model, CONTEXT, dtype=torch.float32)
    key = "sequential.2.mixer.dense.weight"
    _entry(kind)(module, key)
    path = tmp_path / "bad.pt"
    torch.save({"module": module, "iteration": 1}, path)
    ckpt = compose_run(tmp_path / "s", f"ckpt.path={path}", f"ckpt.context={CONTEXT}").ckpt
    with pytest.raises(UserError) as err:
        load_scoring_model(model, ckpt, torch.float32, torch.device("cpu"))
    assert str(path) in one_line(err)
    assert re.search(message.format(key=re.escape(key)), str(err.value)), str(err.value)


def test_checks_accept_real_checkpoints_and_opaque_te_state(finished):
    state, _ = load_module_state_dict(finished["dir"], finite=True)
    check_module({**state, "x._extra_state": None}, "f", finite=True)
    bf16 = random_savanna_module(finished["model"], CONTEXT, dtype=torch.bfloat16)
    check_module(bf16, "f", finite=True)


def test_scores_file_never_holds_bare_nan():
    assert json_line({"index": 0, "id": "a", "sum_log_likelihood": -1.5}, Path("in.jsonl"))
    with pytest.raises(
        UserError, match=r"in\.jsonl: the score of record 3 \(id 'x'\) is not finite"
    ):
        json_line({"index": 3, "id": "x", "sum_log_likelihood": float("nan")}, Path("in.jsonl"))


def test_base_checkpoint_cache_is_verified_before_deepspeed_reads_it(finished, tmp_path):
    """The prepared base copy in the shared cache is read by DeepSpeed too: verified first."""
    cache_dir = finished["dir"].parent / "outputs" / "cache"
    args = run_overrides(finished["base"], finished["cache"], steps=1)
    run = compose_run(tmp_path / "r", *args, f"paths.cache_dir={cache_dir}")
    (cache,) = cache_dir.glob("base_checkpoints/*/global_step1")
    marker = tmp_path / "pwned"
    saved = (cache / MODEL).read_bytes()
    try:
        torch.save({"module": Evil(marker)}, cache / MODEL)
        with pytest.raises(UserError, match=f"{MODEL}: refused to load"):
            run_finetune(run)
        assert not marker.exists()
    finally:
        (cache / MODEL).write_bytes(saved)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_reads_the_exponent_bits(dtype):
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(dtype) * 100
    assert all_finite(values) and all_finite(torch.empty(0, dtype=dtype))
    info = torch.finfo(dtype)
    assert all_finite(torch.tensor([info.max, info.min, info.tiny, 0.0, -0.0], dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        damaged = values.clone()
        damaged[517] = bad
        assert not all_finite(damaged)
        assert not all_finite(damaged.reshape(40, 25).t())  # non-contiguous
