"""prepare_base_checkpoint and convert.py target=savanna: checks against the preset, caching, bad input."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest
import torch

from evo2_hydra.checkpoint import (
    load_module_state_dict,
    locate_checkpoint,
    prepare_base_checkpoint,
    prepare_shared_base_checkpoint,
)
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.errors import UserError
from evo2_hydra.model import build_model, load_into_model
from tests.ckpt_factory import make_random_savanna_checkpoint, random_savanna_module
from tests.conftest import to_obj


@pytest.fixture
def tiny_run(compose_cfg):
    return to_obj(compose_cfg(["model=evo2_tiny"]))


def test_prepare_merges_resizes_and_caches(tmp_path, tiny_run):
    model = tiny_run.model
    src = make_random_savanna_checkpoint(tmp_path / "src", model, 256, layout="latest", mp=2)
    ckpt = dataclasses.replace(tiny_run.ckpt, path=str(src), context=512, source_context=256)
    out = prepare_base_checkpoint(ckpt, model, tmp_path / "run" / "base")
    loc = locate_checkpoint(out)
    assert (loc.mp, loc.iteration, (out / "latest").read_text()) == (1, 1, "global_step1")
    state = safe_load(loc.model_files[0])
    assert state["module"]["sequential.3.mixer.mixer.filter.h"].shape == (4, 512)
    assert state["dp_world_size"] == 1 and state["iteration"] == 1
    # the result loads strictly into the model at the new context
    module, _ = load_module_state_dict(out)
    load_into_model(build_model(model, 512), module, model, 512)
    source = random_savanna_module(model, 256)
    assert torch.equal(
        module["sequential.2.mixer.dense.weight"], source["sequential.2.mixer.dense.weight"]
    )
    # same source and settings: reused untouched; another context: rebuilt
    stamp = loc.model_files[0].stat().st_mtime_ns
    assert prepare_base_checkpoint(ckpt, model, out) == out
    assert loc.model_files[0].stat().st_mtime_ns == stamp
    prepare_base_checkpoint(dataclasses.replace(ckpt, context=300), model, out)
    assert safe_load(locate_checkpoint(out).model_files[0])["module"][
        "sequential.4.mixer.mixer.filter.t"
    ].shape == (1, 1, 300)


def test_prepare_pads_mlp_on_request(tmp_path, tiny_run):
    src = make_random_savanna_checkpoint(tmp_path / "src", tiny_run.model, 256, layout="single")
    wide = dataclasses.replace(tiny_run.model, mlp_inner_size=256)
    ckpt = dataclasses.replace(tiny_run.ckpt, path=str(src), context=128)
    with pytest.raises(UserError, match=r"MLP width.*ckpt\.pad_mlp=true"):
        prepare_base_checkpoint(ckpt, wide, tmp_path / "base")
    assert not (tmp_path / "base").exists()
    out = prepare_base_checkpoint(dataclasses.replace(ckpt, pad_mlp=True), wide, tmp_path / "base")
    module, _ = load_module_state_dict(out)
    assert (
        module["sequential.5.mlp.w2.weight"].shape == (256, 64)
        and not module["sequential.5.mlp.w2.weight"][128:].any()
    )


def test_prepare_without_path(tiny_run, tmp_path):
    no_path = dataclasses.replace(tiny_run.ckpt, path=None)  # the demo's ckpt has a path
    assert (
        prepare_base_checkpoint(
            dataclasses.replace(no_path, random_init=True), tiny_run.model, tmp_path
        )
        is None
    )
    with pytest.raises(UserError, match="ckpt.path is not set"):
        prepare_base_checkpoint(no_path, tiny_run.model, tmp_path / "x")


def test_prepare_bad_inputs_write_nothing(tmp_path, tiny_run):
    model = tiny_run.model
    src = make_random_savanna_checkpoint(tmp_path / "src", model, 256, layout="step")
    out = tmp_path / "base"
    ckpt = dataclasses.replace(tiny_run.ckpt, path=str(src), context=128)
    with pytest.raises(
        UserError,
        match=r"global_step7.*filter\.h is 256 columns wide, but ckpt\.source_context=1048576",
    ):
        prepare_base_checkpoint(dataclasses.replace(ckpt, source_context=1048576), model, out)
    other = dataclasses.replace(model, hidden_size=128, num_attention_heads=4, hcl_groups=128)
    with pytest.raises(
        UserError, match=r"global_step7.*model size: the checkpoint has hidden size 64"
    ):
        prepare_base_checkpoint(ckpt, other, out)
    assert not out.exists()


CONVERT = ["convert.py", "target=savanna", "verify=false"]  # the probe is CONVERT's, tested there


def test_convert_cli_resizes_and_refuses(tmp_path, tiny_run, run_entry):
    src = make_random_savanna_checkpoint(tmp_path / "src", tiny_run.model, 256, layout="step", mp=2)
    out = tmp_path / "out"
    ok = run_entry(*CONVERT, f"source={src}", "ckpt.context=1000", f"output={out}")
    assert ok.returncode == 0, ok.stderr
    loc = locate_checkpoint(out)
    assert loc.mp == 2 and loc.iteration == 7
    assert safe_load(loc.model_files[1])["module"][
        "sequential.7.mixer.mixer.filter.decay"
    ].shape == (2, 1000)
    assert (loc.step_dir / "configs" / "config.yaml").is_file() and (
        loc.step_dir / "manifest.json"
    ).is_file()
    # a bad input through the real entry point: one line naming the file, exit 2, nothing written
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes((src / "mp_rank_00_model_states.pt").read_bytes()[:5000])
    bad = run_entry(*CONVERT, f"source={truncated}", f"output={tmp_path / 'bad'}")
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1, bad.stderr
    assert re.search(r"trunc\.pt: not a readable torch checkpoint", errors[0]), errors
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("case", "overrides", "message"),
    [
        ("exists", ["ckpt.context=64"], r"output=.* already exists; set overwrite=true"),
        ("no checkpoint", [], r"no checkpoint found"),
        ("preset width", ["ckpt.source_context=8192"], r"filter\.h is 256 columns wide, but ckpt\.source_context=8192"),
        ("model size", ["model=evo2_1b"], r"global_step7.*model size: the checkpoint has hidden size 64"),
        ("no source", [], r"no run with checkpoints was found under paths\.output_root"),
    ],
)  # fmt: skip
def test_convert_bad_inputs(tmp_path, compose_cfg, tiny_run, case, overrides, message):
    from evo2_hydra.convert.run import run_convert

    src = make_random_savanna_checkpoint(tmp_path / "src", tiny_run.model, 256, layout="step")
    out = tmp_path / "out"
    source = {"no checkpoint": tmp_path / "empty", "no source": None}.get(case, src)
    (tmp_path / "empty").mkdir()
    if case == "exists":
        out.mkdir()
    args = ["target=savanna", "verify=false", f"output={out}", *overrides] + (
        [f"source={source}"] if source else []
    )
    conv = to_obj(compose_cfg(args, config_name="convert"))
    with pytest.raises(UserError, match=message):
        run_convert(conv)
    assert (case == "exists") == out.exists()


def test_convert_newest_run_as_source(tmp_path, compose_cfg, tiny_run):
    from evo2_hydra.convert.run import run_convert

    root = tmp_path / "outputs"
    for name, iteration in (("old", 3), ("new", 4)):
        make_random_savanna_checkpoint(
            root / "runs" / name / "checkpoints",
            tiny_run.model,
            256,
            layout="step",
            iteration=iteration,
        )
        (root / "runs" / name / "checkpoints" / "latest").write_text(f"global_step{iteration}")
        time.sleep(0.01)
    conv = to_obj(
        compose_cfg(
            ["target=savanna", "verify=false", f"output={tmp_path / 'out'}", "ckpt.context=128"],
            config_name="convert",
        )
    )
    assert conv.paths.output_root == str(root)
    run_convert(conv)
    assert (tmp_path / "out" / "latest").read_text() == "global_step4"


def test_prepare_from_vortex_skips_the_source_context_check(tmp_path, tiny_run, monkeypatch):
    import evo2_hydra.checkpoint.loader as loader

    # a stand-in importer: vortex files store 128 hcm taps, so the imported width is 128
    fake = lambda state, path: random_savanna_module(tiny_run.model, 128)  # noqa: E731
    monkeypatch.setattr(loader, "import_vortex_state_dict", fake)
    path = tmp_path / "evo2_tiny_vortex.pt"
    torch.save({"embedding_layer.weight": torch.zeros(512, 64)}, path)
    ckpt = dataclasses.replace(tiny_run.ckpt, path=str(path), context=256, source_context=1048576)
    out = prepare_base_checkpoint(ckpt, tiny_run.model, tmp_path / "base")
    module, _ = load_module_state_dict(out)
    assert module["sequential.3.mixer.mixer.filter.h"].shape == (4, 256)


def test_prepare_interleaves_legacy_shards_before_merging(tmp_path, tiny_run):
    from evo2_hydra.checkpoint import merge_mp, split_mp
    from evo2_hydra.checkpoint.legacy import interleave_rows

    src = make_random_savanna_checkpoint(tmp_path / "src", tiny_run.model, 256, layout="step", mp=2)
    ckpt = dataclasses.replace(tiny_run.ckpt, path=str(src), context=256, interleave_legacy=True)
    module, _ = load_module_state_dict(
        prepare_base_checkpoint(ckpt, tiny_run.model, tmp_path / "base")
    )
    shards = split_mp(random_savanna_module(tiny_run.model, 256), 2)
    for key in (
        "sequential.3.mixer.dense_projection.weight",
        "sequential.3.mixer.hyena_proj_conv.short_conv_weight",
    ):
        # legacy [x1|x2|v] blocks are per MP rank: interleave each shard, then concatenate
        expected = merge_mp([{key: interleave_rows(s[key])} for s in shards])[key]
        assert torch.equal(module[key], expected), key
        assert not torch.equal(module[key], interleave_rows(merge_mp(shards)[key])), key
    attention = (
        "sequential.5.mixer.dense_projection.weight"  # attention rows are per head: untouched
    )
    assert torch.equal(module[attention], merge_mp(shards)[attention])


def test_shared_base_is_one_copy_per_source_and_context(tmp_path, tiny_run):
    """Sweep points (lr x context) share one prepared base per context under paths.cache_dir."""
    model = tiny_run.model
    src = make_random_savanna_checkpoint(tmp_path / "src", model, 256, layout="single")
    cache = tmp_path / "cache"
    dirs = {
        context: [
            prepare_shared_base_checkpoint(
                dataclasses.replace(tiny_run.ckpt, path=str(src), context=context), model, cache
            )
            for _ in range(2)
        ]
        for context in (128, 512)
    }
    assert dirs[128][0] == dirs[128][1] and dirs[512][0] == dirs[512][1]
    assert dirs[128][0] != dirs[512][0]
    assert sorted(p.name.split("-")[1] for p in (cache / "base_checkpoints").glob("evo2*")) == [
        "ctx128",
        "ctx512",
    ]
    no_path = dataclasses.replace(tiny_run.ckpt, path=None, random_init=True)
    assert prepare_shared_base_checkpoint(no_path, model, cache) is None


def test_convert_with_no_source_and_no_output(tmp_path, run_entry, tiny_run):
    """The product command `python convert.py target=vortex`: newest run in, exports/<run>-vortex out."""
    root = tmp_path / "outputs"
    checkpoints = root / "runs" / "evo2_tiny-ctx256" / "checkpoints"
    make_random_savanna_checkpoint(checkpoints, tiny_run.model, 256, layout="step", iteration=2)
    (checkpoints / "latest").write_text("global_step2")
    proc = run_entry("convert.py", "target=vortex", "verify=false")
    assert proc.returncode == 0, proc.stderr
    out = root / "exports" / "evo2_tiny-ctx256-vortex"
    assert any(out.glob("*.pt")) and any(out.glob("*.yml")), sorted(out.iterdir())
    again = run_entry("convert.py", "target=vortex", "verify=false")  # refused, not overwritten
    assert again.returncode == 2 and "already exists" in again.stderr
