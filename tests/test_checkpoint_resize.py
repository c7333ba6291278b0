"""Context resize (extend_filter.py semantics), legacy edits, MP merge/split: values column by column."""

from __future__ import annotations

import pytest
import torch

from evo2_hydra.checkpoint import (
    load_module_state_dict,
    locate_checkpoint,
    merge_mp,
    split_mp,
)
from evo2_hydra.checkpoint.legacy import interleave_legacy_projections, pad_mlp_tensor
from evo2_hydra.checkpoint.loader import load_shards
from evo2_hydra.checkpoint.resize import ScratchAllocator, resize_module
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.checkpoint.writer import write_savanna_dir
from evo2_hydra.io_utils import atomic_dir
from tests.ckpt_factory import make_random_savanna_checkpoint, random_savanna_module

SOURCE = 256


def check_resized(source: dict, out: dict, context: int) -> None:
    """Every hcm h/decay: first min(source,128,context) columns equal, the rest exactly zero."""
    assert out.keys() == source.keys()
    counts = {"h": 0, "decay": 0, "t": 0}
    for key, src in source.items():
        new = out[key]
        if key.endswith(("filter.h", "filter.decay")):
            counts[key.rsplit(".", 1)[1]] += 1
            assert new.shape == (src.shape[0], context) and new.dtype == src.dtype, key
            keep = min(src.shape[1], 128, context)
            for col in range(context):
                if col < keep:
                    assert torch.equal(new[:, col], src[:, col]), (key, col)
                else:
                    assert not new[:, col].any(), (key, col)
        elif key.endswith("filter.t"):
            counts["t"] += 1
            assert new.dtype == torch.float32
            assert torch.equal(new, torch.arange(context, dtype=torch.float32).view(1, 1, context))
        elif isinstance(src, torch.Tensor):
            assert torch.equal(new, src), key
    assert counts == {"h": 2, "decay": 2, "t": 2}  # evo2_tiny: two hcm, two hcl layers


@pytest.mark.parametrize("context", [64, 200, 1024])
def test_resize_module_shrink_and_extend(tiny, context):
    source = random_savanna_module(tiny, SOURCE)
    check_resized(source, resize_module(source, context), context)


def test_resize_extends_into_sparse_scratch_files(tmp_path, tiny):
    source = random_savanna_module(tiny, SOURCE)
    out = resize_module(source, 4096, ScratchAllocator(tmp_path, threshold=1024))
    check_resized(source, out, 4096)
    assert list(tmp_path.iterdir()) == []  # scratch files are unlinked once mapped


@pytest.mark.parametrize(("layout", "mp"), [("single", 1), ("step", 1), ("latest", 2)])
def test_writer_resizes_every_shard(tmp_path, tiny, layout, mp):
    src = make_random_savanna_checkpoint(tmp_path / "src", tiny, SOURCE, layout=layout, mp=mp)
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "src").rglob("*") if p.is_file())
    location = locate_checkpoint(src)
    shards = load_shards(location)
    with atomic_dir(tmp_path / "out") as tmp:  # the one savanna writer, keeping the MP layout
        write_savanna_dir(tmp, [s["module"] for s in shards], iteration=7, context=512)
    out = tmp_path / "out"
    loc = locate_checkpoint(out)
    assert loc.mp == mp and loc.iteration == 7 and (out / "latest").read_text() == "global_step7"
    source_shards = locate_checkpoint(src).model_files
    for src_file, out_file in zip(source_shards, loc.model_files):
        src_state, out_state = safe_load(src_file), safe_load(out_file)
        check_resized(src_state["module"], out_state["module"], 512)
        shapes = out_state["param_shapes"]
        assert all(
            tuple(shapes[k]) == tuple(v.shape)
            for k, v in out_state["module"].items()
            if k in shapes
        )
        assert out_state["dp_world_size"] == 1 and out_state["iteration"] == 7
    # the source is never modified
    assert before == sorted(
        p.stat().st_mtime_ns for p in (tmp_path / "src").rglob("*") if p.is_file()
    )


def test_merge_split_round_trip(tiny):
    module = random_savanna_module(tiny, SOURCE)
    shards = split_mp(module, 2)
    assert shards[0]["sequential.3.mixer.mixer.filter.h"].shape == (2, SOURCE)  # groups split
    assert shards[0]["sequential.2.mixer.dense.weight"].shape == (64, 32)  # input columns split
    assert shards[1]["sequential.4.mixer.mixer.filter.t"].shape == (1, 1, SOURCE)  # replicated
    merged = merge_mp(shards)
    assert all(torch.equal(merged[k], v) for k, v in module.items() if isinstance(v, torch.Tensor))


def test_interleave_legacy_rows():
    d = 4
    legacy = torch.arange(3 * d).float().view(3 * d, 1)  # rows [x1 | x2 | v] = 0..3 | 4..7 | 8..11
    module = {
        "sequential.2.mixer.hyena_proj_conv.short_conv_weight": legacy.repeat(1, 3),
        "sequential.2.mixer.dense_projection.weight": legacy.repeat(1, 5),
        "sequential.5.mixer.dense_projection.weight": legacy.repeat(1, 5),  # attention: untouched
    }
    out = interleave_legacy_projections(module)
    expected = torch.tensor([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]).float()  # row 3i+p = old[p*d+i]
    assert torch.equal(out["sequential.2.mixer.hyena_proj_conv.short_conv_weight"][:, 0], expected)
    assert torch.equal(out["sequential.2.mixer.dense_projection.weight"][:, 4], expected)
    assert torch.equal(
        out["sequential.5.mixer.dense_projection.weight"],
        module["sequential.5.mixer.dense_projection.weight"],
    )


def test_pad_mlp_zero_rows_and_columns(tiny):
    module = random_savanna_module(tiny, SOURCE)
    out = {k: pad_mlp_tensor(k, v, 160) for k, v in module.items() if isinstance(v, torch.Tensor)}
    w1, w3 = out["sequential.2.mlp.w1.weight"], out["sequential.2.mlp.w3.weight"]
    assert out["sequential.2.mlp.w2.weight"].shape == (160, 64)
    assert w1.shape == (160, 64) and w3.shape == (64, 160)
    assert torch.equal(w1[:128], module["sequential.2.mlp.w1.weight"]) and not w1[128:].any()
    assert torch.equal(w3[:, :128], module["sequential.2.mlp.w3.weight"]) and not w3[:, 128:].any()


def _file_mappings(path) -> list[tuple[int, int]]:
    ranges = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def test_loaded_module_is_memory_mapped(tmp_path, tiny):
    src = make_random_savanna_checkpoint(tmp_path, tiny, SOURCE, layout="single")
    module, _ = load_module_state_dict(src)
    ranges = _file_mappings(src.resolve())
    # every tensor's bytes live inside the file's mapping: nothing was copied into private memory
    for key, value in module.items():
        if isinstance(value, torch.Tensor):
            assert any(lo <= value.data_ptr() < hi for lo, hi in ranges), key
