"""task=score|embed|vep split across local processes (cluster.tasks=2) give the single-process
output, in input order; a re-run resumes: finished shards are not recomputed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evo2_hydra.distributed import SINGLE_MARKER
from evo2_hydra.errors import UserError
from evo2_hydra.infer.embed import run_embed
from evo2_hydra.infer.vep import run_vep
from evo2_hydra.score import run_score
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.conftest import REPO, to_obj
from tests.vtx_reference import model_config

CONTEXT = 256
TEXTS = ["ACGTTGCAAC", "GGGCCCATATAT" * 3, "acgtNNaccc", "TTTTTTTTTTTTTTTTTA", "GATTACA" * 5]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    path = make_random_savanna_checkpoint(root, model_config("evo2_tiny"), CONTEXT, seed=41)
    seqs = root / "seqs.jsonl"
    seqs.write_text(
        "".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS))
    )
    return path, seqs


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks share 2 cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def common(path, *extra):
    return ["cluster.device=cpu", f"ckpt.path={path}", f"ckpt.context={CONTEXT}", *extra]


def rows(folder, name="scores.jsonl"):
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def test_score_sharded_equals_single_and_resumes(compose_cfg, setup, tmp_path, monkeypatch):
    path, seqs = setup
    args = common(path, "task=score", f"score.input={seqs}", "score.log_probs=true")
    single = run_score(to_obj(compose_cfg([*args, f"score.output={tmp_path / 'one'}"])))
    out = tmp_path / "two"
    sharded = run_score(to_obj(compose_cfg([*args, f"score.output={out}", "cluster.tasks=2"])))
    assert [r["id"] for r in rows(sharded)] == [f"q{i}" for i in range(len(TEXTS))]
    for a, b in zip(rows(single), rows(sharded), strict=True):
        assert a["sum_log_likelihood"] == pytest.approx(b["sum_log_likelihood"], abs=1e-6)
        np.testing.assert_array_equal(
            np.load(single / a["log_probs"]), np.load(sharded / b["log_probs"])
        )
    assert not (tmp_path / ".two.shards").exists()

    # resume: rank 0 of an earlier run finished (its shard is marked so a recomputation shows)
    resumed = tmp_path / "resumed"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    # as torchrun would start it: not the variables an earlier in-process run exported itself
    monkeypatch.delenv(SINGLE_MARKER, raising=False)
    run_score(to_obj(compose_cfg([*args, f"score.output={resumed}", "cluster.tasks=2"])))
    assert not resumed.exists()  # shard 1 missing: nothing merged yet
    shard0 = tmp_path / ".resumed.shards" / "00000-of-00002" / "scores.jsonl"
    marked = [dict(r, marker="from the first run") for r in rows(shard0.parent)]
    shard0.write_text("".join(json.dumps(r) + "\n" for r in marked))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    final = run_score(to_obj(compose_cfg([*args, f"score.output={resumed}", "cluster.tasks=2"])))
    merged = rows(final)
    assert [r.get("marker") for r in merged] == ["from the first run"] * 2 + [None] * 3
    for a, b in zip(rows(single), merged, strict=True):
        assert a["sum_log_likelihood"] == pytest.approx(b["sum_log_likelihood"], abs=1e-6)
    with pytest.raises(UserError, match="already exists"):  # the merged output is never overwritten
        run_score(to_obj(compose_cfg([*args, f"score.output={resumed}"])))


def test_embed_and_vep_sharded_equal_single(compose_cfg, setup, tmp_path):
    path, seqs = setup
    args = common(path, "task=embed", f"embed.input={seqs}", "embed.layers=[blocks.3,norm]")
    one = run_embed(to_obj(compose_cfg([*args, f"embed.output={tmp_path / 'e1'}"])))
    two = run_embed(
        to_obj(compose_cfg([*args, f"embed.output={tmp_path / 'e2'}", "cluster.tasks=2"]))
    )
    for layer in ("blocks.3", "norm"):
        # batches differ between shards (padding shapes): float rounding only
        np.testing.assert_allclose(
            np.load(one / f"{layer}.npy"), np.load(two / f"{layer}.npy"), atol=1e-6
        )
    assert (one / "index.jsonl").read_text() == (two / "index.jsonl").read_text()

    example = REPO / "examples" / "vep"
    args = common(
        path,
        "task=vep",
        f"vep.reference={example / 'reference.fa'}",
        f"vep.variants={example / 'variants.vcf'}",
        "vep.window=128",
    )
    one = run_vep(to_obj(compose_cfg([*args, f"vep.output={tmp_path / 'v1'}"])))
    two = run_vep(to_obj(compose_cfg([*args, f"vep.output={tmp_path / 'v2'}", "cluster.tasks=3"])))
    assert (one / "vep.tsv").read_text() == (two / "vep.tsv").read_text()
    assert json.loads((two / "vep.json").read_text())["scored"] == 10


def test_sharded_needs_an_explicit_output(compose_cfg, setup):
    path, seqs = setup
    cfg = compose_cfg(
        common(path, "task=embed", f"embed.input={seqs}", "embed.layers=[norm]", "cluster.tasks=2")
    )
    with pytest.raises(UserError, match="several processes needs embed.output"):
        run_embed(to_obj(cfg))
