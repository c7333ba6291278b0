"""FASTA input: the same bytes as JSONL, every compression form, windows, reverse complements,
conditioning from headers or a TSV, and bad input (one line naming file and record, nothing
written)."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from evo2_hydra.config import (
    Alphabet,
    Charset,
    ConditionConfig,
    ConfigError,
    DataConfig,
    OnError,
    Packing,
    ReverseComplement,
)
from evo2_hydra.data import preprocess as pre
from evo2_hydra.data.encode import reverse_complement, window_spans
from evo2_hydra.data.indexed import MMapIndexedDataset
from evo2_hydra.data.records import read_sequences
from evo2_hydra.data.text import TextPolicy
from evo2_hydra.errors import UserError

RECORDS = [
    ("chr1", "human chromosome 1", "ACGTACGTNNacgtacgtRYK" * 7),
    ("seq2", "", "GATTACA"),
    ("s3", "clade=B other words", "T"),
    ("s4", "clade=A", "ccccGGGGaaaaTTTT" * 9),
]


def fasta_text(records, width: int = 60, newline: str = "\n") -> str:
    lines = []
    for rid, desc, seq in records:
        lines.append(f">{rid} {desc}".rstrip())
        lines += [seq[i : i + width] for i in range(0, len(seq), width)]
    return newline.join(lines) + newline


def bgzf(data: bytes, block: int = 100) -> bytes:
    """BGZF (what bgzip writes): gzip members of at most 64 KiB with the 'BC' extra field
    holding the member size, then the empty EOF member."""
    out = []
    for start in range(0, len(data), block):
        chunk = data[start : start + block]
        comp = zlib.compressobj(6, zlib.DEFLATED, -15)
        deflated = comp.compress(chunk) + comp.flush()
        extra = b"BC" + struct.pack("<HH", 2, 12 + 6 + len(deflated) + 8 - 1)
        header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\0\xff" + struct.pack("<H", 6) + extra
        trailer = struct.pack("<II", zlib.crc32(chunk), len(chunk))
        out.append(header + deflated + trailer)
    out.append(bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000"))
    return b"".join(out)


def write_fasta(path: Path, records=RECORDS, form: str = "plain", **kw) -> Path:
    data = fasta_text(records, **kw).encode()
    if form == "gzip":
        data = gzip.compress(data)
    elif form == "bgzip":
        data = bgzf(data)
    path.write_bytes(data)
    return path


def write_jsonl(path: Path, records=RECORDS, **extra) -> Path:
    path.write_text(
        "".join(json.dumps({"id": r, "text": s, **extra.get(r, {})}) + "\n" for r, _, s in records)
    )
    return path


def run(data: DataConfig, inputs, prefix: Path, context: int = 256) -> pre.PreprocessSummary:
    return pre.preprocess_to_prefix(
        data, [str(p) for p in inputs], str(prefix), context, progress=False, plot=False
    )


def docs(prefix: Path) -> list[bytes]:
    ds = MMapIndexedDataset(prefix)
    return [bytes(ds.get(i).astype(np.uint8).tolist()) for i in range(len(ds))]


@pytest.mark.parametrize("packing", [Packing.padded, Packing.contiguous])
@pytest.mark.parametrize(
    "form, name, kw",
    [
        ("plain", "in.fa", {}),
        ("plain", "in.fasta", {"width": 7, "newline": "\r\n"}),  # wrapped short, CRLF
        ("gzip", "in.fna.gz", {}),
        ("bgzip", "in.fa.gz", {"width": 13}),
    ],
)
def test_fasta_and_jsonl_give_identical_bin_idx(tmp_path, packing, form, name, kw):
    fa = write_fasta(tmp_path / name, form=form, **kw)
    js = write_jsonl(tmp_path / "in.jsonl")
    data = DataConfig(packing=packing)
    a = run(data, [fa], tmp_path / "fa")
    b = run(data, [js], tmp_path / "js")
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"fa{ext}").read_bytes() == (tmp_path / f"js{ext}").read_bytes()
    assert a.sequences == b.sequences == len(RECORDS) == a.records
    assert docs(tmp_path / "fa")[1] == b"GATTACA\x00" + (
        b"\x01" * 248 if packing == "padded" else b""
    )


def test_many_records_over_many_chunks_match_jsonl(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    recs = [
        (f"r{i}", "", "".join(rng.choice(list("ACGTNacgt"), size=int(n))))
        for i, n in enumerate(rng.integers(1, 500, 300))
    ]
    monkeypatch.setattr(pre, "CHUNK_BYTES", 1000)  # many FASTA batches and JSONL chunks
    data = DataConfig(packing=Packing.contiguous)
    run(data, [write_fasta(tmp_path / "a.fa.gz", recs, form="gzip")], tmp_path / "fa")
    run(data, [write_jsonl(tmp_path / "a.jsonl", recs)], tmp_path / "js")
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"fa{ext}").read_bytes() == (tmp_path / f"js{ext}").read_bytes()


BAD_FASTA = [
    ("empty.fa", b">a\nACGT\n>b\n>c\nAC\n", r"empty\.fa: record 2 \('b'\): empty sequence"),
    ("noid.fa", b">a\nACGT\n> desc only\nAC\n", r"noid\.fa: record 2: a '>' with no id"),
    ("tab.fa", b">a\nAC\tGT\n", r"tab\.fa: record 1 \('a'\): character '\\t'"),
    ("nul.fa", b">a\nACGT\nAC\x00GT\n", r"nul\.fa:3: NUL byte"),
    ("notgz.fa.gz", b">a\nACGT\n", r"notgz\.fa\.gz: named \.gz but is not gzip"),
    ("lead.fa", b"ACGT\n>a\nAC\n", r"lead\.fa:1: expected a FASTA header starting with '>'"),
    ("reads.fa", b"@r1\nACGT\n+\nIIII\n", r"reads\.fa:1: .*found a FASTQ record"),
    ("blank.fa", b"\n\n", r"blank\.fa: no FASTA records"),
    ("badutf.fa", b">a\nAC\xffGT\n", r"badutf\.fa: record 1: not valid UTF-8"),
]


@pytest.mark.parametrize("name, content, message", BAD_FASTA, ids=[b[0] for b in BAD_FASTA])
def test_bad_fasta_is_one_line_naming_file_and_record(tmp_path, name, content, message):
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match=message) as err:
        run(DataConfig(), [src], out / "data")
    assert "\n" not in str(err.value)
    assert list(out.iterdir()) == []  # nothing written, not even temporaries


def test_truncated_and_corrupt_gzip_are_errors_not_short_files(tmp_path):
    whole = gzip.compress(fasta_text(RECORDS * 40).encode())
    (tmp_path / "cut.fa.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"cut\.fa\.gz: cannot read the gzip stream"):
        run(DataConfig(), [tmp_path / "cut.fa.gz"], tmp_path / "x")
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF
    (tmp_path / "flip.fa.gz").write_bytes(bytes(flipped))
    with pytest.raises(UserError, match=r"flip\.fa\.gz: cannot read the gzip stream"):
        run(DataConfig(), [tmp_path / "flip.fa.gz"], tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.fa.gz", "flip.fa.gz"]


def test_on_error_skip_skips_empty_records_and_counts_them(tmp_path):
    src = tmp_path / "x.fa"
    src.write_bytes(b">a\nACGT\n>b\n>c\nGG\n")
    summary = run(
        DataConfig(on_error=OnError.skip, packing=Packing.contiguous), [src], tmp_path / "o"
    )
    assert summary.skipped == 1 and summary.sequences == 2
    assert summary.skipped_examples[0].startswith(f"{src}: record 2 ('b')")


def test_cli_bad_fasta_exits_2_with_one_line(run_entry, tmp_path):
    src = tmp_path / "in.fa.gz"
    src.write_bytes(b">a\nACGT\n")  # not gzip
    proc = run_entry(
        "launch.py",
        "task=preprocess",
        "data=jsonl",
        f"data.input={src}",
        f"data.output_prefix={tmp_path / 'o'}",
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "in.fa.gz: named .gz but is not gzip-compressed" in errors[0]
    assert not list(tmp_path.glob("o_*"))  # no output, not even temporaries


# ------------------------------------------------------------------------------ windows


@pytest.mark.parametrize(
    "n, window, stride, keep, spans",
    [
        (10, 4, None, True, [(0, 4), (4, 8), (8, 10)]),
        (10, 4, None, False, [(0, 4), (4, 8)]),
        (10, 4, 3, True, [(0, 4), (3, 7), (6, 10)]),  # overlap 1, ends exactly: no tail
        (11, 4, 3, True, [(0, 4), (3, 7), (6, 10), (9, 11)]),
        (11, 4, 3, False, [(0, 4), (3, 7), (6, 10)]),
        (12, 4, 6, True, [(0, 4), (6, 10)]),  # stride > window: gaps, tail [12, 12) is empty
        (13, 4, 6, True, [(0, 4), (6, 10), (12, 13)]),
        (4, 4, 2, True, [(0, 4)]),  # not longer than the window: as it is
        (3, None, None, True, [(0, 3)]),
    ],
)
def test_window_spans(n, window, stride, keep, spans):
    assert window_spans(n, window, stride, keep) == spans


def test_long_records_become_windows_with_conditioning_and_eod(tmp_path):
    seq = "ACGTACGTAC"  # 10 bases
    src = write_fasta(tmp_path / "w.fa", [("a", "c=A", seq), ("b", "c=A", "GG")])
    data = DataConfig(
        packing=Packing.padded,
        window=0,  # fit the context: 8 - conditioning token - EOD = 6
        stride=4,
        condition=ConditionConfig(tokens={"A": "1"}, header_regex=r"c=(\w+)"),
    )
    summary = run(data, [src], tmp_path / "o", context=8)
    got = [d.rstrip(b"\x01") for d in docs(tmp_path / "o")]
    # windows [0, 6) and [4, 10): overlap 2; the second ends at the record's end, no tail
    assert got == [b"1ACGTAC\x00", b"1" + seq[4:10].encode() + b"\x00", b"1GG\x00"]
    assert summary.windowed == 1 and summary.records == 2 and summary.sequences == 3
    data.keep_partial_window = False
    data.stride = 6
    run(data, [src], tmp_path / "p", context=8)  # [0,6) then the tail [6,10) is dropped
    assert [d.rstrip(b"\x01") for d in docs(tmp_path / "p")] == [b"1ACGTAC\x00", b"1GG\x00"]


def test_windows_apply_to_jsonl_the_same_way(tmp_path):
    recs = [("a", "", "ACGTTGCAACGGT" * 5), ("b", "", "AC")]
    data = DataConfig(packing=Packing.contiguous, window=16, stride=10)
    run(data, [write_fasta(tmp_path / "a.fa", recs)], tmp_path / "fa")
    run(data, [write_jsonl(tmp_path / "a.jsonl", recs)], tmp_path / "js")
    assert docs(tmp_path / "fa") == docs(tmp_path / "js")
    text = recs[0][2].encode()
    want = [text[s:e] + b"\x00" for s, e in window_spans(len(text), 16, 10, True)] + [b"AC\x00"]
    assert docs(tmp_path / "fa") == want


# ------------------------------------------------------------------------------ reverse complement


def test_reverse_complement_both_and_random(tmp_path, monkeypatch):
    assert reverse_complement(b"AACGTNRYacgu") == b"acgtRYNACGTT"
    rng = np.random.default_rng(5)
    recs = [(f"r{i}", "", "".join(rng.choice(list("ACGTacgtN"), size=50))) for i in range(80)]
    src = write_fasta(tmp_path / "a.fa", recs)
    both = DataConfig(packing=Packing.contiguous, reverse_complement=ReverseComplement.both)
    run(both, [src], tmp_path / "both")
    got = docs(tmp_path / "both")
    assert len(got) == 160
    for i, (_, _, seq) in enumerate(recs):
        assert got[2 * i] == seq.encode() + b"\x00"
        assert got[2 * i + 1] == reverse_complement(seq.encode()) + b"\x00"

    rand = DataConfig(packing=Packing.contiguous, reverse_complement=ReverseComplement.random)
    run(rand, [src], tmp_path / "r1")
    monkeypatch.setattr(pre, "CHUNK_BYTES", 200)  # other chunking: the same choices
    run(rand, [write_jsonl(tmp_path / "a.jsonl", recs)], tmp_path / "r2")
    first = docs(tmp_path / "r1")
    assert first == docs(tmp_path / "r2")
    flipped = [d != s.encode() + b"\x00" for d, (_, _, s) in zip(first, recs)]
    assert 20 < sum(flipped) < 60  # about half
    rand.reverse_complement_seed = 99
    run(rand, [src], tmp_path / "r3")
    assert docs(tmp_path / "r3") != first  # the seed decides


# ------------------------------------------------------------------------------ conditioning


def test_conditioning_from_header_regex_and_tsv_match_jsonl_field(tmp_path):
    recs = [("x1", "clade=A", "ACGT"), ("x2", "clade=B", "GGTT"), ("x3", "clade=A", "CC")]
    tokens = {"A": "1", "B": "2"}
    js = tmp_path / "c.jsonl"
    js.write_text("".join(json.dumps({"text": s, "clade": d[-1]}) + "\n" for _, d, s in recs))
    run(DataConfig(condition=ConditionConfig(tokens=tokens, field="clade")), [js], tmp_path / "js")
    fa = write_fasta(tmp_path / "c.fa", recs)
    regex = ConditionConfig(tokens=tokens, header_regex=r"clade=(\w)")
    run(DataConfig(condition=regex), [fa], tmp_path / "rx")
    tsv = tmp_path / "c.tsv"
    tsv.write_text("# id\tclass\nx1\tA\nx2\tB\nx3\tA\n")
    run(DataConfig(condition=ConditionConfig(tokens=tokens, tsv=str(tsv))), [fa], tmp_path / "tsv")
    want = (tmp_path / "js.bin").read_bytes()
    assert (tmp_path / "rx.bin").read_bytes() == want == (tmp_path / "tsv.bin").read_bytes()
    assert json.loads(Path(f"{tmp_path / 'rx'}_conditions.json").read_text())["tokens"] == tokens


def test_conditioning_problems_name_the_record(tmp_path):
    fa = write_fasta(tmp_path / "c.fa", [("x1", "clade=A", "AC"), ("x2", "nothing", "GG")])
    cond = ConditionConfig(tokens={"A": "1"}, header_regex=r"clade=(\w)")
    with pytest.raises(UserError, match=r"c\.fa: record 2 \('x2'\): header 'x2 nothing' does not"):
        run(DataConfig(condition=cond), [fa], tmp_path / "o")
    tsv = tmp_path / "c.tsv"
    tsv.write_text("x1\tA\n")
    cond = ConditionConfig(tokens={"A": "1"}, tsv=str(tsv))
    with pytest.raises(UserError, match=r"record 2 \('x2'\): id not in data.condition.tsv"):
        run(DataConfig(condition=cond), [fa], tmp_path / "o")
    tsv.write_text("x1 A\n")
    with pytest.raises(UserError, match=r"c\.tsv:1: expected two tab-separated columns"):
        run(DataConfig(condition=cond), [fa], tmp_path / "o")
    with pytest.raises(UserError, match="is FASTA; data.condition.field names a JSONL field"):
        run(
            DataConfig(condition=ConditionConfig(tokens={"A": "1"}, field="c")),
            [fa],
            tmp_path / "o",
        )
    with pytest.raises(ConfigError, match="exactly one"):
        ConditionConfig(tokens={"A": "1"}, header_regex=r"(a)(b)")


# ------------------------------------------------------------------------------ the inference reader


def test_reader_gives_fasta_and_jsonl_records_alike(tmp_path):
    policy = TextPolicy()
    fa, _ = read_sequences(
        write_fasta(tmp_path / "r.fa.gz", form="bgzip"), key="score.input", policy=policy
    )
    js, _ = read_sequences(write_jsonl(tmp_path / "r.jsonl"), key="score.input", policy=policy)
    assert [(r.index, r.id, r.text) for r in fa] == [(r.index, r.id, r.text) for r in js]
    assert fa[0].text == RECORDS[0][2].upper()  # model input: upper-cased as the run trained
    assert fa[0].where.endswith("r.fa.gz: record 1 ('chr1')")


def test_reader_policy_skip_keeps_numbering(tmp_path):
    src = write_fasta(tmp_path / "r.fa", [("a", "", "ACGT"), ("b", "", "ACXT"), ("c", "", "GG")])
    policy = TextPolicy(alphabet=Alphabet.skip, charset=Charset.iupac)
    records, skipped = read_sequences(src, key="embed.input", policy=policy)
    assert [(r.index, r.id) for r in records] == [(0, "a"), (2, "c")]
    assert len(skipped) == 1 and "record 2 ('b')" in skipped[0] and "'X'" in skipped[0]
    with pytest.raises(UserError, match=r"record 2 \('b'\): character 'X'"):
        read_sequences(src, key="embed.input", policy=TextPolicy(charset=Charset.iupac))


def test_reader_reads_gzip_jsonl_and_names_bad_bytes(tmp_path):
    policy = TextPolicy()
    packed = tmp_path / "r.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"id": "a", "text": "acgt"}\n'))
    records, _ = read_sequences(packed, key="score.input", policy=policy)
    assert [(r.id, r.text) for r in records] == [("a", "ACGT")]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ACGT"}\n{"text": "AC\xffGT"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        read_sequences(bad, key="score.input", policy=policy)
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_bytes(b'{"text": "ACGT"}\n')
    with pytest.raises(UserError, match=r"fake\.jsonl\.gz: named \.gz but is not gzip"):
        read_sequences(fake, key="score.input", policy=policy)


def test_prepare_data_takes_fasta_for_train_and_valid(tmp_path):
    from evo2_hydra.data.prepare import prepare_data

    train = write_fasta(tmp_path / "train.fa.gz", form="gzip")
    valid = write_fasta(tmp_path / "valid.fna", RECORDS[:2])
    data = DataConfig(input=str(train), valid_input=str(valid), cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(data, 256, data.cache_dir)
    assert len(MMapIndexedDataset(prepared.train[0].prefix)) == len(RECORDS)
    assert len(MMapIndexedDataset(prepared.valid[0].prefix)) == 2
    again = prepare_data(data, 256, data.cache_dir)  # cached: the same folder
    assert again.train[0].prefix == prepared.train[0].prefix
