"""Incremental decoding against the full forward, sampling filters, task=generate end to end from
savanna and vortex files, and bad input refused before any work. Random evo2_tiny weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import evo2_hydra.generate as gen
from evo2_hydra.checkpoint import load_module_state_dict
from evo2_hydra.checkpoint.adapters.vortex import savanna_to_vortex
from evo2_hydra.config import ConfigError, GenerateConfig
from evo2_hydra.errors import UserError
from evo2_hydra.generate import allowed_tokens, generate_tokens, run_generate, sample_next
from evo2_hydra.model import build_model, load_into_model
from evo2_hydra.model.decode import decode_step, prefill
from tests.ckpt_factory import make_random_savanna_checkpoint, random_savanna_module
from tests.conftest import to_obj
from tests.vtx_reference import model_config, random_savanna_state_dict

WIDTH = 64  # filter width of the test model: prompts longer than this exercise full FIR states


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Token-by-token decoding of a tiny model is dominated by thread start-up on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    cfg = model_config("evo2_tiny")
    state = random_savanna_module(cfg, WIDTH, dtype=torch.float32, seed=3, extra_state=False)
    model = load_into_model(build_model(cfg, WIDTH), state, cfg, WIDTH).eval()
    return cfg, model


ALLOWED = allowed_tokens(512, stop_at_eod=True)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the tokens generation may produce (printable ASCII and EOD)."""
    return logits.masked_fill(~ALLOWED, float("-inf")).argmax(dim=-1)


def seeded_sampler(seed: int):
    generator, settings = torch.Generator().manual_seed(seed), GenerateConfig()
    return lambda logits: sample_next(logits, settings, ALLOWED, generator)


@pytest.mark.parametrize("rope_scaling", [1.0, 8.0])
def test_decode_steps_match_the_full_forward(tiny, rope_scaling):
    _, model = tiny
    for block in model.blocks:
        if hasattr(block.mixer, "rope_scaling_factor"):
            block.mixer.rope_scaling_factor = rope_scaling  # positions / factor, at each offset
    gen_ = torch.Generator().manual_seed(0)
    ids = torch.randint(65, 90, (2, 70), generator=gen_)  # two different prompts in one batch
    cache, logits = prefill(model, ids, max_length=100)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids), rtol=0, atol=1e-6)
    worst = 0.0
    for _ in range(25):
        token = torch.randint(65, 90, (2,), generator=gen_)
        step = decode_step(model, token, cache)
        ids = torch.cat((ids, token[:, None]), dim=1)
        with torch.no_grad():
            reference = model(ids)[:, -1]
        worst = max(worst, (step - reference).abs().max().item())
    assert worst < 1e-3, worst  # float32; measured ~3e-5 on logits of magnitude ~30
    assert cache.position == ids.shape[1]
    # the states carry the prefix: the same last token without it gives other logits
    _, alone = prefill(model, ids[:, -1:], max_length=1)
    assert (alone[:, -1] - reference).abs().max() > 0.1
    for block in model.blocks:
        if hasattr(block.mixer, "rope_scaling_factor"):
            block.mixer.rope_scaling_factor = 1.0


def test_decode_rounds_hcm_like_the_forward_for_bf16_files():
    """A float32 model of a bf16 file forms hcm h*decay in bf16 (HcmOperator.product_dtype) in the
    full forward; cached decoding must too. Arbitrary (not power-of-two) h makes the rounding show."""
    cfg = model_config("evo2_tiny")
    state = random_savanna_state_dict(cfg, WIDTH, seed=5, extra_state=False)  # bf16, well scaled
    for key, value in state.items():
        if key.endswith("filter.h"):
            state[key] = torch.randn_like(value, dtype=torch.float32).to(torch.bfloat16)
    model = load_into_model(build_model(cfg, WIDTH), state, cfg, WIDTH).float().eval()
    ids = torch.randint(65, 90, (1, 40), generator=torch.Generator().manual_seed(1))
    cache, _ = prefill(model, ids[:, :-1], max_length=WIDTH)
    step = decode_step(model, ids[:, -1], cache)
    with torch.no_grad():
        reference = model(ids)[:, -1]
    # measured: 2.5e-5 with the bf16 product, 1.9e-2 with an fp32 product (logits ~30)
    assert (step - reference).abs().max() < 1e-3


@pytest.mark.parametrize("prompt_len", [1, 70])
def test_cached_and_uncached_greedy_generation_agree(tiny, prompt_len):
    _, model = tiny
    prompt = torch.randint(65, 90, (prompt_len,), generator=torch.Generator().manual_seed(1))
    args = (model, prompt.tolist(), 2, 40)
    cached = generate_tokens(*args, greedy, cached=True)
    uncached = generate_tokens(*args, greedy, cached=False)
    assert [g.tokens for g in cached] == [g.tokens for g in uncached]
    assert len(cached[0].tokens) == 40
    # seeded sampling (varied tokens, so every state is exercised) agrees as well
    cached = generate_tokens(*args, seeded_sampler(7), cached=True)
    uncached = generate_tokens(*args, seeded_sampler(7), cached=False)
    assert [g.tokens for g in cached] == [g.tokens for g in uncached]
    assert len(set(cached[0].tokens)) > 10 and cached[0].tokens != cached[1].tokens


def test_generation_stops_at_the_stop_token(tiny):
    _, model = tiny
    prompt = [65, 67, 71, 84]
    first = generate_tokens(model, prompt, 1, 20, greedy)[0].tokens
    stop = first[5]  # greedy: the 6th token is this one, so a run stopping at it ends there
    out = generate_tokens(model, prompt, 1, 20, greedy, stop_token=stop)[0]
    assert out.stopped_at_eod and out.tokens == first[: first.index(stop)]


def test_sampling_filters():
    allowed = allowed_tokens(512, stop_at_eod=False)
    assert allowed[32:127].all() and not allowed[:32].any() and not allowed[127:].any()
    logits = torch.full((1, 512), -30.0)
    logits[0, 3] = 50.0  # most likely of all but not allowed (a control byte)
    logits[0, [65, 67, 71]] = torch.tensor([2.0, 1.5, 1.0])
    probs = torch.softmax(torch.tensor([2.0, 1.5, 1.0]), 0)  # the other allowed tokens: ~0

    def draws(**kw) -> list[int]:
        settings = GenerateConfig(**kw)
        g = torch.Generator().manual_seed(0)
        return [sample_next(logits, settings, allowed, g).item() for _ in range(300)]

    assert set(draws(temperature=0)) == {65}
    assert set(draws(top_k=2)) == {65, 67}
    assert set(draws(top_p=float(probs[0]) + 0.01)) == {65, 67}
    assert set(draws(top_p=float(probs[0]) - 0.01)) == {65}
    full = draws()
    assert draws() == full  # seeded: reproducible
    assert set(full) <= set(range(32, 127)) and 3 not in full
    share = full.count(65) / len(full)
    assert abs(share - float(probs[0])) < 0.1
    hot = draws(temperature=5.0)
    assert hot.count(65) < full.count(65)  # a higher temperature flattens the distribution


# ------------------------------------------------------------------------ task=generate


@pytest.fixture(scope="module")
def savanna_ckpt(tmp_path_factory):
    cfg = model_config("evo2_tiny")
    root = tmp_path_factory.mktemp("gen_ckpt")
    path = make_random_savanna_checkpoint(root, cfg, 256, layout="latest", seed=4)
    return cfg, path


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]


def fasta_of(folder: Path) -> dict[str, str]:
    records, name = {}, None
    for line in (folder / "generations.fasta").read_text().splitlines():
        if line.startswith(">"):
            name = line[1:].split()[0]
            records[name] = ""
        else:
            records[name] += line
    return records


def test_generate_from_savanna_and_vortex_files(compose_cfg, savanna_ckpt, tmp_path):
    cfg, path = savanna_ckpt
    common = ["task=generate", "ckpt.context=256", "generate.prompt=ACGT", "generate.n=3"]
    common += ["generate.length=30", "generate.temperature=0", "generate.condition=B"]
    out = run_generate(
        to_obj(compose_cfg([*common, f"ckpt.path={path}", f"generate.output={tmp_path / 's'}"]))
    )
    rows = rows_of(out)
    assert [r["id"] for r in rows] == ["gen_000000", "gen_000001", "gen_000002"]
    first = rows[0]
    assert first["prompt"] == "ACGT" and first["condition"] == "B"
    assert first["condition_token"] == "2"  # data=example's mapping (a file without a run config)
    assert first["settings"]["temperature"] == 0 and first["settings"]["length"] == 30
    assert first["checkpoint"]["path"] == str(path) and first["checkpoint"]["iteration"] == 7
    assert {r["text"] for r in rows} == {first["text"]}  # greedy: all the same
    assert fasta_of(out) == {r["id"]: r["text"] for r in rows}

    # the same continuation computed by hand: condition token, prompt, greedy cached decoding
    model = gen.load_scoring_model(
        cfg, to_obj(compose_cfg([f"ckpt.path={path}"])).ckpt, torch.float32, torch.device("cpu")
    )
    expected = generate_tokens(model, list(b"2ACGT"), 1, 30, greedy, stop_token=0)[0]
    assert first["text"] == bytes(expected.tokens).decode()

    # a vortex .pt of the same weights (imported through the conversion package) agrees
    module, _ = load_module_state_dict(path)
    vortex = tmp_path / "evo2_tiny_vortex.pt"
    torch.save(dict(savanna_to_vortex(module, cfg)), vortex)
    out_v = run_generate(
        to_obj(compose_cfg([*common, f"ckpt.path={vortex}", f"generate.output={tmp_path / 'v'}"]))
    )
    assert [r["text"] for r in rows_of(out_v)] == [r["text"] for r in rows]


def test_generate_command_line(run_entry, savanna_ckpt, tmp_path):
    _, path = savanna_ckpt
    args = ["task=generate", f"ckpt.path={path}", "ckpt.context=256", "generate.n=2"]
    args += ["generate.prompt=ACGT"]
    args += ["generate.length=12", "generate.seed=5", "generate.top_k=4"]
    one_thread = {"OMP_NUM_THREADS": "1"}
    proc = run_entry("launch.py", *args, f"generate.output={tmp_path / 'out'}", env=one_thread)
    assert proc.returncode == 0, proc.stderr
    texts = [r["text"] for r in rows_of(tmp_path / "out")]
    assert len(texts) == 2 and all(0 < len(t) <= 12 for t in texts)
    proc = run_entry("launch.py", *args, "generate.condition=Z", env=one_thread)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: generate.condition=Z is not in the run's conditioning mapping "
        "(known: A, B; read from the command line)"
    ]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["generate.condition=Z"],
            r"generate.condition=Z is not in the run's conditioning mapping \(known: A, B",
        ),
        (["generate.condition=A", "data.condition.field=null"], "declares no conditioning mapping"),
        (["generate.prompt=NONASCII"], r"character 'é' at position 4 is outside the vocabulary"),
        (["generate.prompt=''"], "generate.prompt is empty and no generate.condition"),
        (
            ["ckpt.context=64", "generate.length=61"],
            r"prompt \(4 tokens\) \+ length = 65 exceeds .*ckpt.context=64",
        ),
    ],
)
def test_bad_input_fails_before_any_work(
    compose_cfg, savanna_ckpt, tmp_path, monkeypatch, overrides, message
):
    _, path = savanna_ckpt

    def no_loading(*_args, **_kw):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(gen, "load_scoring_model", no_loading)
    output = tmp_path / "out"
    base = ["task=generate", f"ckpt.path={path}", "ckpt.context=256", "generate.prompt=ACGT"]
    run = to_obj(compose_cfg([*base, f"generate.output={output}", *overrides]))
    if "generate.prompt=NONASCII" in overrides:
        run.generate.prompt = "ACGTé"  # Hydra's override grammar rejects the character itself
    with pytest.raises(UserError, match=message):
        run_generate(run)
    assert not output.exists()


@pytest.mark.parametrize(
    "override", ["generate.n=0", "generate.temperature=-1", "generate.top_p=0", "generate.top_k=-2"]
)
def test_bad_settings_fail_at_compose_time(compose_cfg, override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        to_obj(compose_cfg(["task=generate", override]))


def test_only_rank_zero_generates(compose_cfg, savanna_ckpt, tmp_path, monkeypatch):
    """cluster=slurm starts one task per GPU: the other ranks must not write the output."""
    _, path = savanna_ckpt
    monkeypatch.setenv("SLURM_PROCID", "1")
    output = tmp_path / "out"
    run = to_obj(compose_cfg(["task=generate", f"ckpt.path={path}", f"generate.output={output}"]))
    assert run_generate(run) is None and not output.exists()


def test_cpu_threads_auto_for_small_models_and_restored():
    torch.set_num_threads(2)  # (the module fixture restores the session's setting)
    before = torch.get_num_threads()
    with gen.cpu_threads(0, hidden_size=64):
        assert torch.get_num_threads() == 1  # evo2_tiny: one thread (auto)
    with gen.cpu_threads(0, hidden_size=4096):
        assert torch.get_num_threads() == before  # large models keep torch's default
    with gen.cpu_threads(3, hidden_size=64):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
    torch.set_num_threads(1)
