"""A conversion keeps the source's context unless `ckpt.context` is on the command line (#13 item 7).

A run trained at ckpt.context=1024 used to export resized to the preset's 512 while its metadata
said 1024. Each target's metadata must agree with its tensors. The conversions run with Hydra's
runtime config set, as `python convert.py ...` does, so only real command-line overrides count.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from evo2_hydra.checkpoint.layout import locate_checkpoint
from evo2_hydra.checkpoint.loader import load_shards, shard_shapes
from evo2_hydra.checkpoint.mp import merged_shapes
from evo2_hydra.checkpoint.resize import context_width
from evo2_hydra.convert.run import run_convert
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.conftest import CONF
from tests.vtx_reference import model_config

RUN_CONTEXT = 1024  # the run's; the evo2_tiny preset's default is 512


def convert_cli(tmp_path: Path, *overrides: str) -> Path:
    """run_convert as convert.py runs it: HydraConfig knows the command line's overrides."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("convert", overrides=["verify=false", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
            cfg.paths.output_root = str(tmp_path / "outputs")
        return run_convert(OmegaConf.to_object(cfg))
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()


@pytest.fixture
def run_source(tmp_path) -> Path:
    """A savanna save folder like a finetune's: 1024-wide filters, configs/config.yaml says 1024."""
    model = model_config("evo2_tiny")
    source = make_random_savanna_checkpoint(
        tmp_path / "run", model, RUN_CONTEXT, layout="latest", seed=4
    )
    step = locate_checkpoint(source).step_dir
    saved = {
        "model": yaml.safe_load(OmegaConf.to_yaml(OmegaConf.structured(model))),
        "ckpt": {"name": "evo2_tiny", "context": RUN_CONTEXT},
    }
    (step / "configs").mkdir(exist_ok=True)
    (step / "configs" / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return source


def savanna_context(out: Path) -> tuple[int, int]:
    """(width of the written context tensors, ckpt.context of the written configs/config.yaml)."""
    location = locate_checkpoint(out)
    width = context_width(merged_shapes(shard_shapes(load_shards(location))), str(out))
    saved = yaml.safe_load((location.step_dir / "configs" / "config.yaml").read_text())
    return width, saved["ckpt"]["context"]


@pytest.mark.parametrize("mp", [1, 2])
def test_savanna_keeps_the_source_context_and_says_so(tmp_path, run_source, mp):
    out = convert_cli(
        tmp_path,
        "target=savanna",
        f"target.mp={mp}",
        f"source={run_source}",
        f"output={tmp_path / 'kept'}",
    )
    assert savanna_context(out) == (RUN_CONTEXT, RUN_CONTEXT)
    # asked for on the command line: resized, and the saved config agrees
    out = convert_cli(
        tmp_path,
        "target=savanna",
        f"target.mp={mp}",
        "ckpt.context=512",
        f"source={run_source}",
        f"output={tmp_path / 'resized'}",
    )
    assert savanna_context(out) == (512, 512)


@pytest.mark.parametrize("fmt", ["torch_dist", "zarr"])
def test_nemo_seq_length_is_the_source_context(tmp_path, run_source, fmt):
    out = convert_cli(
        tmp_path,
        "target=nemo",
        f"target.format={fmt}",
        f"source={run_source}",
        f"output={tmp_path / 'n'}",
    )
    model_yaml = yaml.safe_load((out / "context" / "model.yaml").read_text())
    assert model_yaml["config"]["seq_length"] == RUN_CONTEXT, model_yaml


def test_vortex_export_does_not_depend_on_the_preset_context(tmp_path, run_source):
    default = convert_cli(
        tmp_path, "target=vortex", f"source={run_source}", f"output={tmp_path / 'a'}"
    )
    explicit = convert_cli(
        tmp_path,
        "target=vortex",
        f"ckpt.context={RUN_CONTEXT}",
        f"source={run_source}",
        f"output={tmp_path / 'b'}",
    )
    for name in ("evo2_tiny.pt", "evo2_tiny.yml"):
        assert (default / name).read_bytes() == (explicit / name).read_bytes(), name
