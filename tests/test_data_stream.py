"""Datasets, index, blending, splits, caching and the sharded, resumable batch stream."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from evo2_hydra.config import DataConfig, Packing, ToUpper
from evo2_hydra.data import prepare as prep
from evo2_hydra.data.blending import BlendSchedule
from evo2_hydra.data.datasets import build_epoch_index
from evo2_hydra.data.indexed import MMapIndexedDataset
from evo2_hydra.data.prepare import DatasetSpec, PreparedData, prepare_data, split_documents
from evo2_hydra.data.stream import SampleSource, build_eval_batches, build_train_stream
from evo2_hydra.errors import UserError


def make_jsonl(path: Path, n: int, seed: int = 0, lo: int = 5, hi: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = [
        f"{i:03d}" + "".join(rng.choice(list("ACGT"), size=int(rng.integers(lo, hi))))
        for i in range(n)
    ]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


@pytest.fixture
def corpus(tmp_path):
    texts = make_jsonl(tmp_path / "train.jsonl", 30)
    return tmp_path, texts


CONTEXT = {Packing.padded: 48, Packing.contiguous: 16}


def config(tmp_path, packing=Packing.padded, **kw) -> DataConfig:
    kw.setdefault("input", str(tmp_path / "train.jsonl"))
    return DataConfig(packing=packing, cache_dir=str(tmp_path / "cache"), **kw)


def batches(stream, n):
    return [next(stream) for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_split_boundaries_follow_savanna_rounding():
    assert split_documents(100, "969,30,1") == [(0, 97), (97, 100), (100, 100)]
    assert split_documents(7, "1,1,1") == [(0, 3), (3, 5), (5, 7)]  # overshoot -1 moved right
    assert split_documents(10, "8/2") == [(0, 8), (8, 10), (10, 10)]
    with pytest.raises(UserError, match="data.split"):
        split_documents(10, "a,b")


def test_blending_is_savannas_greedy():
    sched = BlendSchedule([7, 3])
    which, local = sched.lookup(np.arange(10))
    # s=0: .7 vs .3 -> 0; s=1: -.3 vs .3 -> 1; s=2: .4 vs -.4 -> 0; s=3: .1 vs -.1 -> 0; ...
    assert which.tolist() == [0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    assert local.tolist() == [0, 0, 1, 2, 1, 3, 4, 2, 5, 6]
    late = BlendSchedule([7, 3]).lookup(np.array([200_000]))  # jump ahead: same answer
    assert [int(v[0]) for v in late] == [int(v[0]) for v in sched.lookup(np.array([200_000]))]


def savanna_sample_idx(sizes, doc_idx, seq_length, num_samples):
    """savanna/Megatron build_sample_idx, transcribed as a plain loop."""
    out = [(0, 0)]
    index, offset = 0, 0
    while len(out) <= num_samples:
        remaining = seq_length + 1
        while remaining != 0:
            length = sizes[doc_idx[index]] - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                index += 1
                offset = 0
        out.append((index, offset))
    return np.array(out)


def test_contiguous_index_matches_savannas_loop_and_rng():
    sizes = np.random.default_rng(1).integers(1, 20, size=50)
    documents = np.arange(3, 47)
    doc_idx, sample_idx, shuffle_idx = build_epoch_index(sizes, documents, 8, seed=1234)
    rng = np.random.RandomState(1234)  # savanna: doc shuffle, then sample shuffle, one RNG
    want_doc = documents.astype(np.int32).copy()
    rng.shuffle(want_doc)
    assert doc_idx.tolist() == want_doc.tolist()
    n = (int(sizes[documents].sum()) - 1) // 8
    assert sample_idx.tolist() == savanna_sample_idx(sizes, doc_idx, 8, n).tolist()
    want_shuffle = np.arange(n, dtype=np.uint32)
    rng.shuffle(want_shuffle)
    assert shuffle_idx.tolist() == want_shuffle.tolist()


def test_contiguous_windows_are_overlapping_slices_of_the_shuffled_concatenation(corpus):
    tmp, texts = corpus
    data = config(tmp, Packing.contiguous, split="1,0,0")
    prepared = prepare_data(data, 16, data.cache_dir)
    source = SampleSource(data, prepared.train, 16, 1234, "train", prepared.index_dir)
    ds = source.datasets[0]
    doc_idx, _, shuffle_idx = ds._index(0)
    stream = np.concatenate([np.frombuffer(texts[d].encode() + b"\0", np.uint8) for d in doc_idx])
    for i in range(5):
        k = int(shuffle_idx[i])
        assert ds.sample(i).tolist() == stream[k * 16 : k * 16 + 17].tolist()
    index_files = list(Path(prepared.train[0].prefix).parent.glob("*_indexmap_*_idx.npy"))
    assert len(index_files) == 3  # cached next to the data, savanna's names


def test_padded_samples_are_whole_documents_each_once_per_epoch(corpus):
    tmp, texts = corpus
    data = config(tmp, split="1,0,0")
    prepared = prepare_data(data, 48, data.cache_dir)
    source = SampleSource(data, prepared.train, 48, 7, "train", prepared.index_dir)
    windows = source.windows(np.arange(30))
    seen = sorted(bytes(w[w != 1].tolist()) for w in windows)
    assert seen == sorted(t.encode() + b"\0" for t in texts)
    assert (windows[:, -1] == 1).all()  # the final label is PAD, never another document


def test_padded_batches_never_predict_another_document(corpus):
    tmp, _ = corpus
    data = config(tmp, split="1,0,0", to_upper=ToUpper.none)
    prepared = prepare_data(data, 48, data.cache_dir)
    batch = next(build_train_stream(data, prepared, 48, 8, 0, 1, 3))
    labels, mask = batch["labels"], batch["loss_mask"]
    assert torch.all(mask[labels == 1] == 0)  # PAD labels are masked
    eod_positions = (labels == 0).nonzero()
    assert len(eod_positions) == 8 and torch.all(mask[labels == 0] == 1)  # EOD is learned
    for row, col in eod_positions.tolist():  # after the EOD label: nothing is trained
        assert mask[row, col + 1 :].sum() == 0


def test_stream_is_deterministic_and_depends_on_seed(corpus):
    tmp, _ = corpus
    for packing in (Packing.padded, Packing.contiguous):
        data = config(tmp, packing)
        ctx = CONTEXT[packing]
        prepared = prepare_data(data, ctx, data.cache_dir)
        a = batches(build_train_stream(data, prepared, ctx, 2, 0, 1, seed=5), 4)
        b = batches(build_train_stream(data, prepared, ctx, 2, 0, 1, seed=5), 4)
        c = batches(build_train_stream(data, prepared, ctx, 2, 0, 1, seed=6), 4)
        assert same(a, b) and not same(a, c)


@pytest.mark.parametrize("packing", [Packing.padded, Packing.contiguous])
def test_resume_and_rank_sharding(corpus, packing):
    tmp, _ = corpus
    data = config(tmp, packing)
    ctx = CONTEXT[packing]
    prepared = prepare_data(data, ctx, data.cache_dir)
    full = batches(build_train_stream(data, prepared, ctx, 4, 0, 1, seed=9), 30)  # > 1 epoch
    resumed = batches(build_train_stream(data, prepared, ctx, 4, 0, 1, seed=9, start_step=25), 5)
    assert same(full[25:], resumed)
    # Two ranks with micro-batch 2 together see exactly what one rank with micro-batch 4 sees.
    r0 = batches(build_train_stream(data, prepared, ctx, 2, 0, 2, seed=9, start_step=3), 2)
    r1 = batches(build_train_stream(data, prepared, ctx, 2, 1, 2, seed=9, start_step=3), 2)
    for step, (x, y) in enumerate(zip(r0, r1)):
        both = torch.cat([x["input_ids"], y["input_ids"]])
        assert torch.equal(both, full[3 + step]["input_ids"])
        assert not torch.equal(x["input_ids"], y["input_ids"])


def test_split_and_eval_batches(corpus):
    tmp, _ = corpus
    data = config(tmp, split="8,2,0")
    prepared = prepare_data(data, 48, data.cache_dir)
    assert [s.documents for s in prepared.train] == [(0, 24)]
    assert [s.documents for s in prepared.valid] == [(24, 30)] and prepared.test == []
    evals = build_eval_batches(data, prepared, 48, 2, 0, 1, seed=1)
    assert len(evals) == 3  # one pass over 6 validation documents
    again = build_eval_batches(data, prepared, 48, 2, 0, 1, seed=1)
    assert same(evals, again)
    firsts = sorted(int(b["input_ids"][i, 2]) - 48 for b in evals for i in range(2))
    assert firsts == [4, 5, 6, 7, 8, 9]  # documents 024..029 ("0" "2" "4".."9" at column 2)
    assert build_eval_batches(data, prepared, 48, 2, 0, 1, seed=1, split="test") == []
    # contiguous: 6 short validation documents hold fewer tokens than one 400-token window
    data = config(tmp, Packing.contiguous, split="8,2,0")
    prepared = prepare_data(data, 400, data.cache_dir)
    assert build_eval_batches(data, prepared, 400, 2, 0, 1, seed=1) == []


def test_blended_inputs_with_weights(tmp_path):
    make_jsonl(tmp_path / "a.jsonl", 20, seed=1)
    make_jsonl(tmp_path / "b.jsonl", 20, seed=2)
    data = config(
        tmp_path,
        input=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
        weights=[3.0, 1.0],
        split="1,0,0",
    )
    prepared = prepare_data(data, 48, data.cache_dir)
    assert [s.weight for s in prepared.train] == [3.0, 1.0]
    source = SampleSource(data, prepared.train, 48, 1, "train", prepared.index_dir)
    which, _ = source.blend.lookup(np.arange(400))
    assert np.bincount(which).tolist() == [300, 100]
    with pytest.raises(UserError, match="data.weights has 1 entries for 2"):
        prepare_data(config(tmp_path, input=data.input, weights=[1.0]), 48, str(tmp_path / "cache"))


def test_prepared_bin_idx_prefixes_and_conditions_are_accepted(tmp_path, corpus):
    tmp, _ = corpus
    data = config(tmp, Packing.contiguous)
    first = prepare_data(data, 16, data.cache_dir)
    prefix = first.train[0].prefix
    again = prepare_data(config(tmp, Packing.contiguous, input=prefix + ".bin"), 16, data.cache_dir)
    assert again.train[0].prefix == prefix
    with pytest.raises(UserError, match="neither JSONL"):
        prepare_data(config(tmp, input=str(tmp / "nothing")), 16, data.cache_dir)


def test_cache_is_reused_and_keyed_by_content_and_settings(corpus, monkeypatch):
    tmp, _ = corpus
    data = config(tmp)
    first = prepare_data(data, 48, data.cache_dir)
    calls = []
    real = prep.preprocess_to_prefix
    monkeypatch.setattr(
        prep, "preprocess_to_prefix", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    assert prepare_data(data, 48, data.cache_dir).train[0].prefix == first.train[0].prefix
    assert calls == []  # reused
    other = prepare_data(data, 64, data.cache_dir)  # padded: the context changes the bytes
    assert other.train[0].prefix != first.train[0].prefix and calls == [1]
    make_jsonl(tmp / "train.jsonl", 30, seed=99)  # new content, same name
    assert prepare_data(data, 48, data.cache_dir).train[0].prefix != first.train[0].prefix


def _prepare_in_child(args):
    tmp, cache = args
    data = DataConfig(input=str(Path(tmp) / "train.jsonl"), cache_dir=cache, packing=Packing.padded)
    return prepare_data(data, 48, cache).train[0].prefix


def test_concurrent_callers_share_one_cache_entry(corpus):
    tmp, _ = corpus
    cache = str(tmp / "cache")
    with multiprocessing.get_context("fork").Pool(3) as pool:
        prefixes = pool.map(_prepare_in_child, [(str(tmp), cache)] * 3)
    assert len(set(prefixes)) == 1
    entries = list((tmp / "cache" / "jsonl").iterdir())
    assert [p.name.startswith("train-") for p in entries if not p.name.startswith(".")] == [True]
    assert not [p for p in entries if p.name.startswith(".tmp-")]
    assert len(MMapIndexedDataset(prefixes[0])) == 30


def test_prepared_data_carries_the_condition_mapping(tmp_path):
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "ACGT", "clade": "A"}) + "\n" + json.dumps({"text": "GG", "clade": "B"})
    )
    data = config(tmp_path, input=str(tmp_path / "c.jsonl"), split="1,0,0")
    data.condition.field = "clade"
    data.condition.tokens = {"A": "1", "B": "2"}
    prepared = prepare_data(data, 16, data.cache_dir)
    assert prepared.condition_tokens == {"A": "1", "B": "2"}
    assert isinstance(prepared, PreparedData) and isinstance(prepared.train[0], DatasetSpec)
    ds = MMapIndexedDataset(prepared.train[0].prefix)
    assert bytes(ds.get(0)[:5].tolist()) == b"1ACGT"
    # the saved mapping is found again from the BIN/IDX prefix alone
    plain = config(tmp_path, input=prepared.train[0].prefix, split="1,0,0")
    assert prepare_data(plain, 16, data.cache_dir).condition_tokens == {"A": "1", "B": "2"}


def test_savanna_written_files_train_here(tmp_path):
    """BIN/IDX bytes as savanna writes them (the independent writer of the preprocess tests)."""
    from tests.test_data_preprocess import reference_files

    texts = ["1ACGTA", "2GGCC", "1TTTTTT"]
    data_bytes, index_bytes = reference_files(texts, True, 16)
    (tmp_path / "sv.bin").write_bytes(data_bytes)
    (tmp_path / "sv.idx").write_bytes(index_bytes)
    data = config(tmp_path, input=str(tmp_path / "sv"), split="1,0,0", to_upper=ToUpper.none)
    prepared = prepare_data(data, 16, data.cache_dir)
    batch = next(build_train_stream(data, prepared, 16, 3, 0, 1, seed=0))
    rows = sorted(bytes(r[r != 1].tolist()) for r in batch["input_ids"])
    assert rows == sorted(t.encode() + b"\0" for t in texts)
