"""The conditioning recipe end to end: finetune evo2_tiny (the real task=finetune, DeepSpeed on CPU)
on two conditioned classes of clearly different composition, then generate from each class token
and check that the composition of the generated sequences follows the token."""

from __future__ import annotations

import json
import random
from pathlib import Path

from evo2_hydra.generate import describe_source, run_generate
from evo2_hydra.train.run import run_finetune
from tests.conftest import to_obj

GC_SHARE = {"A": 0.9, "B": 0.1}  # class A mostly G/C, class B mostly A/T
LENGTH = 24  # bases per training sequence


def synthetic_sequence(rng: random.Random, clade: str) -> str:
    return "".join(
        rng.choice("GC") if rng.random() < GC_SHARE[clade] else rng.choice("AT")
        for _ in range(LENGTH)
    )


def write_jsonl(path: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = [{"clade": c, "text": synthetic_sequence(rng, c)} for c in "AB" * (count // 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def gc_fraction(texts: list[str]) -> float:
    bases = "".join(texts)
    return sum(b in "GC" for b in bases) / max(1, len(bases))


def generate_per_class(compose_cfg, run_dir: Path, out_root: Path) -> tuple[dict, object]:
    """task=generate from `run_dir` with each class token: (clade -> rows, the last config).

    The run folder alone says model, context, EOD and the condition mapping (not the command line).
    """
    rows = {}
    for clade in "AB":
        cfg = compose_cfg(
            [
                "task=generate",
                f"ckpt.path={run_dir}",
                "data.condition.field=null",  # no mapping on the command line
                f"generate.condition={clade}",
                "generate.n=8",
                "generate.length=30",
                "generate.temperature=0.7",
                f"generate.output={out_root / ('gen_' + clade)}",
            ]
        )
        out = run_generate(to_obj(cfg))
        rows[clade] = [
            json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()
        ]
    return rows, cfg


def assert_composition_follows_the_token(fractions: dict[str, float]) -> None:
    """The conditioning check: generations from A's token are G/C-rich, from B's A/T-rich."""
    assert fractions["A"] > 0.5 and fractions["B"] < 0.3, fractions
    assert fractions["A"] - fractions["B"] > 0.4, fractions


def two_class_finetune(tmp_path: Path, steps: int, lr: float) -> list[str]:
    """Write the two-class data into `tmp_path`; the finetune overrides that train on it
    (context 32, float32, ZeRO-0, one validation at the end)."""
    write_jsonl(tmp_path / "train.jsonl", 64, seed=0)
    write_jsonl(tmp_path / "valid.jsonl", 8, seed=1)
    return [
        "ckpt.context=32",
        f"data.input={tmp_path / 'train.jsonl'}",
        f"data.valid_input={tmp_path / 'valid.jsonl'}",
        f"data.cache_dir={tmp_path / 'cache'}",  # data=example: clade A -> '1', B -> '2'
        f"train.steps={steps}",
        "train.micro_batch_size=16",
        f"train.lr={lr}",
        "train.min_lr=1e-3",
        "train.warmup=0.1",
        "train.precision=float32",
        "train.zero_stage=0",
        f"train.eval_every={steps}",
        "train.eval_steps=1",
        f"train.save_every={steps}",
    ]


def test_generated_composition_follows_the_condition_token(compose_cfg, tmp_path, one_thread):
    run_dir = tmp_path / "run"
    steps = 14
    finetune = compose_cfg(
        [
            "ckpt.path=null",
            "ckpt.random_init=true",  # fresh evo2_tiny; the recipe is the same from a checkpoint
            *two_class_finetune(tmp_path, steps, 2e-2),
        ]
    )
    finetune.output_dir = str(run_dir)
    summary = run_finetune(to_obj(finetune))
    assert summary["last_step"] == steps
    valid = summary["valid_losses"]
    assert valid[steps] < 0.7 * valid[0], valid  # it learned something

    rows, cfg = generate_per_class(compose_cfg, run_dir, tmp_path)
    fractions = {clade: gc_fraction([r["text"] for r in rows[clade]]) for clade in "AB"}
    assert rows["A"][0]["condition_token"] == "1" and rows["B"][0]["condition_token"] == "2"
    assert rows["A"][0]["checkpoint"]["iteration"] == steps
    # measured: A 0.98, B 0.07 (training data: 0.9 and 0.1); 10 steps gave 0.60 and 0.02
    print("GC fractions", fractions, "valid losses", valid)
    assert_composition_follows_the_token(fractions)
    # the run trained with EOD after each document, so generation stops at EOD (mechanics: see
    # test_generation_stops_at_the_stop_token); 0 never appears in the text
    source = describe_source(to_obj(cfg).ckpt, to_obj(cfg).model, to_obj(cfg).data)
    assert source.append_eod and source.context == 32 and source.conditions == {"A": "1", "B": "2"}
    assert {r["stop"] for clade in "AB" for r in rows[clade]} <= {"eod", "length"}
    bases = "".join(r["text"] for clade in "AB" for r in rows[clade])
    assert sum(b in "ACGT" for b in bases) >= 0.95 * len(bases)
