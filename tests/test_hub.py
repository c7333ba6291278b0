"""hf:// checkpoint ids and multi-part files, with no network.

A Hugging Face cache is seeded in its documented layout (huggingface_hub `manage-cache.md`:
`models--ORG--REPO/blobs/<sha256>`, `snapshots/<commit>/<file>` relative symlinks, `refs/main`, and
the tree listing `trees/<commit>.json` snapshot_download writes) with small random savanna
checkpoints in the real file layout, then resolved through the real huggingface_hub with
HF_HUB_OFFLINE set.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from evo2_hydra.checkpoint import hub
from evo2_hydra.checkpoint.layout import locate_checkpoint
from evo2_hydra.checkpoint.mapped import segments, tracking_mapped_files
from evo2_hydra.checkpoint.parts import PartsStorage, part_set
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.config import ModelConfig
from evo2_hydra.errors import UserError
from tests.ckpt_factory import make_random_savanna_checkpoint

COMMIT = "a" * 40
OLD_COMMIT = "b" * 40


def tiny_model() -> ModelConfig:
    from tests.vtx_reference import model_config

    return model_config("evo2_tiny")


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory) -> Path:
    """A random evo2_tiny release-style file (`{"module": ..., ...}`), made once."""
    return make_random_savanna_checkpoint(tmp_path_factory.mktemp("src"), tiny_model(), 256)


def split_file(path: Path, out_dir: Path, name: str, cuts: list[int]) -> list[Path]:
    """`name.part0..N`: the file's bytes cut at `cuts` (as `split -b` makes them)."""
    data = path.read_bytes()
    bounds = [0, *cuts, len(data)]
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        part = out_dir / f"{name}.part{i}"
        part.write_bytes(data[a:b])
        parts.append(part)
    return parts


def odd_cuts(path: Path, n: int) -> list[int]:
    """n-1 cut points, none page-aligned, the first inside a tensor storage."""
    size = path.stat().st_size
    return [size * (i + 1) // n + 7 for i in range(n - 1)]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty offline huggingface_hub cache under tmp_path (HF_HOME, as the library reads it)."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_resolved", {})
    return cache


def seed_repo(
    cache: Path,
    repo: str,
    files: dict[str, bytes],
    *,
    commit: str = COMMIT,
    ref: str | None = "main",
    tree: bool = True,
    recorded: dict[str, int] | None = None,
) -> Path:
    """Put `files` into the cache as huggingface_hub stores a download; returns the snapshot."""
    from huggingface_hub._tree_cache import TREE_CACHE_FORMAT_VERSION

    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    listing = {}
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo_dir / "blobs" / digest).write_bytes(data)
        link = snapshot / name
        link.symlink_to(os.path.relpath(repo_dir / "blobs" / digest, link.parent))
        size = (recorded or {}).get(name, len(data))
        listing[name] = {
            "size": size,
            "blob_id": digest[:40],
            "lfs_sha256": digest,
            "lfs_size": size,
        }
    if ref is not None:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    if tree:
        (repo_dir / "trees").mkdir(exist_ok=True)
        (repo_dir / "trees" / f"{commit}.json").write_text(
            json.dumps({"format_version": TREE_CACHE_FORMAT_VERSION, "files": listing})
        )
    return snapshot


def parts_of(checkpoint_file: Path, tmp_path: Path, n: int, name: str) -> dict[str, bytes]:
    paths = split_file(checkpoint_file, tmp_path / "split", name, odd_cuts(checkpoint_file, n))
    return {p.name: p.read_bytes() for p in paths}


def assert_same_checkpoint(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert a["module"].keys() == b["module"].keys()
    for key, value in a["module"].items():
        if isinstance(value, torch.Tensor):
            other = b["module"][key]
            assert value.dtype == other.dtype and value.shape == other.shape, key
            assert torch.equal(value.view(torch.uint8), other.view(torch.uint8)), key


# ---------------------------------------------------------------------------------------------
# Multi-part files


@pytest.mark.parametrize("n", [2, 3])
def test_parts_read_as_one_file_without_joining(checkpoint_file, tmp_path, n):
    parts = split_file(
        checkpoint_file, tmp_path, "savanna_evo2_tiny.pt", odd_cuts(checkpoint_file, n)
    )
    whole = safe_load(checkpoint_file)
    before = sorted(p.name for p in tmp_path.iterdir())
    for given in (tmp_path / "savanna_evo2_tiny.pt", parts[0], parts[-1]):
        assert_same_checkpoint(safe_load(given), whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no joined copy written
    # The location is the part set; the loader goes through it like any other file.
    location = locate_checkpoint(tmp_path)
    assert location.model_files == [parts[0]]


def test_parts_are_memory_mapped_and_registered_for_file_copies(checkpoint_file, tmp_path):
    parts = split_file(checkpoint_file, tmp_path, "x.pt", odd_cuts(checkpoint_file, 3))
    view = PartsStorage(part_set(parts[0]))
    with tracking_mapped_files() as registry:
        module = safe_load(parts[0])["module"]
        assert len(registry) == 3  # one mapping per part
        mapped = copied = 0
        for value in module.values():
            if isinstance(value, torch.Tensor) and value.nbytes:
                where = segments(value.data_ptr(), value.nbytes)
                if where is None:
                    copied += 1
                else:
                    mapped += 1
        # Every tensor lies in a part mapping except those straddling the two cuts.
        assert mapped > 0 and copied <= 2
    # Slices inside a part share its mapping; a straddling slice is a fresh buffer.
    a = view.starts[1]
    assert view[0:16].data_ptr() == view.maps[0].data_ptr()
    straddle = view[a - 4 : a + 4]
    assert bytes(straddle.tolist()) == checkpoint_file.read_bytes()[a - 4 : a + 4]


def test_part_set_bad_input_one_line(checkpoint_file, tmp_path):
    parts = split_file(checkpoint_file, tmp_path, "m.pt", odd_cuts(checkpoint_file, 3))
    # A part missing between others.
    parts[1].rename(tmp_path / "aside")
    with pytest.raises(UserError, match=r"m\.pt\.part1: missing \(found parts \[0, 2\]") as err:
        safe_load(parts[0])
    assert "\n" not in str(err.value)
    (tmp_path / "aside").rename(parts[1])
    # The last part missing (no gap to see): the zip directory is not where it says.
    last = parts[2].read_bytes()
    parts[2].unlink()
    with pytest.raises(UserError, match=r"m\.pt: its 2 parts .* do not form one torch checkpoint"):
        safe_load(parts[0])
    parts[2].write_bytes(last)
    # A part of the wrong size (one byte short, or one extra).
    middle = parts[1].read_bytes()
    for wrong in (middle[:-1], middle + b"\0"):
        parts[1].write_bytes(wrong)
        with pytest.raises(UserError, match=r"do not form one torch checkpoint") as err:
            safe_load(parts[0])
        assert "\n" not in str(err.value)
    parts[1].write_bytes(middle)
    assert_same_checkpoint(safe_load(parts[0]), safe_load(checkpoint_file))


def test_parts_measure_against_one_file(checkpoint_file, tmp_path):
    """The part view costs about what the single-file load costs (same mapping, no reads)."""
    import time

    parts = split_file(checkpoint_file, tmp_path, "m.pt", odd_cuts(checkpoint_file, 3))

    def best(fn):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    one = best(lambda: safe_load(checkpoint_file))
    many = best(lambda: safe_load(parts[0]))
    assert many < 10 * one + 0.05  # generous: a small file, a loaded machine


# ---------------------------------------------------------------------------------------------
# Hub ids


def test_parse_hub_ids():
    p = hub.parse_hub_id
    assert p("hf://arcinstitute/savanna_evo2_7b") == hub.HubId(
        "arcinstitute/savanna_evo2_7b", None, None
    )
    assert p("hf://org/repo@v1.0/sub/x.pt") == hub.HubId("org/repo", "v1.0", "sub/x.pt")
    assert p(Path("hf://org/repo/x.pt")) == hub.HubId(
        "org/repo", None, "x.pt"
    )  # Path() collapses //
    assert p("/local/file.pt") is None
    for bad in ("hf://org", "hf://org/repo@/x.pt", "hf:///repo"):
        with pytest.raises(UserError, match="ORG/REPO"):
            p(bad)


def test_single_file_repo_resolves_offline(hf_cache, checkpoint_file):
    data = checkpoint_file.read_bytes()
    snapshot = seed_repo(
        hf_cache,
        "arcinstitute/savanna_evo2_tiny",
        {"savanna_evo2_tiny.pt": data, "config.json": b"{}"},
    )
    resolved = hub.resolve("hf://arcinstitute/savanna_evo2_tiny")
    assert resolved.local == snapshot / "savanna_evo2_tiny.pt"
    assert resolved.commit == COMMIT
    assert resolved.pinned == f"hf://arcinstitute/savanna_evo2_tiny@{COMMIT}/savanna_evo2_tiny.pt"
    # The pinned id resolves to the same file; so does the explicit file name.
    assert hub.local_checkpoint_path(resolved.pinned) == resolved.local
    assert (
        hub.local_checkpoint_path("hf://arcinstitute/savanna_evo2_tiny/savanna_evo2_tiny.pt")
        == resolved.local
    )
    location = locate_checkpoint("hf://arcinstitute/savanna_evo2_tiny")
    assert location.model_files == [resolved.local]
    assert_same_checkpoint(safe_load(location.model_files[0]), safe_load(checkpoint_file))


def test_multi_part_repo_resolves_offline(hf_cache, checkpoint_file, tmp_path):
    files = parts_of(checkpoint_file, tmp_path, 3, "savanna_evo2_tiny.pt")
    snapshot = seed_repo(hf_cache, "arcinstitute/savanna_evo2_tiny", {**files, "README.md": b"x"})
    for given in (
        "hf://arcinstitute/savanna_evo2_tiny",
        "hf://arcinstitute/savanna_evo2_tiny/savanna_evo2_tiny.pt",
    ):
        resolved = hub.resolve(given)
        assert resolved.local == snapshot / "savanna_evo2_tiny.pt.part0"
        assert resolved.filename == "savanna_evo2_tiny.pt"
        assert resolved.files == tuple(sorted(files))
    location = locate_checkpoint(f"hf://arcinstitute/savanna_evo2_tiny@{COMMIT}")
    assert_same_checkpoint(safe_load(location.model_files[0]), safe_load(checkpoint_file))
    sources = hub.resolved_sources()
    assert sources[0]["commit"] == COMMIT and len(sources[0]["files"]) == 3


def test_revision_other_than_main(hf_cache, checkpoint_file):
    data = checkpoint_file.read_bytes()
    seed_repo(hf_cache, "org/m", {"m.pt": data}, commit=OLD_COMMIT, ref="v1")
    seed_repo(hf_cache, "org/m", {"m.pt": data})
    assert hub.resolve("hf://org/m@v1").commit == OLD_COMMIT
    assert hub.resolve(f"hf://org/m@{OLD_COMMIT}/m.pt").commit == OLD_COMMIT
    assert hub.resolve("hf://org/m").commit == COMMIT


def test_hub_bad_input_one_line(hf_cache, checkpoint_file, tmp_path):
    data = checkpoint_file.read_bytes()
    seed_repo(hf_cache, "org/single", {"single.pt": data})
    cases = {
        # id not in the offline cache: how to download it
        "hf://org/absent": r"org/absent is not in the Hugging Face cache .* HF_HUB_OFFLINE is set; "
        r"download it first: hf download org/absent --include '\*\.pt' --include '\*\.pt\.part\*'$",
        "hf://org/absent/f.pt": r"hf download org/absent --include 'f\.pt' --include 'f\.pt\.part\*'$",
        # a revision that does not exist (in the cache)
        "hf://org/single@nope": r"revision nope of org/single is not in the cache .*cached refs: main.*"
        r"hf download org/single --include .* --revision nope$",
        # a file the cached snapshot does not hold
        "hf://org/single/other.pt": r"other\.pt is not in the cached snapshot of org/single",
    }
    for given, pattern in cases.items():
        with pytest.raises(UserError, match=pattern) as err:
            hub.resolve(given)
        assert "\n" not in str(err.value)


def test_hub_part_missing_or_wrong_size(hf_cache, checkpoint_file, tmp_path):
    files = parts_of(checkpoint_file, tmp_path, 3, "big.pt")
    # The Hub lists three parts; the cache holds two (the last was never downloaded).
    snapshot = seed_repo(hf_cache, "org/big", {k: files[k] for k in sorted(files)[:2]})
    listing = json.loads((snapshot.parents[1] / "trees" / f"{COMMIT}.json").read_text())
    listing["files"]["big.pt.part2"] = {"size": len(files["big.pt.part2"]), "blob_id": "0" * 40}
    (snapshot.parents[1] / "trees" / f"{COMMIT}.json").write_text(json.dumps(listing))
    with pytest.raises(
        UserError, match=r"hf://org/big/big\.pt: .*hf download org/big --include 'big\.pt'"
    ):
        hub.resolve("hf://org/big/big.pt")
    with pytest.raises(UserError, match=r"incomplete|not in the cached snapshot"):
        hub.resolve("hf://org/big")
    # A part whose size differs from the Hub's record.
    sizes = {"w.pt.part1": len(files["big.pt.part1"]) + 5}
    renamed = {k.replace("big", "w"): v for k, v in files.items()}
    seed_repo(hf_cache, "org/w", renamed, recorded=sizes)
    with pytest.raises(
        UserError, match=r"w\.pt\.part1 is \d+ bytes, the Hub records \d+ for w\.pt\.part1"
    ):
        hub.resolve("hf://org/w")


def test_presets_know_their_repo(compose_cfg):
    from tests.conftest import to_obj

    for name in ("savanna_evo2_1b_base", "savanna_evo2_7b", "savanna_evo2_40b"):
        model = {"savanna_evo2_1b_base": "evo2_1b"}.get(name, "evo2_" + name.split("_")[-1])
        run = to_obj(compose_cfg([f"model={model}", f"ckpt={name}"]))
        assert run.ckpt.path == f"hf://arcinstitute/{name}"


def test_preset_path_finds_cached_weights(hf_cache, checkpoint_file, tmp_path):
    """`ckpt=savanna_evo2_40b` alone: its hf:// path finds the cached parts (here: tiny ones)."""
    files = parts_of(checkpoint_file, tmp_path, 3, "savanna_evo2_40b.pt")
    seed_repo(hf_cache, "arcinstitute/savanna_evo2_40b", files)
    location = locate_checkpoint("hf://arcinstitute/savanna_evo2_40b")
    assert location.model_files[0].name == "savanna_evo2_40b.pt.part0"


def test_convert_from_hub_pins_commit_in_manifest(tmp_path, checkpoint_file, run_entry):
    """convert.py source=hf://... offline: exit 0, the manifest names the commit; bad id: exit 2."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    seed_repo(cache, "org/tiny", parts_of(checkpoint_file, tmp_path, 2, "tiny.pt"))
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "export"
    proc = run_entry(
        "convert.py", "target=vortex", "source=hf://org/tiny", "model=evo2_tiny",
        f"output={out}", "verify=false", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hub"][0]["pinned"] == f"hf://org/tiny@{COMMIT}/tiny.pt"
    assert manifest["hub"][0]["files"] == ["tiny.pt.part0", "tiny.pt.part1"]
    bad = run_entry(
        "convert.py", "target=vortex", "source=hf://org/tiny@v9", "model=evo2_tiny",
        f"output={tmp_path / 'x'}", env=env,
    )  # fmt: skip
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert (
        lines[-1].startswith("error: hf://org/tiny@v9: revision v9") and "hf download" in lines[-1]
    )
    assert not (tmp_path / "x").exists()


def test_run_config_records_the_pinned_commit(hf_cache, checkpoint_file, compose_cfg):
    """The CLI pins hf:// ids before a task runs: the saved config names the commit."""
    from evo2_hydra.train.run import config_yaml
    from tests.conftest import to_obj

    seed_repo(hf_cache, "org/tiny", {"tiny.pt": checkpoint_file.read_bytes()})
    run = to_obj(compose_cfg(["model=evo2_tiny", "ckpt.path=hf://org/tiny"]))
    hub.pin_config_paths(run)
    assert run.ckpt.path == f"hf://org/tiny@{COMMIT}/tiny.pt"
    assert f"path: hf://org/tiny@{COMMIT}/tiny.pt" in config_yaml(run)
    assert locate_checkpoint(run.ckpt.path).model_files[0].name == "tiny.pt"
