"""task=vep on the shipped example (examples/vep/): deltas equal direct window scoring with
task=score's scorer (SNVs, several ALTs at one site, insertion, deletion, clipped windows, reverse
complement), the shared-prefix path equals scoring from scratch, REF mismatches fail or are
skipped and counted, bad input is one line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pysam
import pytest

from evo2_hydra.errors import UserError
from evo2_hydra.infer.vep import score_from_scratch, score_shared
from evo2_hydra.model import build_model, load_into_model
from evo2_hydra.score import reverse_complement, score_batch
from tests.ckpt_factory import make_random_savanna_checkpoint, random_savanna_module
from tests.conftest import REPO, to_obj
from tests.vtx_reference import model_config

CONTEXT = 512
WINDOW = 200
EXAMPLE = REPO / "examples" / "vep"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vep")
    cfg = model_config("evo2_tiny")
    path = make_random_savanna_checkpoint(root, cfg, CONTEXT, layout="single", seed=31)
    module = random_savanna_module(cfg, CONTEXT, seed=31)
    model = load_into_model(build_model(cfg, CONTEXT), module, cfg, CONTEXT).eval()
    genome = {}
    name = None
    for line in (EXAMPLE / "reference.fa").read_text().splitlines():
        if line.startswith(">"):
            name = line[1:].split()[0]
            genome[name] = ""
        else:
            genome[name] += line
    return path, model, genome


def mean_ll(model, text):
    """task=score's number: summed log-likelihood over positions 1..L-1, divided by L-1."""
    return score_batch(model, [text], keep_logits=False).sums[0] / (len(text) - 1)


def expected_row(model, genome, chrom, pos, ref, alt, window=WINDOW):
    seq = genome[chrom]
    p = pos - 1
    start, end = max(0, p - window // 2), min(len(seq), p + window // 2)
    ref_win = seq[start:end]
    k = p - start
    assert ref_win[k : k + len(ref)] == ref
    alt_win = ref_win[:k] + alt + ref_win[k + len(ref) :]
    return ref_win, alt_win


def run(compose_cfg, path, out, *extra, variants=EXAMPLE / "variants.vcf"):
    from evo2_hydra.infer.vep import run_vep

    cfg = compose_cfg(
        [
            "task=vep",
            f"ckpt.path={path}",
            f"ckpt.context={CONTEXT}",
            f"vep.reference={EXAMPLE / 'reference.fa'}",
            f"vep.variants={variants}",
            f"vep.window={WINDOW}",
            f"vep.output={out}",
            *extra,
        ]
    )
    return run_vep(to_obj(cfg))


def read_tsv(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def test_deltas_equal_direct_window_scoring(compose_cfg, setup, tmp_path):
    path, model, genome = setup
    out = run(
        compose_cfg, path, tmp_path / "out", "vep.reverse_complement=true", "vep.chunk_tokens=64"
    )
    rows = read_tsv(out / "vep.tsv")
    table = read_tsv(EXAMPLE / "variants.tsv")
    assert [(r["chrom"], r["pos"], r["ref"], r["alt"]) for r in rows] == [
        (t["chrom"], t["pos"], t["ref"], t["alt"]) for t in table
    ]
    kinds = set()
    for row in rows:
        ref_win, alt_win = expected_row(
            model, genome, row["chrom"], int(row["pos"]), row["ref"], row["alt"]
        )
        kinds.add(
            (
                len(row["ref"]) > len(row["alt"]),
                len(row["ref"]) < len(row["alt"]),
                len(ref_win) < WINDOW,
            )
        )
        ref_s, alt_s = mean_ll(model, ref_win), mean_ll(model, alt_win)
        assert float(row["ref_score"]) == pytest.approx(ref_s, abs=1e-5)
        assert float(row["alt_score"]) == pytest.approx(alt_s, abs=1e-5)
        assert float(row["delta"]) == pytest.approx(alt_s - ref_s, abs=1e-5)
        rc_delta = mean_ll(model, reverse_complement(alt_win)) - mean_ll(
            model, reverse_complement(ref_win)
        )
        assert float(row["rc_delta"]) == pytest.approx(rc_delta, abs=1e-5)
        assert float(row["mean_delta"]) == pytest.approx((alt_s - ref_s + rc_delta) / 2, abs=1e-5)
    assert {
        (True, False, False),
        (False, True, False),
        (False, False, True),
    } <= kinds  # del, ins, clipped
    assert any(abs(float(r["delta"])) > 1e-3 for r in rows)
    summary = json.loads((out / "vep.json").read_text())
    assert summary["scored"] == len(rows) == 10 and summary["skipped_ref_mismatch"] == 0


def test_shared_prefix_equals_from_scratch(setup):
    _, model, genome = setup
    window = genome["chr1"][1000:1400]
    k = 200
    edits = [(k, window[k], b) for b in "ACGT" if b != window[k]]
    edits += [
        (k, window[k : k + 5], window[k]),
        (k, window[k], window[k] + "TTAG"),
        (37, window[37], "N"),
    ]
    for chunk in (0, 64, 150):
        ref, alts = score_shared(model, window, edits, chunk)
        direct = score_from_scratch(
            model, [window] + [window[:kk] + a + window[kk + len(r) :] for kk, r, a in edits], 0
        )
        assert ref == pytest.approx(direct[0], abs=1e-6)
        for got, want in zip(alts, direct[1:]):
            assert got == pytest.approx(want, abs=1e-5)


def test_tsv_input_and_from_scratch_mode_agree(compose_cfg, setup, tmp_path):
    path, *_ = setup
    shared = read_tsv(run(compose_cfg, path, tmp_path / "a") / "vep.tsv")
    naive = read_tsv(
        run(
            compose_cfg,
            path,
            tmp_path / "b",
            "vep.share_prefix=false",
            variants=EXAMPLE / "variants.tsv",
        )
        / "vep.tsv"
    )
    for a, b in zip(shared, naive, strict=True):
        assert float(a["delta"]) == pytest.approx(float(b["delta"]), abs=1e-5)


def write_variants(path: Path, rows: list[str]) -> Path:
    path.write_text("chrom\tpos\tref\talt\n" + "".join(r + "\n" for r in rows))
    return path


def test_ref_mismatch_fails_or_is_skipped(compose_cfg, setup, tmp_path):
    path, _, genome = setup
    wrong = {"A": "C", "C": "G", "G": "T", "T": "A"}[genome["chr1"][499]]
    variants = write_variants(
        tmp_path / "v.tsv", [f"chr1\t100\t{genome['chr1'][99]}\tA", f"chr1\t500\t{wrong}\tN"]
    )
    with pytest.raises(
        UserError, match=r"v.tsv:3: variant chr1:500 .*does not match the reference"
    ):
        run(compose_cfg, path, tmp_path / "fail", variants=variants)
    assert not (tmp_path / "fail").exists()
    out = run(compose_cfg, path, tmp_path / "skip", "vep.on_mismatch=skip", variants=variants)
    assert len(read_tsv(out / "vep.tsv")) == 1
    assert json.loads((out / "vep.json").read_text())["skipped_ref_mismatch"] == 1
    assert "does not match" in (out / "skipped.tsv").read_text()


@pytest.mark.parametrize(
    "rows,extra,message",
    [
        (["chrX\t10\tA\tC"], [], "chromosome 'chrX' of variant chrX:10 is not in the reference"),
        (["chr1\t10\tA\tC,G"], [], "one ALT per line"),
        (["chr1\t10\tA\t<DEL>"], [], "symbolic or missing ALT '<DEL>'"),
        (["chr1\t10\tA\tC"], ["vep.window=1024"], "vep.window=1024 exceeds the model's context"),
    ],
)
def test_bad_input_is_one_line(compose_cfg, setup, tmp_path, rows, extra, message):
    path, _, genome = setup
    rows = [r.replace("\tA\t", f"\t{genome['chr1'][9]}\t") for r in rows]
    variants = write_variants(tmp_path / "v.tsv", rows)
    with pytest.raises(UserError) as err:
        run(compose_cfg, path, tmp_path / "out", *extra, variants=variants)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_vcf_multiallelic_and_gz_inputs(compose_cfg, setup, tmp_path):
    """A multi-allelic VCF record is refused; bgzip FASTA/VCF work, indexed outside the user's folder."""
    path, *_ = setup
    vcf = (EXAMPLE / "variants.vcf").read_text()
    bad = tmp_path / "multi.vcf"
    lines = vcf.splitlines()
    fields = lines[-1].split("\t")
    fields[4] = fields[4] + ",T"
    bad.write_text("\n".join(lines[:-1] + ["\t".join(fields)]) + "\n")
    with pytest.raises(UserError, match="one ALT per record expected"):
        run(compose_cfg, path, tmp_path / "m", variants=bad)

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(EXAMPLE / "reference.fa", data / "ref.fa")
    pysam.tabix_compress(str(data / "ref.fa"), str(data / "ref.fa.gz"))
    pysam.tabix_compress(str(EXAMPLE / "variants.vcf"), str(data / "v.vcf.gz"))
    before = sorted(p.name for p in data.iterdir())
    from evo2_hydra.infer.vep import run_vep

    cfg = compose_cfg(
        [
            "task=vep",
            f"ckpt.path={path}",
            f"ckpt.context={CONTEXT}",
            f"vep.reference={data / 'ref.fa.gz'}",
            f"vep.variants={data / 'v.vcf.gz'}",
            f"vep.window={WINDOW}",
            f"vep.output={tmp_path / 'gz'}",
        ]
    )
    out = run_vep(to_obj(cfg))
    assert sorted(p.name for p in data.iterdir()) == before  # no .fai/.gzi written next to the data
    plain = read_tsv(run(compose_cfg, path, tmp_path / "plain") / "vep.tsv")
    assert read_tsv(out / "vep.tsv") == plain


def test_cli_exit_2(run_entry, setup, tmp_path):
    path, *_ = setup
    proc = run_entry(
        "launch.py",
        "task=vep",
        f"ckpt.path={path}",
        f"ckpt.context={CONTEXT}",
        f"vep.reference={EXAMPLE / 'reference.fa'}",
        f"vep.variants={EXAMPLE / 'variants.vcf'}",
        "vep.window=4096",
        f"vep.output={tmp_path / 'cli'}",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: vep.window=4096 exceeds")
    assert not (tmp_path / "cli").exists()
