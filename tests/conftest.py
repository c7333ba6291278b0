"""Shared fixtures: compose the real config tree, run the real entry points in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from evo2_hydra.cli import register_configs

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

register_configs()


@pytest.fixture
def compose_cfg(tmp_path) -> Callable[..., DictConfig]:
    """Compose `train` (or `convert`) with overrides, with output paths inside tmp_path."""

    def _compose(overrides: list[str] = (), config_name: str = "train") -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        with open_dict(cfg):
            if "output_dir" in cfg:  # launch.py's run folder (convert.py has none)
                cfg.output_dir = str(tmp_path / "run")
            cfg.paths.output_root = str(tmp_path / "outputs")
        GlobalHydra.instance().clear()
        return cfg

    return _compose


@pytest.fixture(scope="session")
def tiny():
    """The one tiny-model fixture: the shipped evo2_tiny ModelConfig (conf/model/evo2_tiny.yaml)."""
    from tests.vtx_reference import model_config

    return model_config("evo2_tiny")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: a tiny model's ops are too small to split (on a shared
    2-core machine 2 threads ran ~30x slower than 1, as tests/test_generate.py found)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def to_obj(cfg: DictConfig):
    return OmegaConf.to_object(cfg)


@pytest.fixture
def run_entry(tmp_path) -> Callable[..., subprocess.CompletedProcess]:
    """Run `launch.py` or `convert.py` in a subprocess with outputs under tmp_path."""

    def _run(
        script: str, *overrides: str, timeout: float = 600, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(REPO / script), *overrides]
        if not any(o.startswith("paths.output_root=") for o in overrides):
            cmd.append(f"paths.output_root={tmp_path / 'outputs'}")
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env
        )

    return _run
