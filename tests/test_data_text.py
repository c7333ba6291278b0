"""The text policy (#13 item 11) and the preprocessing cache/summary (#13 item 17).

Each of these failed on the main this work started from: a NUL became EOD mid-document and a
control byte PAD, silently; a lowercase sequence scored differently from its uppercase form; an
edited input with its old size and mtime was served from the cache; a summary outlived its pair.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from evo2_hydra.config import Alphabet, Charset, DataConfig, Packing, ToUpper
from evo2_hydra.data import preprocess as pre
from evo2_hydra.data.indexed import MMapIndexedDataset
from evo2_hydra.data.prepare import prepare_data
from evo2_hydra.data.text import TextPolicy, policy_for_checkpoint
from evo2_hydra.errors import UserError
from evo2_hydra.generate import GenerationSource, conditioned_prompt
from evo2_hydra.score import run_score
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.conftest import to_obj
from tests.vtx_reference import model_config


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def run(data: DataConfig, src: Path, prefix: Path) -> pre.PreprocessSummary:
    return pre.preprocess_to_prefix(data, [str(src)], str(prefix), 64, progress=False, plot=False)


@pytest.mark.parametrize(
    "text, what",
    [
        ("AC\u0000GT", r"'\\x00' \(control byte, code 0 = the EOD token\)"),
        ("AC\u0001GT", r"'\\x01' \(control byte, code 1 = the PAD token\)"),
    ],
)
def test_nul_and_control_bytes_never_become_special_tokens(tmp_path, text, what):
    src = write_jsonl(tmp_path / "in.jsonl", ["ACGT", text])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match=rf"in\.jsonl:2: character {what}.*at position 2"):
        run(DataConfig(), src, out / "d")
    with pytest.raises(UserError, match="bytes 0 and 1 are the EOD and PAD tokens"):
        run(DataConfig(alphabet=Alphabet.keep), src, out / "d")
    assert list(out.iterdir()) == []
    summary = run(DataConfig(alphabet=Alphabet.skip, packing=Packing.contiguous), src, out / "d")
    assert summary.sequences == 1 and summary.alphabet_skipped == 1
    assert summary.alphabet_examples[0].startswith(f"{src}:2: character")
    saved = json.loads(Path(f"{out / 'd'}_summary.json").read_text())
    assert saved["alphabet_skipped"] == 1 and saved["text_policy"]["alphabet"] == "skip"
    assert bytes(MMapIndexedDataset(out / "d").tokens.astype(np.uint8).tolist()) == b"ACGT\x00"


def test_charset_iupac_and_keep(tmp_path):
    texts = ["ACGTNRYKMSWBDHVacgtnu", "ACGT-ACGT", "AC GT", "ACGT"]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    with pytest.raises(UserError, match=r"in\.jsonl:2: character '-'.*data.charset=iupac"):
        run(DataConfig(charset=Charset.iupac), src, tmp_path / "a")
    kept = run(DataConfig(charset=Charset.iupac, alphabet=Alphabet.keep), src, tmp_path / "b")
    assert kept.alphabet_kept == 2 and kept.sequences == 4
    printable = run(DataConfig(packing=Packing.contiguous), src, tmp_path / "c")
    assert printable.alphabet_kept == 0 and printable.sequences == 4
    want = b"".join(t.encode() + b"\x00" for t in texts)
    assert bytes(MMapIndexedDataset(tmp_path / "c").tokens.astype(np.uint8).tolist()) == want


def test_policy_normalize_and_fast_check_agree():
    rng = np.random.default_rng(0)
    for charset in Charset:
        policy = TextPolicy(charset=charset)
        for _ in range(300):
            text = "".join(chr(c) for c in rng.integers(0, 200, size=5))
            slow_ok = all(32 <= ord(c) < 127 for c in text) and (
                charset == Charset.printable
                or all(c in "ACGTUNRYSWKMBDHVacgtunryswkmbdhv" for c in text)
            )
            assert policy.accepts(text) == slow_ok
            assert (policy.problem(text) is None) == slow_ok
    assert TextPolicy().normalize("acgtN", "x", model=True) == "ACGTN"
    assert TextPolicy(upper=False).normalize("acgtN", "x", model=True) == "acgtN"
    assert TextPolicy().normalize("acgtN", "x") == "acgtN"  # stored tokens keep the case


# ------------------------------------------------------------------------------ inference side

CONTEXT = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    cfg = model_config("evo2_tiny")
    return make_random_savanna_checkpoint(root, cfg, CONTEXT, layout="step", seed=3), cfg


def test_lowercase_scores_like_uppercase(compose_cfg, checkpoint, tmp_path):
    step, _ = checkpoint
    seqs = write_jsonl(tmp_path / "s.jsonl", ["ACGTTGCAACGGATTACA", "acgttgcaacggattaca"])
    out = run_score(
        to_obj(
            compose_cfg(
                [
                    "task=score",
                    f"ckpt.path={step}",
                    f"ckpt.context={CONTEXT}",
                    f"score.input={seqs}",
                    f"score.output={tmp_path / 'o'}",
                ]
            )
        )
    )
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert rows[0]["sum_log_likelihood"] == pytest.approx(rows[1]["sum_log_likelihood"], abs=1e-6)


def test_policy_is_read_back_from_the_run_config(checkpoint, tmp_path):
    step, cfg = checkpoint
    configs = step / "configs"
    configs.mkdir(exist_ok=True)
    saved = {"model": {"name": cfg.name}, "data": {"to_upper": "none", "charset": "iupac"}}
    (configs / "config.yaml").write_text(yaml.safe_dump(saved))
    try:
        policy, where = policy_for_checkpoint(str(step), DataConfig())
        assert policy == TextPolicy(Alphabet.error, Charset.iupac, upper=False)
        assert where.endswith("configs/config.yaml")
        (configs / "config.yaml").write_text(yaml.safe_dump({**saved, "data": {"charset": "x"}}))
        with pytest.raises(UserError, match=r"config\.yaml: data section: 'x' is not a valid"):
            policy_for_checkpoint(str(step), DataConfig())
    finally:
        (configs / "config.yaml").unlink()
    policy, where = policy_for_checkpoint(str(step), DataConfig(to_upper=ToUpper.none))
    assert not policy.upper and where == "the command line"  # a savanna file: the command line


def test_generate_prompt_and_condition_token_are_upper_cased():
    source = GenerationSource(
        model=None, context=100, append_eod=True, conditions={"A": "a"}, facts_from="x"
    )
    from evo2_hydra.config import GenerateConfig

    settings = GenerateConfig(prompt="acgN", condition="A", length=10)
    assert conditioned_prompt(settings, source, TextPolicy()) == list(b"AACGN")
    assert conditioned_prompt(settings, source, TextPolicy(upper=False)) == list(b"aacgN")
    with pytest.raises(UserError, match="generate.prompt: character"):
        conditioned_prompt(
            GenerateConfig(prompt="AC-G", length=3), source, TextPolicy(charset=Charset.iupac)
        )


# ------------------------------------------------------------------------------ cache and summary


def test_cache_sees_an_edit_that_keeps_size_and_mtime(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ["ACGTACGT"])
    data = DataConfig(input=str(src), valid_input=str(src), cache_dir=str(tmp_path / "cache"))
    first = prepare_data(data, 64, data.cache_dir).train[0].prefix
    stat = os.stat(src)
    write_jsonl(src, ["TTTTTTTT"])  # same size
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # `touch -d` back to the old mtime
    assert os.stat(src).st_size == stat.st_size and os.stat(src).st_mtime_ns == stat.st_mtime_ns
    second = prepare_data(data, 64, data.cache_dir).train[0].prefix
    assert second != first
    tokens = MMapIndexedDataset(second).get(0)
    assert bytes(tokens[:8].astype(np.uint8).tolist()) == b"TTTTTTTT"


def test_summary_never_outlives_its_pair(tmp_path, monkeypatch):
    prefix = tmp_path / "d"
    run(DataConfig(), write_jsonl(tmp_path / "a.jsonl", ["ACGT"]), prefix)
    assert pre.check_summary(str(prefix), crc=True)["sequences"] == 1

    def killed(*args, **kwargs):  # dies after the pair was renamed, before the summary
        raise KeyboardInterrupt

    monkeypatch.setattr(pre, "save_conditions", killed)
    monkeypatch.setattr(pre, "plot_lengths", killed)
    with pytest.raises(KeyboardInterrupt):
        pre.preprocess_to_prefix(
            DataConfig(),
            [str(write_jsonl(tmp_path / "b.jsonl", ["GG", "TT"]))],
            str(prefix),
            64,
            progress=False,
        )
    assert len(MMapIndexedDataset(prefix)) == 2  # the new pair
    assert not Path(f"{prefix}_summary.json").exists()  # the old summary is gone, not stale


def test_a_summary_that_disagrees_with_its_pair_is_an_error(tmp_path):
    prefix = tmp_path / "d"
    run(DataConfig(), write_jsonl(tmp_path / "a.jsonl", ["ACGT", "GG"]), prefix)
    other = tmp_path / "e"
    run(DataConfig(), write_jsonl(tmp_path / "b.jsonl", ["A"] * 3), other)
    os.replace(f"{other}.bin", f"{prefix}.bin")  # a pair mixed up behind our back (the index
    # still finds enough bytes: only the summary can tell)
    with pytest.raises(UserError, match=r"d_summary\.json describes another .*bin_bytes"):
        prepare_data(DataConfig(input=str(prefix), valid_input=str(prefix)), 64, str(tmp_path))


def test_concurrent_preprocesses_into_one_prefix_leave_a_matching_summary(tmp_path):
    inputs = [
        write_jsonl(tmp_path / f"{i}.jsonl", ["ACGT" * (i + 1)] * (50 * (i + 1))) for i in range(3)
    ]
    prefix = tmp_path / "out" / "d"
    errors = []

    def work(src):
        try:
            run(DataConfig(), src, prefix)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work, args=(src,)) for src in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    summary = pre.check_summary(str(prefix), crc=True)
    assert summary["sequences"] == len(MMapIndexedDataset(prefix))
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["d.bin", "d.idx", "d_summary.json"]


def test_generate_prompts_from_a_fasta_file(compose_cfg, checkpoint, tmp_path):
    from evo2_hydra.generate import run_generate

    step, _ = checkpoint
    prompts = tmp_path / "p.fa"
    prompts.write_text(">p1 first\nACGT\nac\n>p2\nGGGTTT\n")
    common = ["task=generate", f"ckpt.path={step}", f"ckpt.context={CONTEXT}", "data=jsonl"]
    common += ["generate.n=2", "generate.length=8", "generate.temperature=0"]
    out = run_generate(
        to_obj(
            compose_cfg(
                [*common, f"generate.prompts={prompts}", f"generate.output={tmp_path / 'f'}"]
            )
        )
    )
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["prompt"]) for r in rows] == [
        ("p1", "ACGTAC"),
        ("p1", "ACGTAC"),
        ("p2", "GGGTTT"),
        ("p2", "GGGTTT"),
    ]
    single = run_generate(  # the same prompt given directly, lowercase: the same continuation
        to_obj(
            compose_cfg([*common, "generate.prompt=acgtac", f"generate.output={tmp_path / 's'}"])
        )
    )
    first = json.loads((single / "generations.jsonl").read_text().splitlines()[0])
    assert first["text"] == rows[0]["text"]
    bad = tmp_path / "bad.fa"
    bad.write_text(">p1\nAC\x07GT\n")
    with pytest.raises(UserError, match=r"bad\.fa: record 1 \('p1'\): character '\\x07'"):
        run_generate(to_obj(compose_cfg([*common, f"generate.prompts={bad}"])))
