"""target=savanna: model-parallel split/merge round trips, dtype cast, ZeRO-3 gathered exactly as
DeepSpeed's own consolidation does (on a real ZeRO-3 checkpoint written by DeepSpeed here), bad
input refused with nothing written."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from evo2_hydra.checkpoint.layout import locate_checkpoint
from evo2_hydra.checkpoint.loader import load_module_state_dict
from evo2_hydra.checkpoint.mp import check_mp_size
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.checkpoint.writer import verify_manifest
from evo2_hydra.convert.run import run_convert
from evo2_hydra.errors import UserError
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.vtx_reference import model_config

REPO = Path(__file__).resolve().parents[1]


def convert(compose_cfg, *overrides):
    return run_convert(OmegaConf.to_object(compose_cfg(list(overrides), config_name="convert")))


def files(save_dir: Path) -> list[Path]:
    return locate_checkpoint(save_dir).model_files


def test_mp_split_merge_round_trips_byte_exactly(tmp_path, compose_cfg):
    cfg = model_config("evo2_tiny")
    source = make_random_savanna_checkpoint(
        tmp_path / "src", cfg, 256, layout="latest", mp=1, seed=2
    )
    common = ["target=savanna", "ckpt.context=256", "verify=false"]
    convert(compose_cfg, *common, f"source={source}", f"output={tmp_path / 'mp1'}", "target.mp=1")
    convert(
        compose_cfg,
        *common,
        f"source={tmp_path / 'mp1'}",
        f"output={tmp_path / 'mp4'}",
        "target.mp=4",
    )
    convert(
        compose_cfg,
        *common,
        f"source={tmp_path / 'mp4'}",
        f"output={tmp_path / 'mp2'}",
        "target.mp=2",
        "verify=true",
    )
    convert(
        compose_cfg,
        *common,
        f"source={tmp_path / 'mp2'}",
        f"output={tmp_path / 'back'}",
        "target.mp=1",
    )

    # The step manifest (CRC32s computed while streaming) passes checkpoint/writer.py's own check.
    assert verify_manifest(locate_checkpoint(tmp_path / "mp4").step_dir) == []
    four = [safe_load(f)["module"] for f in files(tmp_path / "mp4")]
    assert len(four) == 4 and four[0]["sequential.5.mixer.dense_projection.weight"].shape == (
        48,
        64,
    )  # 1 head
    assert four[0]["sequential.2.mixer.dense.weight"].shape == (64, 16)  # row-parallel: dim 1
    assert torch.equal(
        four[3]["sequential.2.input_layernorm.weight"],
        four[0]["sequential.2.input_layernorm.weight"],
    )
    # MP 1 -> 4 -> 2 -> 1: the model-state file is byte-identical to the MP=1 one.
    (first,), (last,) = files(tmp_path / "mp1"), files(tmp_path / "back")
    assert first.read_bytes() == last.read_bytes()
    original, _ = load_module_state_dict(source)
    back = safe_load(last)["module"]
    for key, value in original.items():
        if isinstance(value, torch.Tensor):
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_dtype_cast_and_mp_refusals(tmp_path, compose_cfg, run_entry):
    cfg = model_config("evo2_tiny")
    source = make_random_savanna_checkpoint(tmp_path / "src", cfg, 256, layout="single", seed=3)
    out = tmp_path / "fp32"
    convert(
        compose_cfg,
        "target=savanna",
        f"source={source}",
        f"output={out}",
        "ckpt.context=256",
        "target.dtype=float32",
    )
    original, _ = load_module_state_dict(source)
    cast, meta = load_module_state_dict(out)
    for key, value in original.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert cast[key].dtype == torch.float32 and torch.equal(cast[key], value.float()), key
    assert (out / "manifest.json").is_file() and meta["run_config"] is not None

    with pytest.raises(
        UserError,
        match=r"target.mp=2: model=evo2_1b has num_attention_heads=15, not divisible by 2.*\[1\]",
    ):
        check_mp_size(model_config("evo2_1b"), 2)
    with pytest.raises(UserError, match=r"target.mp=3: model=evo2_tiny has num_attention_heads=4"):
        convert(
            compose_cfg,
            "target=savanna",
            f"source={source}",
            f"output={tmp_path / 'x'}",
            "target.mp=3",
        )
    assert not (tmp_path / "x").exists()
    # An incomplete NeMo folder (no weights/metadata.json) is refused (NeMo2 sources: see
    # tests/test_import_nemo.py); an existing output needs overwrite=true.
    nemo = tmp_path / "nemo"
    convert(compose_cfg, "target=nemo", f"source={source}", f"output={nemo}", "verify=false")
    (nemo / "weights" / "metadata.json").unlink()
    with pytest.raises(UserError, match=r"metadata.json: missing; Megatron writes it last"):
        convert(compose_cfg, "target=vortex", f"source={nemo}", f"output={tmp_path / 'y'}")
    with pytest.raises(UserError, match="already exists; set overwrite=true"):
        convert(compose_cfg, "target=savanna", f"source={source}", f"output={out}")
    assert not (tmp_path / "y").exists()
    # The converted folder carries its config: another model= on the command line is an error.
    res = run_entry(
        "convert.py", "target=vortex", f"source={out}", "model=evo2_1b", f"output={tmp_path / 'z'}"
    )
    assert res.returncode == 2 and "trained with model=evo2_tiny" in res.stderr, res.stderr
    assert not (tmp_path / "z").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero3_checkpoint(tmp_path_factory) -> Path:
    """A real ZeRO-3 checkpoint of evo2_tiny: 2 data-parallel ranks, bf16, 2 optimizer groups."""
    out = tmp_path_factory.mktemp("zero3") / "save"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(REPO / "tests" / "zero3_checkpoint_writer.py"), str(out), "--bf16",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_zero3_gathered_like_deepspeed(tmp_path, compose_cfg, zero3_checkpoint):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = tmp_path / "zero1"
    convert(
        compose_cfg,
        "target=savanna",
        f"source={zero3_checkpoint}",
        f"output={out}",
        "ckpt.context=256",
        "verify=true",
    )
    (model_file,) = files(out)
    assert model_file.name == "mp_rank_00_model_states.pt"
    ours = safe_load(model_file)["module"]
    reference = get_fp32_state_dict_from_zero_checkpoint(str(zero3_checkpoint))
    assert set(reference) <= set(ours)
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype == torch.float32 and torch.equal(ours[key], value), (
            key
        )

    # Incomplete ZeRO-3 folders: a data-parallel rank's model states, or its fp32 shard, missing.
    step = zero3_checkpoint / "global_step2"
    for missing in (
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ):
        broken = tmp_path / f"broken_{missing[:8]}" / "global_step2"
        shutil.copytree(step, broken)
        (broken / missing).unlink()
        bad_out = tmp_path / "bad_out"
        with pytest.raises(UserError, match=r"ZeRO-3 checkpoint is incomplete.*rank\(s\) \[1\]"):
            convert(compose_cfg, "target=savanna", f"source={broken}", f"output={bad_out}")
        assert not bad_out.exists()
