"""LoRA finetuning through `peft`: adapters only train, checkpoints hold adapters plus the base they
apply to, resume is loss-exact, every reader merges them (score, convert, generate, a new
finetune), and bad input is one line.

evo2_tiny at context 64 from a random savanna checkpoint, DeepSpeed on CPU (gloo), as in
test_train_run.py. The learning test uses the shipped base and example data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from evo2_hydra.checkpoint.layout import locate_checkpoint
from evo2_hydra.checkpoint.loader import load_module_state_dict
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.config import ConfigError, PeftConfig, PeftMethod
from evo2_hydra.errors import UserError
from evo2_hydra.model import build_model, load_into_model
from evo2_hydra.peft.lora import adapter_state, add_lora, is_adapter_key, resolve_targets
from evo2_hydra.peft.merge import LORA_RECORD, base_content_hash, merge_lora
from evo2_hydra.train.run import run_finetune
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.test_train_run import _signal_at, compose_run

CONTEXT = 64
LORA = ("peft=lora", "peft.rank=4", "peft.alpha=8")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_shared")
    model_cfg = compose_run(root / "x").model
    base = make_random_savanna_checkpoint(root / "base", model_cfg, CONTEXT, layout="latest")
    return {"root": root, "base": base, "cache": root / "data_cache", "model": model_cfg}


def lora_run(shared, out: Path, *overrides: str):
    return compose_run(
        out,
        f"ckpt.context={CONTEXT}",
        f"ckpt.path={shared['base']}",
        f"data.cache_dir={shared['cache']}",
        f"paths.cache_dir={shared['root'] / 'cache'}",
        "data.truncate=true",
        "train.micro_batch_size=2",
        "train.eval_steps=2",
        "train.lr=1e-2",
        "train.min_lr=1e-3",
        "train.warmup=0.2",
        *LORA,
        *overrides,
    )


def step_file(run_dir: Path, step: int, zero3: bool = False) -> Path:
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero3 else "mp_rank_00_model_states.pt"
    return run_dir / "checkpoints" / f"global_step{step}" / name


@pytest.fixture(scope="module")
def resumed(shared, tmp_path_factory):
    """A LoRA run (ZeRO-1, bf16, 2 micro-steps per step) stopped by SIGTERM mid-step 2 and
    resumed, and the same run uninterrupted."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("lora_runs")
    args = ("train.zero_stage=1", "train.precision=bfloat16", "train.steps=4")
    args += ("train.grad_accum_steps=2", "train.save_every=100", "train.eval_every=4")
    reference = run_finetune(lora_run(shared, root / "reference", *args))
    _signal_at(mp, train_call=3, sig=True)  # micro-step 1 of step 2
    interrupted = lora_run(shared, root / "interrupted", *args)
    first = run_finetune(interrupted)
    mp.undo()
    second = run_finetune(interrupted)
    return {
        "reference": reference,
        "first": first,
        "second": second,
        "run_dir": Path(interrupted.output_dir),
        "run": interrupted,
    }


def test_lora_trains_adapters_only_and_resumes_loss_exactly(resumed, shared):
    first, second = resumed["first"], resumed["second"]
    assert first["stopped_by"] == "SIGTERM" and first["last_step"] == 2
    assert second["start_step"] == 2 and second["last_step"] == 4
    assert {**first["losses"], **second["losses"]} == resumed["reference"]["losses"]
    valid = resumed["reference"]["valid_losses"]
    assert valid[4] < valid[0], valid  # the adapters learned something

    # the checkpoint: adapter tensors only, plus the record naming the base (path + hash)
    top = safe_load(step_file(resumed["run_dir"], 4))
    keys = [k for k in top["module"] if torch.is_tensor(top["module"][k])]
    assert keys and all(is_adapter_key("." + k) for k in keys), keys[:5]
    assert len(keys) == 2 * 5 * 8  # A and B for 5 linears in each of 8 blocks
    record = top[LORA_RECORD]
    assert record["rank"] == 4 and record["scaling"] == 2.0
    assert record["base"]["source"] == str(shared["base"])
    assert record["base"]["sha256"] == base_content_hash(record["base"]["path"])
    # the frozen base got no optimizer state: the ZeRO-1 file holds the adapters' fp32 master and
    # Adam moments (12 bytes each) plus pickling overhead, far below a full model's 12 bytes each
    adapters = sum(v.numel() for v in top["module"].values() if torch.is_tensor(v))
    optim = (
        resumed["run_dir"]
        / "checkpoints/global_step4/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    )
    base = load_module_state_dict(shared["base"])[0].values()
    full = sum(t.numel() for t in base if torch.is_tensor(t))
    assert 12 * adapters <= optim.stat().st_size < 12 * adapters + 12 * full // 4
    print(f"adapter parameters {adapters:,} of {full:,} ({100 * adapters / full:.1f}%)")


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).float()


def test_merged_weights_give_the_unmerged_models_logits(resumed, shared):
    """load_module_state_dict(LoRA run) merges W + s*B@A; logits equal base+adapters in fp32."""
    cfg = shared["model"]
    merged, meta = load_module_state_dict(resumed["run_dir"])
    assert meta["iteration"] == 4
    top = safe_load(step_file(resumed["run_dir"], 4))
    record = top[LORA_RECORD]
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))

    merged_model = build_model(cfg, CONTEXT, device="meta")
    load_into_model(merged_model, merged, cfg, CONTEXT)
    base_state, _ = load_module_state_dict(shared["base"])
    unmerged = build_model(cfg, CONTEXT, device="meta")
    load_into_model(unmerged, base_state, cfg, CONTEXT)
    peft_cfg = PeftConfig(method=PeftMethod.lora, rank=4, alpha=8.0, dropout=0.1)
    add_lora(unmerged, peft_cfg)
    missing, unexpected = unmerged.load_state_dict(top["module"], strict=False)
    assert not unexpected and not [k for k in missing if is_adapter_key("." + k)]
    unmerged.eval()  # dropout off, as in inference

    a, b = _logits(merged_model.eval(), tokens), _logits(unmerged, tokens)
    plain = build_model(cfg, CONTEXT, device="meta")
    load_into_model(plain, base_state, cfg, CONTEXT)
    assert (a - _logits(plain.eval(), tokens)).abs().max() > 1e-3  # the adapters do something
    assert (a - b).abs().max().item() < 1e-5
    # the adapted weights are merged in float32; every other tensor is the base's own
    assert merged["sequential.2.mlp.w1.weight"].dtype == torch.float32
    assert torch.equal(
        merged["sequential.2.pre_mlp_layernorm.weight"],
        base_state["sequential.2.pre_mlp_layernorm.weight"],
    )
    assert record["targets"][0] == "sequential.2.mixer.dense_projection"


def test_lora_run_feeds_score_convert_and_a_new_finetune(resumed, shared, run_entry, tmp_path):
    run_dir = resumed["run_dir"]
    # convert.py target=vortex on the LoRA run: adapters merged on the way
    out = tmp_path / "vortex"
    res = run_entry("convert.py", "target=vortex", f"source={run_dir}", f"output={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    (pt,) = out.glob("*.pt")
    vortex = torch.load(pt, weights_only=True, mmap=True)
    merged, _ = load_module_state_dict(run_dir)
    w1 = merged["sequential.2.mlp.w1.weight"]
    assert any(
        v.shape == w1.shape and torch.allclose(v.float(), w1, atol=1e-2)
        for v in vortex.values()
        if torch.is_tensor(v)
    )
    # task=score reads it too
    seqs = tmp_path / "seqs.jsonl"
    seqs.write_text(json.dumps({"id": "s", "text": "ACGTACGGTCA"}) + "\n")
    res = run_entry(
        "launch.py", "task=score", f"ckpt.path={run_dir}", f"ckpt.context={CONTEXT}",
        f"score.input={seqs}", f"score.output={tmp_path / 'score'}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    # a LoRA run as the base of another (full) finetune: merged on preparation
    again = compose_run(
        tmp_path / "again",
        f"ckpt.context={CONTEXT}",
        f"ckpt.path={run_dir}",
        f"data.cache_dir={shared['cache']}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "data.truncate=true",
        "train.micro_batch_size=2",
        "train.eval_steps=2",
        "train.steps=1",
        "train.zero_stage=0",
        "train.precision=float32",
    )
    out = run_finetune(again)
    (prepared,) = (tmp_path / "cache" / "base_checkpoints").glob("evo2_tiny-*")
    base, _ = load_module_state_dict(prepared)
    assert torch.equal(base["sequential.2.mlp.w1.weight"], merged["sequential.2.mlp.w1.weight"])
    assert out["last_step"] == 1


def test_a_changed_base_is_refused_in_one_line(resumed, tmp_path):
    """Copy the LoRA step and its base, change one base tensor's manifest entry: refused."""
    record = safe_load(step_file(resumed["run_dir"], 4))[LORA_RECORD]
    base_copy = tmp_path / "base"
    shutil.copytree(record["base"]["path"], base_copy)
    step = tmp_path / "lora" / "global_step4"
    shutil.copytree(resumed["run_dir"] / "checkpoints/global_step4", step)
    (tmp_path / "lora" / "latest").write_text("global_step4")
    top = torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)
    top[LORA_RECORD]["base"]["path"] = str(base_copy)
    torch.save(top, step / "mp_rank_00_model_states.pt")
    load_module_state_dict(tmp_path / "lora")  # the same contents elsewhere: accepted

    manifest = locate_checkpoint(base_copy).step_dir / "manifest.json"
    data = json.loads(manifest.read_text())
    tensors = data["model_states"]["mp_rank_00_model_states.pt"]["tensors"]
    first = next(iter(tensors))
    tensors[first]["crc32"] = "00000000"
    manifest.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"the base changed, these adapters do not apply") as err:
        load_module_state_dict(tmp_path / "lora")
    assert "\n" not in str(err.value)


def test_resume_onto_another_base_is_refused(shared, tmp_path):
    base = make_random_savanna_checkpoint(tmp_path / "b", shared["model"], CONTEXT, layout="latest")
    run = lora_run(
        {**shared, "base": base}, tmp_path / "run", "train.steps=1", "train.zero_stage=0"
    )
    run_finetune(run)
    # the same ckpt.path now holds other weights (rewritten in place)
    make_random_savanna_checkpoint(
        tmp_path / "b", shared["model"], CONTEXT, layout="latest", seed=3
    )
    more = lora_run(
        {**shared, "base": base}, tmp_path / "run", "train.steps=2", "train.zero_stage=0"
    )
    with pytest.raises(UserError, match=r"holds LoRA adapters for the base .* gives"):
        run_finetune(more)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_lora_at_every_zero_stage(shared, tmp_path, stage):
    args = (f"train.zero_stage={stage}", "train.precision=bfloat16", "train.steps=2")
    run = lora_run(shared, tmp_path / "run", *args, "train.eval_every=2")
    out = run_finetune(run)
    assert out["last_step"] == 2
    top = safe_load(step_file(Path(run.output_dir), 2, zero3=stage == 3))
    tensors = [k for k, v in top["module"].items() if torch.is_tensor(v)]
    assert tensors and all(is_adapter_key("." + k) for k in tensors)
    assert "frozen_param_fragments" not in top or not top["frozen_param_fragments"]
    merged, _ = load_module_state_dict(Path(run.output_dir))  # ZeRO-3 shards gathered, merged
    base, _ = load_module_state_dict(shared["base"])
    assert torch.equal(
        merged["sequential.0.word_embeddings.weight"], base["sequential.0.word_embeddings.weight"]
    )
    assert not torch.equal(
        merged["sequential.3.mlp.w3.weight"], base["sequential.3.mlp.w3.weight"].float()
    )
    # resume at the same stage continues from the adapter-only checkpoint
    more = lora_run(shared, tmp_path / "run", *args[:2], "train.steps=3", "train.eval_every=2")
    assert run_finetune(more)["start_step"] == 2


# ---- bad input ------------------------------------------------------------------------------


def test_targets_matching_nothing_name_the_patterns_and_the_modules(shared):
    model = build_model(shared["model"], CONTEXT, device="meta")
    bad = PeftConfig(method=PeftMethod.lora, targets=["mixer.dense", "mlp.fc1"])
    with pytest.raises(UserError) as err:
        resolve_targets(model, bad)
    msg = str(err.value)
    assert "'mlp.fc1' matches no module" in msg and "['mixer.dense', 'mlp.fc1']" in msg
    assert "mlp.w1" in msg and "mixer.dense_projection" in msg and "\n" not in msg
    with pytest.raises(UserError, match=r"input_layernorm \(RMSNorm\), not a linear layer"):
        resolve_targets(model, PeftConfig(method=PeftMethod.lora, targets=["input_layernorm"]))
    with pytest.raises(
        UserError,
        match=r"peft.rank=65 is larger than sequential.2.mixer.dense_projection \(64 -> 192",
    ):
        resolve_targets(model, PeftConfig(method=PeftMethod.lora, rank=65))
    with pytest.raises(ConfigError, match="peft.rank=0"):
        PeftConfig(method=PeftMethod.lora, rank=0)
    # wildcards on full names select single layers
    only = PeftConfig(method=PeftMethod.lora, targets=["sequential.2.*.dense"])
    assert resolve_targets(model, only) == ["sequential.2.mixer.dense"]


def test_cli_bad_targets_is_one_line_exit_2(run_entry, shared, tmp_path):
    res = run_entry(
        "launch.py", "peft=lora", "peft.targets=[mlp.nope]", f"ckpt.path={shared['base']}",
        f"ckpt.context={CONTEXT}",
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: peft.targets: 'mlp.nope' matches no module"), last
    assert not (tmp_path / "outputs" / "runs").exists() or not any(
        (tmp_path / "outputs" / "runs").rglob("checkpoints")
    )
    res = run_entry("launch.py", "peft=lora", "peft.rank=0")
    assert res.returncode == 2 and "peft.rank=0" in res.stderr.strip().splitlines()[-1]


def test_merge_lora_is_w_plus_scaled_ba():
    base = {"m.weight": torch.randn(6, 4), "n.weight": torch.randn(3, 3)}
    a, b = torch.randn(2, 4), torch.randn(6, 2)
    merged = merge_lora(
        base, {"m.lora_A.default.weight": a, "m.lora_B.default.weight": b}, scaling=0.5
    )
    assert torch.allclose(merged["m.weight"], base["m.weight"] + 0.5 * b @ a)
    assert merged["n.weight"] is base["n.weight"] and list(merged) == ["m.weight", "n.weight"]
    with pytest.raises(UserError, match="do not fit the base weight"):
        merge_lora(base, {"n.lora_A.default.weight": a, "n.lora_B.default.weight": b}, 1.0)
    assert adapter_state({"x.lora_A.default.weight": a, "x.weight": a}) == {
        "x.lora_A.default.weight": a
    }


# ---- LoRA learns (shipped base and example data) --------------------------------------------


@pytest.mark.slow
def test_lora_learns_half_of_a_full_finetune(tmp_path):
    """On the shipped conditioned example data, LoRA from the shipped base lowers validation loss
    by at least half of what a full finetune of the same steps does (measured under heavy load:
    full 2.197 -> 1.497, LoRA 2.198 -> 1.512)."""

    common = (
        "ckpt.context=96", "data.truncate=true", "train.micro_batch_size=8", "train.steps=10",
        "train.eval_every=10", "train.eval_steps=4", "train.save_every=10", "train.warmup=0.1",
        "train.zero_stage=0", f"data.cache_dir={tmp_path / 'data'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    full = run_finetune(compose_run(tmp_path / "full", *common))
    lora_out = tmp_path / "lora"
    lora = run_finetune(
        compose_run(lora_out, *common, "peft=lora", "train.lr=1e-2", "train.min_lr=1e-3")
    )
    drop_full = full["valid_losses"][0] - full["valid_losses"][10]
    drop_lora = lora["valid_losses"][0] - lora["valid_losses"][10]
    print(f"valid loss drop: full {full['valid_losses']} ({drop_full:.3f}), "
          f"LoRA {lora['valid_losses']} ({drop_lora:.3f})")  # fmt: skip
    assert drop_full > 0 and drop_lora >= 0.5 * drop_full


@pytest.mark.slow
def test_generation_follows_the_condition_token_after_a_lora_finetune(
    compose_cfg, tmp_path, one_thread
):
    """The generation tests' conditioning check (GC of generations by prompt token), after a LoRA
    finetune of the shipped base on the same two-class data (measured: A 0.98, B 0.02 after 30
    steps at lr 3e-3; 1e-2 gave 0.83 / 0.08; a full finetune from scratch, test_generate_finetune:
    0.98 / 0.07).
    """
    from tests.test_generate_finetune import (
        assert_composition_follows_the_token,
        gc_fraction,
        generate_per_class,
        two_class_finetune,
    )

    run_dir = tmp_path / "lora_run"
    steps = 30
    summary = run_finetune(
        compose_run(
            run_dir,
            "peft=lora",  # the default ckpt.path: the shipped base, frozen
            f"paths.cache_dir={tmp_path / 'base_cache'}",
            *two_class_finetune(tmp_path, steps, 3e-3),
        )
    )
    valid = summary["valid_losses"]
    assert valid[steps] < 0.7 * valid[0], valid
    rows, _ = generate_per_class(compose_cfg, run_dir, tmp_path)
    assert rows["A"][0]["checkpoint"]["iteration"] == steps
    fractions = {clade: gc_fraction([r["text"] for r in rows[clade]]) for clade in "AB"}
    print("GC fractions after LoRA", fractions, "valid losses", valid)
    assert_composition_follows_the_token(fractions)
