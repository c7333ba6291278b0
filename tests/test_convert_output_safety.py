"""convert.py never touches its source, and `overwrite=true` replaces only an earlier conversion.

Issue #13 item 2: `source=anc/myrun output=anc overwrite=true` used to delete the source (and
everything else in `anc`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from evo2_hydra.convert.run import run_convert
from evo2_hydra.errors import UserError
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.vtx_reference import model_config

SOURCE = "myrun/save"
COMMON = ["target=savanna", "ckpt.context=256", "verify=false"]


def convert(compose_cfg, *overrides):
    return run_convert(OmegaConf.to_object(compose_cfg([*COMMON, *overrides], "convert")))


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def anc(tmp_path) -> Path:
    """`anc/myrun/save`: a savanna save folder, with a user's file next to it in `anc`."""
    make_random_savanna_checkpoint(
        tmp_path / "anc" / "myrun", model_config("evo2_tiny"), 256, layout="latest", seed=1
    )
    (tmp_path / "anc" / "notes.txt").write_text("mine")
    return tmp_path / "anc"


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("anc", r"output=.*anc contains source=.*myrun"),  # the reported case
        ("anc/myrun", r"contains source"),
        ("anc/myrun/save", r"is the source"),
        ("anc/myrun/save/inner", r"is inside source"),
        ("link_to_anc", r"contains source"),  # a symlink to the folder holding the source
    ],
)
def test_output_that_overlaps_the_source_is_refused(tmp_path, anc, compose_cfg, output, message):
    (tmp_path / "link_to_anc").symlink_to(anc)
    before = snapshot(anc)
    with pytest.raises(UserError, match=message):
        convert(
            compose_cfg, f"source={anc / SOURCE}", f"output={tmp_path / output}", "overwrite=true"
        )
    assert snapshot(anc) == before


def test_overwrite_never_replaces_a_folder_we_did_not_write(tmp_path, anc, compose_cfg):
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("precious")
    with pytest.raises(
        UserError, match=r"output=.*other exists and is not a folder convert\.py wrote"
    ):
        convert(compose_cfg, f"source={anc / SOURCE}", f"output={other}", "overwrite=true")
    assert snapshot(other) == {"data.txt": b"precious"}
    # a run's checkpoint folder holds our step manifests, but is no export either
    with pytest.raises(UserError, match=r"not a folder convert\.py wrote"):
        convert(compose_cfg, f"source={tmp_path / 'x'}", f"output={anc / SOURCE}", "overwrite=true")


def test_overwrite_replaces_an_earlier_conversion(tmp_path, anc, compose_cfg):
    from evo2_hydra.checkpoint.manifest import is_export

    out = tmp_path / "export"
    convert(compose_cfg, f"source={anc / SOURCE}", f"output={out}")
    assert is_export(out)
    with pytest.raises(UserError, match=r"already exists; set overwrite=true"):
        convert(compose_cfg, f"source={anc / SOURCE}", f"output={out}")
    (out / "stale.txt").write_text("from before")
    convert(compose_cfg, f"source={anc / SOURCE}", f"output={out}", "overwrite=true")
    assert is_export(out) and not (out / "stale.txt").exists()
