"""Layout detection (every accepted ckpt.path form) and the bad-input errors of locate/load."""

from __future__ import annotations

import pytest
import torch

from evo2_hydra.checkpoint import load_module_state_dict, locate_checkpoint
from evo2_hydra.errors import UserError
from tests.ckpt_factory import make_random_savanna_checkpoint, random_savanna_module


@pytest.mark.parametrize(
    ("layout", "mp", "kind", "iteration"),
    [
        ("single", 1, "file", None),
        ("step", 1, "step_dir", 7),
        ("step", 2, "step_dir", 7),
        ("latest", 2, "step_dir", 7),
    ],
)
def test_detects_each_layout(tmp_path, tiny, layout, mp, kind, iteration):
    path = make_random_savanna_checkpoint(tmp_path, tiny, 256, layout=layout, mp=mp)
    loc = locate_checkpoint(path)
    assert (loc.kind, loc.mp, loc.iteration, loc.is_zero3) == (kind, mp, iteration, False)
    assert [f.name for f in loc.model_files] == (
        [path.name]
        if layout == "single"
        else [f"mp_rank_{r:02d}_model_states.pt" for r in range(mp)]
    )
    module, meta = load_module_state_dict(path)
    expected = random_savanna_module(tiny, 256)
    assert module.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(module[key], value), key  # MP shards merged back exactly
    assert meta["iteration"] == 7 and meta["mp"] == mp


def test_run_folder_one_shard_file_and_newest_step(tmp_path, tiny):
    # Our run folder: RUN/checkpoints/{latest, global_stepN}
    run = tmp_path / "run"
    make_random_savanna_checkpoint(run / "checkpoints", tiny, 256, layout="step", iteration=3)
    make_random_savanna_checkpoint(run / "checkpoints", tiny, 256, layout="step", iteration=12)
    (run / "checkpoints" / "latest").write_text("global_step3")
    assert locate_checkpoint(run).step_dir.name == "global_step3"  # `latest` wins
    (run / "checkpoints" / "latest").unlink()
    assert locate_checkpoint(run).step_dir.name == "global_step12"  # numeric, not name order
    # one shard of an MP=2 step stands for the whole step
    step = make_random_savanna_checkpoint(tmp_path / "mp2", tiny, 256, layout="step", mp=2)
    assert locate_checkpoint(step / "mp_rank_01_model_states.pt").mp == 2


def test_zero3_detected_and_reported(tmp_path, monkeypatch):
    step = tmp_path / "global_step5"
    step.mkdir()
    for dp in range(2):
        torch.save({"module": {}}, step / f"zero_pp_rank_{dp}_mp_rank_00_model_states.pt")
    loc = locate_checkpoint(step)
    assert loc.is_zero3 and loc.mp == 1 and len(loc.zero3_files[0]) == 2
    import evo2_hydra.checkpoint.loader as loader

    monkeypatch.setattr(loader, "gather_zero3_module", fake_zero3_gatherer)
    module, meta = load_module_state_dict(step)
    assert torch.equal(module["w"], torch.full((2,), 2.0)) and meta["iteration"] == 5


def fake_zero3_gatherer(location, *, trust_pickle=False):
    return [{"w": torch.full((2,), float(len(location.zero3_files[0])))}]


def fake_vortex_importer(state, path):
    return {
        "sequential.0.word_embeddings.weight": state["embedding_layer.weight"],
        "from._extra_state": str(path),  # opaque entries pass the loader's checks
    }


def test_vortex_file_detected_and_handed_to_the_importer(tmp_path, monkeypatch):
    path = tmp_path / "evo2_tiny_vortex.pt"
    torch.save(
        {"embedding_layer.weight": torch.ones(4, 2), "blocks.0.pre_norm.scale": torch.ones(2)}, path
    )
    import evo2_hydra.checkpoint.loader as loader

    monkeypatch.setattr(loader, "import_vortex_state_dict", fake_vortex_importer)
    module, _ = load_module_state_dict(path)
    assert torch.equal(module["sequential.0.word_embeddings.weight"], torch.ones(4, 2))
    assert module["from._extra_state"] == str(path)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("empty_dir", r"no checkpoint found"),
        (
            "latest_missing_step",
            r"latest: names step 'global_step9', but .*global_step9 is not a folder there",
        ),
        ("missing_shard", r"mp_rank_01_model_states\.pt is missing"),
        ("empty_step", r"global_step2: no model-state file"),
        ("no_path", r"no such file or folder"),
        ("two_files", r"2 \.pt files"),
    ],
)
def test_bad_layouts(tmp_path, tiny, setup, message):
    target = tmp_path / "ckpt"
    target.mkdir()
    if setup == "latest_missing_step":
        make_random_savanna_checkpoint(target, tiny, 64, layout="step", iteration=1)
        (target / "latest").write_text("global_step9")
    elif setup == "missing_shard":
        target = make_random_savanna_checkpoint(target, tiny, 64, layout="step", mp=4)
        (target / "mp_rank_01_model_states.pt").unlink()
    elif setup == "empty_step":
        target = target / "global_step2"
        target.mkdir()
    elif setup == "no_path":
        target = tmp_path / "nothing_here"
    elif setup == "two_files":
        torch.save({}, target / "a.pt")
        torch.save({}, target / "b.pt")
    with pytest.raises(UserError, match=message):
        load_module_state_dict(target)


def test_file_without_savanna_content(tmp_path):
    path = tmp_path / "weird.pt"
    torch.save({"optimizer_state_dict": {}}, path)
    with pytest.raises(UserError, match=r"weird\.pt: no 'module' key"):
        load_module_state_dict(path)
