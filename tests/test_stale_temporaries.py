"""Leftovers of killed writers are removed on the next run; a live writer's never (#13 item 18).

Killed conversions left `.tmp-<out>.*` folders, killed preprocesses `.tmp-*.bin`, killed prunes
`checkpoints/.old-global_stepN.PID`, and nothing ever cleaned them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from evo2_hydra.io_utils import _host, remove_stale_temporaries
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.vtx_reference import model_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftovers(folder: Path, pid: int, host: str | None = None) -> dict[str, Path]:
    owner = f"pid{pid}-{host or _host()}"
    made = {
        "conversion": folder / f".tmp-export.{owner}.a1b2c3d4",
        "replaced": folder / f".old-export.{owner}",
        "preprocess_bin": folder / f".tmp-data.bin.{owner}.q1w2e3r4",
    }
    for name, path in made.items():
        if name == "preprocess_bin":
            path.write_bytes(b"half")
        else:
            path.mkdir()
            (path / "weights.pt").write_bytes(b"half")
    return made


def test_only_dead_writers_on_this_host_are_cleaned(tmp_path, dead_pid, caplog):
    dead = leftovers(tmp_path, dead_pid)
    other_host = tmp_path / f".tmp-export.pid{dead_pid}-elsewhere.a1b2c3d4"
    unowned = tmp_path / ".tmp-export.a1b2c3d4"  # an older version's name: writer unknown
    other_host.mkdir(), unowned.mkdir()
    live_here = tmp_path / f".tmp-export.pid{os.getpid()}-{_host()}.zzzzzzzz"
    live_here.mkdir()
    with caplog.at_level(logging.WARNING):
        removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(dead.values())
    assert not any(p.exists() for p in dead.values())
    assert all(p.exists() for p in [other_host, unowned, live_here])
    assert f"PID {dead_pid}" in caplog.text and "export" in caplog.text
    # a name filter leaves other outputs' leftovers alone
    again = leftovers(tmp_path, dead_pid)
    assert remove_stale_temporaries(tmp_path, "data*") == [again["preprocess_bin"]]


def test_a_sigkilled_writer_leaves_a_name_the_next_run_removes(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from evo2_hydra.io_utils import atomic_dir\n"
        "with atomic_dir(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'part').write_text('x'); print('ready', flush=True); time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "export")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "ready"
    (tmp,) = tmp_path.glob(".tmp-export.*")
    assert remove_stale_temporaries(tmp_path) == []  # its writer still runs
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert remove_stale_temporaries(tmp_path) == [tmp] and list(tmp_path.iterdir()) == []


def test_convert_preprocess_and_prune_clean_up(tmp_path, dead_pid, compose_cfg):
    from evo2_hydra.checkpoint.writer import prune_checkpoints
    from evo2_hydra.convert.run import run_convert
    from evo2_hydra.data.preprocess import encode_settings, preprocess_jsonl

    # convert: the killed conversion's folder next to the output
    source = make_random_savanna_checkpoint(tmp_path / "src", model_config("evo2_tiny"), 256)
    exports = tmp_path / "exports"
    exports.mkdir()
    stale = leftovers(exports, dead_pid)
    overrides = ["target=savanna", "ckpt.context=256", "verify=false"]
    overrides += [f"source={source}", f"output={exports / 'export'}"]
    run_convert(OmegaConf.to_object(compose_cfg(overrides, "convert")))
    assert not stale["conversion"].exists() and not stale["replaced"].exists()
    assert stale["preprocess_bin"].exists()  # another output's: left for its own writer
    # preprocess: the killed preprocess's .bin
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "ACGTACGT"}\n')
    run = OmegaConf.to_object(compose_cfg(["data=jsonl", f"data.input={data}"]))
    preprocess_jsonl(
        [str(data)], str(exports / "data"), encode_settings(run.data, 64), progress=False
    )
    assert not stale["preprocess_bin"].exists() and (exports / "data.bin").is_file()
    # prune: a killed prune's `.old-global_stepN.*`
    save = tmp_path / "checkpoints"
    save.mkdir()
    doomed = save / f".old-global_step2.pid{dead_pid}-{_host()}"
    doomed.mkdir()
    prune_checkpoints(save, keep_last=1)
    assert not doomed.exists()


def test_prune_leaves_no_old_folder_and_keeps_the_newest(tmp_path):
    from evo2_hydra.checkpoint.writer import prune_checkpoints

    save = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (save / f"global_step{step}").mkdir(parents=True)
    (save / "latest").write_text("global_step3")
    prune_checkpoints(save, keep_last=1)
    assert sorted(p.name for p in save.iterdir()) == ["global_step3", "latest"]
