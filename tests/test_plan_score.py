"""task=plan and task=score end to end (tiny models; the 7B plan runs on the meta device)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evo2_hydra.errors import UserError
from evo2_hydra.model import build_model, load_into_model
from evo2_hydra.plan import run_plan
from evo2_hydra.score import run_score
from tests.conftest import to_obj
from tests.test_model import spec_listing
from tests.vtx_reference import model_config, random_savanna_state_dict

CONTEXT = 256
SEQUENCES = ["ACGTACGTTTGACCA", "GGGCCCATATATATGCGCGCAAT" * 3, "acgtNNaccc"]


def test_plan_json_lists_every_parameter_without_allocating(run_entry):
    proc = run_entry(
        "launch.py", "task=plan", "model=evo2_7b", "ckpt.context=8192", "plan.format=json"
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)  # the whole stdout is one JSON object
    listing = spec_listing("evo2_7b", 8192)
    buffers = ("filter.decay", "filter.t", "inv_freq")
    expected_params = {k: list(v) for k, v in listing.items() if not k.endswith(buffers)}
    assert {p["name"]: p["shape"] for p in plan["parameters"]} == expected_params
    assert {p["dtype"] for p in plan["parameters"]} == {"bfloat16"}
    assert all(set(p) == {"name", "shape", "dtype"} for p in plan["parameters"])
    count = sum(math.prod(v) for v in expected_params.values())
    assert plan["parameter_count"] == count and plan["parameter_bytes"] == 2 * count
    assert {b["name"] for b in plan["buffers"]} == set(listing) - set(expected_params)
    assert plan["weight_bytes"] == plan["parameter_bytes"] + plan["buffer_bytes"]


def test_plan_text_table(compose_cfg, capsys):
    run = to_obj(
        compose_cfg(
            ["task=plan", "model=evo2_40b", "ckpt=savanna_evo2_40b", "train.precision=float32"]
        )
    )
    sections = run_plan(run)
    out = capsys.readouterr().out
    assert "sequential.53.norm.weight" in out and "[22528, 8192]" in out
    assert f"parameters: {sections[0].data['parameter_count']:,}" in out
    assert sections[0].data["parameter_bytes"] == 4 * sections[0].data["parameter_count"]


# ---------------------------------------------------------------- score


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny savanna checkpoint as a single .pt and as a global_stepN folder with `latest`."""
    cfg = model_config("evo2_tiny")
    state = random_savanna_state_dict(cfg, CONTEXT, seed=5, dtype=torch.bfloat16)
    root = tmp_path_factory.mktemp("ckpt")
    torch.save({"module": state, "dp_world_size": 1, "iteration": 3}, root / "model.pt")
    step = root / "run" / "global_step3"
    step.mkdir(parents=True)
    torch.save(
        {"module": state, "dp_world_size": 1, "iteration": 3}, step / "mp_rank_00_model_states.pt"
    )
    (root / "run" / "latest").write_text("global_step3")
    return cfg, state, root


@pytest.fixture
def seq_file(tmp_path):
    path = tmp_path / "seqs.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"s{i}", "text": s}) + "\n" for i, s in enumerate(SEQUENCES))
    )
    return path


def reference_scores(cfg, state, texts=SEQUENCES):
    """Unbatched forward per sequence and a direct log-likelihood sum."""
    model = load_into_model(build_model(cfg, CONTEXT), state, cfg, CONTEXT)
    out = []
    with torch.no_grad():
        for text in texts:
            # score upper-cases model input (the text policy of a run trained with to_upper)
            ids = torch.tensor([list(text.upper().encode())])
            logits = model(ids)[0].float()
            logp = F.log_softmax(logits, dim=-1)
            total = sum(logp[i - 1, ids[0, i]].item() for i in range(1, ids.shape[1]))
            out.append((total, logits.numpy()))
    return out


def test_score_end_to_end_with_logits(run_entry, tiny_checkpoint, seq_file, tmp_path):
    cfg, state, root = tiny_checkpoint
    output = tmp_path / "scores"
    proc = run_entry(
        "launch.py",
        "task=score",
        f"ckpt.path={root / 'model.pt'}",
        f"ckpt.context={CONTEXT}",
        f"score.input={seq_file}",
        f"score.output={output}",
        "score.logits=true",
        "score.batch_size=2",
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (output / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["s0", "s1", "s2"]
    for row, text, (total, logits) in zip(rows, SEQUENCES, reference_scores(cfg, state)):
        assert row["length"] == len(text)
        assert row["sum_log_likelihood"] == pytest.approx(total, abs=1e-3)
        assert row["mean_log_likelihood"] == pytest.approx(total / (len(text) - 1), abs=1e-4)
        saved = np.load(output / row["logits"])
        assert saved.dtype == np.float32 and saved.shape == (len(text), 512)
        np.testing.assert_allclose(saved, logits, atol=1e-4)


def test_score_step_folder_bf16_and_reverse_complement(
    compose_cfg, tiny_checkpoint, seq_file, tmp_path
):
    cfg, state, root = tiny_checkpoint
    common = [
        "task=score",
        f"ckpt.path={root / 'run'}",
        f"ckpt.context={CONTEXT}",
        f"score.input={seq_file}",
    ]
    out_bf16 = run_score(
        to_obj(compose_cfg([*common, f"score.output={tmp_path / 'bf16'}", "score.dtype=bfloat16"]))
    )
    rows = [json.loads(line) for line in (out_bf16 / "scores.jsonl").read_text().splitlines()]
    reference = reference_scores(cfg, state)
    for row, (total, _) in zip(rows, reference):
        # bf16 vs the float32 reference: ~0.5% apart, depending on thread count (reduction order)
        assert row["mean_log_likelihood"] == pytest.approx(total / (row["length"] - 1), rel=2e-2)
    assert not (out_bf16 / "logits").exists()

    out_rc = run_score(
        to_obj(
            compose_cfg(
                [*common, f"score.output={tmp_path / 'rc'}", "score.reverse_complement=true"]
            )
        )
    )
    rows = [json.loads(line) for line in (out_rc / "scores.jsonl").read_text().splitlines()]
    rc_texts = ["TGGTCAAACGTACGT", "ATTGCGCGCATATATATGGGCCC" * 3, "gggtNNacgt"]
    rc_reference = reference_scores(cfg, state, rc_texts)
    for row, (total, _), (rc_total, _) in zip(rows, reference, rc_reference):
        assert row["forward_sum_log_likelihood"] == pytest.approx(total, abs=1e-3)
        assert row["reverse_complement_sum_log_likelihood"] == pytest.approx(rc_total, abs=1e-3)
        assert row["sum_log_likelihood"] == pytest.approx((total + rc_total) / 2, abs=1e-3)
        assert abs(rc_total - total) > 1e-2


def test_score_bad_input_fails_before_writing(compose_cfg, tiny_checkpoint, tmp_path):
    _, _, root = tiny_checkpoint
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ACGT"}) + "\n{not json\n")
    output = tmp_path / "out"
    run = to_obj(
        compose_cfg(
            [
                "task=score",
                f"ckpt.path={root / 'model.pt'}",
                f"score.input={bad}",
                f"score.output={output}",
            ]
        )
    )
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        run_score(run)
    assert not output.exists()
    bad.write_text(json.dumps({"seq": "ACGT"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: .*'text'.*score.text_key"):
        run_score(run)
    run.score.input = str(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="no such file"):
        run_score(run)


def test_score_checkpoint_of_another_model_is_refused(
    compose_cfg, tiny_checkpoint, seq_file, tmp_path
):
    _, _, root = tiny_checkpoint
    run = to_obj(
        compose_cfg(
            [
                "task=score",
                "model=evo2_1b",
                f"ckpt.path={root / 'model.pt'}",
                f"score.input={seq_file}",
                f"score.output={tmp_path / 'out'}",
            ]
        )
    )
    with pytest.raises(UserError, match="model size.*model=evo2_tiny"):
        run_score(run)
    assert not (tmp_path / "out").exists()
