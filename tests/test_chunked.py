"""Chunked forward == unchunked forward (evo2_hydra/model/chunked.py), random evo2_tiny in float32.

16K tokens in 1K chunks: logits, per-position log-probabilities and every embedding layer within
1e-4. The hcl poles are set so some channels remember the whole sequence (decay rates down to
1e-5 per token): a chunk that dropped or truncated the modal state would miss the tolerance (shown
below by zeroing it), so the test sees the carried state, not only the short FIRs.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from evo2_hydra.model import build_model, load_into_model
from evo2_hydra.model import chunked as chunked_mod
from evo2_hydra.model.chunked import chunk_spans, forward_chunk, new_cache, prefill_chunked
from evo2_hydra.model.decode import ModalState, decode_step
from tests.ckpt_factory import random_savanna_module
from tests.vtx_reference import model_config

WIDTH = 256  # filter width of the weights (the forward runs at any length)
LENGTH = 16384
CHUNK = 1024
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def long_memory_model():
    cfg = model_config("evo2_tiny")
    state = random_savanna_module(cfg, WIDTH, dtype=torch.float32, seed=5, extra_state=False)
    g = torch.Generator().manual_seed(0)
    for key in state:
        if key.endswith("filter.p"):  # rate exp(p)*exp(gamma) from ~1e-6 to ~1e-1 per token
            state[key] = torch.empty(state[key].shape).uniform_(-9.0, 2.0, generator=g)
    return load_into_model(build_model(cfg, WIDTH), state, cfg, WIDTH).eval()


@pytest.fixture(scope="module")
def setup():
    model = long_memory_model()
    ids = torch.randint(0, 512, (1, LENGTH), generator=torch.Generator().manual_seed(1))
    names = ["embedding_layer", "norm"]
    names += [f"blocks.{i}" for i in range(8)] + [f"blocks.{i}.mlp.l3" for i in range(8)]
    full: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    logits = forward_chunk(model, ids, new_cache(), capture=lambda n, t: full.__setitem__(n, t))
    seconds = time.perf_counter() - started
    with torch.no_grad():
        plain = model(ids)
    assert torch.equal(logits, plain)  # one chunk is the forward itself
    return model, ids, logits, full, names, seconds


def run_in_chunks(model, ids, chunk):
    pieces: dict[str, list[torch.Tensor]] = {}
    cache = new_cache(ids.shape[1])
    logits = []
    for start, stop in chunk_spans(ids.shape[1], chunk):
        logits.append(
            forward_chunk(
                model,
                ids[:, start:stop],
                cache,
                capture=lambda n, t: pieces.setdefault(n, []).append(t),
            )
        )
    return torch.cat(logits, dim=1), {n: torch.cat(p, dim=1) for n, p in pieces.items()}, cache


def log_probs(logits, ids):
    return F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]


def test_chunked_equals_unchunked_at_16k(setup):
    model, ids, full_logits, full, names, _ = setup
    started = time.perf_counter()
    logits, captured, cache = run_in_chunks(model, ids, CHUNK)
    print(f"16K tokens: chunked {time.perf_counter() - started:.1f} s")
    assert cache.position == LENGTH
    assert (logits - full_logits).abs().max().item() <= TOL
    assert (log_probs(logits, ids) - log_probs(full_logits, ids)).abs().max().item() <= TOL
    assert sorted(captured) == sorted(names)
    for name in names:
        diff = (captured[name] - full[name]).abs().max().item()
        assert diff <= TOL, f"{name}: max diff {diff:.2e}"


def test_uneven_chunks_and_batch(setup):
    model, ids, full_logits, *_ = setup
    short = torch.cat((ids[:, :3000], ids[:, 5000:8000]), dim=0)  # two rows
    with torch.no_grad():
        reference = model(short)
    logits, _, _ = run_in_chunks(model, short, 777)  # chunks that do not divide the length
    assert (logits - reference).abs().max().item() <= TOL


def test_dropping_the_modal_state_is_caught(setup, monkeypatch):
    """Sensitivity: chunks that forget the hcl state between them miss the tolerance."""
    model, ids, full_logits, *_ = setup
    original = chunked_mod._modal_chunk

    def forgetful(op, z, state):
        if state is not None:
            state = ModalState(torch.zeros_like(state.state), state.poles, state.residues)
        return original(op, z, state)

    monkeypatch.setattr(chunked_mod, "_modal_chunk", forgetful)
    logits, _, _ = run_in_chunks(model, ids[:, :4096], CHUNK)
    assert (logits - full_logits[:, :4096]).abs().max().item() > 100 * TOL


def test_chunked_prefill_then_decode(setup):
    """A prompt prefilled in chunks continues token by token like the full forward."""
    model, ids, *_ = setup
    prompt, extra = ids[:, :2500], ids[0, 2500:2505]
    cache, last = prefill_chunked(model, prompt, max_length=2505, chunk_tokens=600)
    with torch.no_grad():
        reference = model(ids[:, :2505])
    assert (last - reference[:, 2499]).abs().max().item() <= TOL
    for k, token in enumerate(extra[:-1]):
        step = decode_step(model, token.view(1), cache)
        assert (step - reference[:, 2500 + k]).abs().max().item() <= TOL


def test_generation_with_a_chunked_prompt_gives_the_same_tokens(setup):
    from evo2_hydra.generate import generate_tokens

    model, ids, *_ = setup
    prompt = ids[0, :1500].tolist()

    def greedy(logits):
        return logits.argmax(dim=-1)

    plain = generate_tokens(model, prompt, 2, 6, greedy)
    chunked = generate_tokens(model, prompt, 2, 6, greedy, chunk_tokens=512)
    assert [g.tokens for g in plain] == [g.tokens for g in chunked]


def test_automatic_chunking_follows_free_memory():
    from evo2_hydra.errors import UserError
    from evo2_hydra.infer.memory import (
        GIB,
        activation_bytes_per_token,
        choose_chunk_tokens,
        kv_bytes_per_token,
    )

    cfg = model_config("evo2_1b")
    cpu, f32 = torch.device("cpu"), torch.float32
    per_token = activation_bytes_per_token(cfg, f32) + kv_bytes_per_token(cfg, f32)
    assert choose_chunk_tokens(cfg, 1, 8192, f32, cpu, available=4 * 8192 * per_token) == 0
    chunk = choose_chunk_tokens(cfg, 1, 1 << 18, f32, cpu, available=64 * GIB)
    assert 1024 <= chunk < 1 << 18 and chunk % 1024 == 0
    with pytest.raises(UserError, match="attention KV cache"):
        choose_chunk_tokens(cfg, 1, 1 << 24, f32, cpu, available=8 * GIB)


HEAP_PROBE = """
import sys, torch
from evo2_hydra.infer import memory
from evo2_hydra.infer.common import resolve_chunk
from evo2_hydra.model import build_model
from tests.vtx_reference import model_config
cfg = model_config("evo2_tiny")
model = build_model(cfg, 64, device="cpu")
setting, length = int(sys.argv[1]), int(sys.argv[2])
resolve_chunk(setting, model, cfg, 1, length)
print(memory._heap_fixed)
"""


@pytest.mark.parametrize(
    "setting,length,fixed", [(1024, 4096, True), (0, 4096, False), (4096, 4096, False)]
)
def test_chunking_on_the_cpu_fixes_the_mmap_threshold(setting, length, fixed):
    """A chunked CPU run (and only a chunked one) fixes glibc's mmap threshold, which keeps the
    heap from fragmenting as the sequence advances (infer/memory.py; measured by bench_long)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = subprocess.run(
        [sys.executable, "-c", HEAP_PROBE, str(setting), str(length)],
        cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(fixed)
