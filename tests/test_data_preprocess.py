"""JSONL -> BIN/IDX: byte identity with an independent writer of the spec's format, inputs,
conditioning, and every kind of bad input (one error naming file and line, nothing left behind)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from evo2_hydra.config import Alphabet, ConditionConfig, ConfigError, DataConfig, OnError, Packing
from evo2_hydra.data import preprocess as pre
from evo2_hydra.data.indexed import MMapIndexedDataset
from evo2_hydra.errors import UserError

TEXTS = ["ACGTacgtNN", "GATTACA", "T", "ccccGGGGaaaaTTTT" * 3, "AC\u00e9GT"]  # é: two UTF-8 bytes
KEEP = Alphabet.keep  # é is outside the default charset: these tests keep it (text policy)


def reference_files(texts: list[str], append_eod: bool, sample_length: int | None):
    """savanna's preprocess_data.py semantics and MMapIndexedDataset bytes, written plainly."""
    docs = []
    for text in texts:
        ids = list(text.encode("utf-8"))
        if append_eod:
            ids.append(0)
        if sample_length is not None:
            ids += [1] * (sample_length - len(ids))
        docs.append(ids)
    data = b"".join(struct.pack(f"<{len(d)}H", *d) for d in docs)
    n = len(docs)
    sizes = [len(d) for d in docs]
    pointers, offset = [], 0
    for size in sizes:
        pointers.append(offset)
        offset += 2 * size  # uint16
    index = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", 8)  # dtype code 8 = uint16
        + struct.pack("<Q", n)
        + struct.pack("<Q", n + 1)
        + struct.pack(f"<{n}i", *sizes)
        + struct.pack(f"<{n}q", *pointers)
        + struct.pack(f"<{n + 1}q", *range(n + 1))
    )
    return data, index


def write_jsonl(path: Path, records: list, gz: bool = False) -> Path:
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return path


def run(data: DataConfig, inputs, prefix: Path, context: int = 64) -> pre.PreprocessSummary:
    return pre.preprocess_to_prefix(
        data, [str(p) for p in inputs], str(prefix), context, progress=False, plot=False
    )


@pytest.mark.parametrize("packing", [Packing.padded, Packing.contiguous])
@pytest.mark.parametrize("append_eod", [True, False])
def test_bytes_identical_to_independent_writer(tmp_path, packing, append_eod):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "other": 1} for t in TEXTS])
    data = DataConfig(packing=packing, append_eod=append_eod, alphabet=KEEP)
    summary = run(data, [src], tmp_path / "out", context=64)
    want_bin, want_idx = reference_files(
        TEXTS, append_eod, 64 if packing == Packing.padded else None
    )
    assert (tmp_path / "out.bin").read_bytes() == want_bin
    assert (tmp_path / "out.idx").read_bytes() == want_idx
    real = sum(len(t.encode()) + append_eod for t in TEXTS)
    assert summary.sequences == len(TEXTS) and summary.tokens == real
    assert summary.padded_tokens == (64 * len(TEXTS) - real if packing == Packing.padded else 0)


def test_reader_memory_maps_what_was_written(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    run(DataConfig(packing=Packing.contiguous, alphabet=KEEP), [src], tmp_path / "out")
    ds = MMapIndexedDataset(tmp_path / "out")
    assert len(ds) == len(TEXTS) and ds.num_documents == len(TEXTS)
    assert isinstance(ds.tokens, np.memmap)
    item = ds.get(1)
    assert np.shares_memory(item, ds.tokens)  # a view, not a copy
    assert bytes(item.tolist()) == b"GATTACA\x00"
    assert bytes(ds.get(3, offset=2, length=3).tolist()) == b"ccG"


def test_several_inputs_and_gzip(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS[:2]])
    b = write_jsonl(tmp_path / "b.jsonl.gz", [{"text": t} for t in TEXTS[2:]], gz=True)
    summary = run(DataConfig(packing=Packing.contiguous, alphabet=KEEP), [a, b], tmp_path / "out")
    want_bin, want_idx = reference_files(TEXTS, True, None)
    assert (tmp_path / "out.bin").read_bytes() == want_bin
    assert (tmp_path / "out.idx").read_bytes() == want_idx
    assert summary.sequences == len(TEXTS)


def test_worker_processes_give_the_same_bytes(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("ACGTacgt"), size=int(n))) for n in rng.integers(1, 300, 400)]
    srcs = [
        write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:250]]),
        write_jsonl(tmp_path / "b.jsonl.gz", [{"text": t} for t in texts[250:]], gz=True),
    ]
    monkeypatch.setattr(pre, "CHUNK_BYTES", 4096)  # many chunks, several in flight
    for packing in (Packing.contiguous, Packing.padded):
        data = DataConfig(packing=packing, workers=2)
        run(data, srcs, tmp_path / "par", context=320)
        want_bin, want_idx = reference_files(
            texts, True, 320 if packing == Packing.padded else None
        )
        assert (tmp_path / "par.bin").read_bytes() == want_bin
        assert (tmp_path / "par.idx").read_bytes() == want_idx


def test_worker_processes_report_the_exact_line(tmp_path, monkeypatch):
    records = [{"text": "ACGT" * 20}] * 300
    records[211] = {"text": 5}
    src = write_jsonl(tmp_path / "in.jsonl", records)
    monkeypatch.setattr(pre, "CHUNK_BYTES", 2048)  # the bad line sits in a later chunk
    with pytest.raises(UserError, match=r"in\.jsonl:212: 'text' is a int"):
        run(DataConfig(packing=Packing.contiguous, workers=2), [src], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("packing", [Packing.padded, Packing.contiguous])
@pytest.mark.parametrize("append_eod", [True, False])
@pytest.mark.parametrize("conditioned", [True, False])
def test_whole_chunk_fast_path_equals_line_by_line(packing, append_eod, conditioned):
    from evo2_hydra.data import jsonl

    rng = np.random.default_rng(1)
    records = [
        {"clade": "AB"[i % 2], "text": "".join(rng.choice(list("ACGTacgtN"), size=int(n)))}
        for i, n in enumerate(rng.integers(1, 60, 50))
    ]
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    settings = jsonl.EncodeSettings(
        append_eod=append_eod,
        max_length=64 if packing == Packing.padded else None,
        condition_field="clade" if conditioned else None,
        condition_tokens={"A": "1", "B": "2"},
    )
    chunk = jsonl.Chunk("x.jsonl", data, len(data))
    fast = jsonl._encode_whole_chunk(chunk, settings)
    assert fast is not None  # plain ASCII documents take the fast path
    slow = jsonl.encode_chunk(jsonl.Chunk("x.jsonl", data + b"\n", len(data)), settings)
    assert slow.tokens == fast.tokens and slow.lengths.tolist() == fast.lengths.tolist()
    assert fast.lines == 50 and slow.lines == 51  # the blank line forced the slow path
    for odd in (b'{"text": "ACG\\u00e9"}\n', b'{"text": "A"}\n\n', b'{"text": ""}\n'):
        assert jsonl._encode_whole_chunk(jsonl.Chunk("x", data + odd, 0), settings) is None


def test_condition_field_prepends_token_and_saves_mapping(tmp_path):
    records = [
        {"text": "ACGT", "clade": "A"},
        {"text": "TTTT", "clade": "B"},
        {"text": "1GGG", "clade": "A"},  # an already-leading token is data like any other
    ]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    data = DataConfig(
        packing=Packing.padded,
        condition=ConditionConfig(tokens={"A": "1", "B": "2"}, field="clade"),
    )
    run(data, [src], tmp_path / "out", context=8)
    want_bin, _ = reference_files(["1ACGT", "2TTTT", "11GGG"], True, 8)
    assert (tmp_path / "out.bin").read_bytes() == want_bin
    saved = json.loads((tmp_path / "out_conditions.json").read_text())
    assert saved == {"field": "clade", "tokens": {"A": "1", "B": "2"}}
    assert pre.load_conditions(str(tmp_path / "out")) == {"A": "1", "B": "2"}


def test_sequences_with_leading_tokens_are_kept_as_they_are(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "1ACGT"}, {"text": "3GG"}])
    run(DataConfig(packing=Packing.contiguous), [src], tmp_path / "out")
    assert (tmp_path / "out.bin").read_bytes() == reference_files(["1ACGT", "3GG"], True, None)[0]


def test_truncate_cuts_long_documents_in_padded_mode(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "A" * 20}, {"text": "CC"}])
    summary = run(DataConfig(packing=Packing.padded, truncate=True), [src], tmp_path / "out", 8)
    assert (tmp_path / "out.bin").read_bytes() == reference_files(["A" * 7, "CC"], True, 8)[0]
    assert summary.truncated == 1


GOOD = {"text": "ACGT", "clade": "A"}
CONDITIONED = ConditionConfig(tokens={"A": "1", "B": "2"}, field="clade")
BAD_CASES = {
    "malformed": ('{"text": "ACG"', {}, "malformed JSON"),
    "not_object": ('["ACGT"]', {}, "expected a JSON object"),
    "missing_key": ({"seq": "ACGT"}, {}, "no 'text' key"),
    "not_string": ({"text": 123}, {}, "'text' is a int, expected a string"),
    "null_text": ({"text": None}, {}, "'text' is a null"),
    "empty": ({"text": ""}, {}, "empty sequence"),
    "too_long": ({"text": "A" * 40}, {}, "longer than ckpt.context=16"),
    "unknown_class": ({"text": "AC", "clade": "C"}, {"condition": CONDITIONED}, "clade='C'"),
    "no_class": ({"text": "AC"}, {"condition": CONDITIONED}, "no 'clade' key"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_line_names_file_and_line_and_leaves_nothing(tmp_path, case):
    bad, overrides, problem = BAD_CASES[case]
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD, GOOD, bad, GOOD])
    data = DataConfig(packing=Packing.padded, **overrides)
    with pytest.raises(UserError) as err:
        pre.preprocess_to_prefix(data, [str(src)], str(tmp_path / "out"), 16, progress=False)
    message = str(err.value)
    assert f"{src}:3:" in message and problem in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no .bin/.idx/.tmp-*


def test_multibyte_condition_token_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="one byte"):
        DataConfig(condition=ConditionConfig(tokens={"A": "12"}, field="clade"))
    data = DataConfig(condition=ConditionConfig(tokens={"A": "1"}, field="clade"))
    data.condition.tokens["B"] = "\u00e9"  # bypassing the config check: caught per line
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD, {"text": "AC", "clade": "B"}])
    with pytest.raises(UserError, match=r"in\.jsonl:2: clade='B' maps to 'é', which is 2 bytes"):
        run(data, [src], tmp_path / "out")
    assert not list(tmp_path.glob("out*"))


def test_on_error_skip_counts_and_reports(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ["{oops", {"text": "ACGT"}, {"text": ""}, {"x": 1}])
    data = DataConfig(packing=Packing.contiguous, on_error=OnError.skip)
    summary = run(data, [src], tmp_path / "out")
    assert summary.sequences == 1 and summary.skipped == 3
    assert [e.split(": ")[0] for e in summary.skipped_examples] == [
        f"{src}:1",
        f"{src}:3",
        f"{src}:4",
    ]
    assert "skipped 3 bad records" in summary.report()
    assert (tmp_path / "out.bin").read_bytes() == reference_files(["ACGT"], True, None)[0]


def test_blank_lines_are_ignored_and_line_numbers_stay_right(tmp_path, monkeypatch):
    monkeypatch.setattr(pre, "CHUNK_BYTES", 16)  # line numbers must survive chunk boundaries
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "AC"}, "", "  ", {"text": "GT"}, "{bad"])
    with pytest.raises(UserError, match=r"in\.jsonl:5: malformed JSON"):
        run(DataConfig(packing=Packing.contiguous), [src], tmp_path / "out")


def test_cli_preprocess_writes_bin_idx_png_and_conditions(tmp_path, run_entry):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "ACGT", "clade": "A"}, GOOD, "{bad"])
    prefix = tmp_path / "out" / "ex"
    args = [
        "task=preprocess",
        f"data.input={src}",
        f"data.output_prefix={prefix}",
        "data.packing=padded",
        "ckpt.context=64",
    ]
    bad = run_entry("launch.py", *args)
    assert bad.returncode == 2 and f"{src}:3: malformed JSON" in bad.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("ex_*"))
    ok = run_entry("launch.py", *args, "data.on_error=skip")
    assert ok.returncode == 0, ok.stderr
    stem = f"{prefix}_text_CharLevelTokenizer_document"
    assert Path(f"{stem}.bin").read_bytes() == reference_files(["1ACGT", "1ACGT"], True, 64)[0]
    assert Path(f"{stem}_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(f"{stem}_conditions.json").read_text())["tokens"] == {"A": "1", "B": "2"}
    assert (
        "2 sequences" in ok.stderr + ok.stdout and "skipped 1 bad records" in ok.stderr + ok.stdout
    )
