"""task=score extensions: batching gives the unbatched scores, per-position log-probabilities
(forward and reverse complement) agree with a direct computation and sum to the reported totals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evo2_hydra.model import build_model, load_into_model
from evo2_hydra.score import reverse_complement, run_score
from tests.ckpt_factory import make_random_savanna_checkpoint, random_savanna_module
from tests.conftest import to_obj
from tests.vtx_reference import model_config

CONTEXT = 128
SEQUENCES = ["ACGTTGCAAC", "GGGCCCATATATATGCGCGCAAT" * 2, "acgtNNaccc", "TTTTTTTTTTTTTTTTTA"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("score_ext")
    cfg = model_config("evo2_tiny")
    path = make_random_savanna_checkpoint(root, cfg, CONTEXT, layout="single", seed=11)
    module = random_savanna_module(cfg, CONTEXT, seed=11)  # the same values as the file
    model = load_into_model(build_model(cfg, CONTEXT), module, cfg, CONTEXT).eval()
    seqs = root / "seqs.jsonl"
    seqs.write_text(
        "".join(json.dumps({"id": i, "text": s}) + "\n" for i, s in enumerate(SEQUENCES))
    )
    return path, model, seqs


def direct_log_probs(model, text: str) -> np.ndarray:
    ids = torch.tensor([list(text.encode())])
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0].float(), dim=-1)
    return np.array([logp[i - 1, ids[0, i]].item() for i in range(1, ids.shape[1])])


def rows_of(folder):
    return [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]


def test_batching_and_per_position_log_probs(compose_cfg, setup, tmp_path):
    path, model, seqs = setup
    common = ["task=score", f"ckpt.path={path}", f"ckpt.context={CONTEXT}", f"score.input={seqs}"]
    one = rows_of(run_score(to_obj(compose_cfg([*common, f"score.output={tmp_path / 'b1'}"]))))
    out = run_score(
        to_obj(
            compose_cfg(
                [
                    *common,
                    f"score.output={tmp_path / 'b3'}",
                    "score.batch_size=3",  # a full batch and a partial one, padded rows
                    "score.log_probs=true",
                    "score.reverse_complement=true",
                ]
            )
        )
    )
    rows = rows_of(out)
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    for row, single, text in zip(rows, one, SEQUENCES):
        assert row["forward_sum_log_likelihood"] == pytest.approx(
            single["sum_log_likelihood"], abs=1e-3
        )
        forward = np.load(out / row["log_probs"])
        assert forward.dtype == np.float32 and forward.shape == (len(text) - 1,)
        # model input is upper-cased, as the run trained (data.to_upper, the text policy)
        np.testing.assert_allclose(forward, direct_log_probs(model, text.upper()), atol=1e-4)
        assert forward.sum() == pytest.approx(row["forward_sum_log_likelihood"], abs=1e-3)
        rc = np.load(out / row["reverse_complement_log_probs"])
        np.testing.assert_allclose(
            rc, direct_log_probs(model, reverse_complement(text.upper())), atol=1e-4
        )
        assert rc.sum() == pytest.approx(row["reverse_complement_sum_log_likelihood"], abs=1e-3)
        total = (forward.sum() + rc.sum()) / 2
        assert row["sum_log_likelihood"] == pytest.approx(total, abs=1e-3)
        assert row["mean_log_likelihood"] == pytest.approx(total / (len(text) - 1), abs=1e-4)
    assert not (out / "logits").exists()
