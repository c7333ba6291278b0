"""task=embed: hidden states equal the evo2 package's forward hooks (public vtx on CPU) for each
name kind; pooled / per-position outputs, reverse complement and save dtype end to end; bad layer
names refused with one line and exit 2."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from evo2_hydra.config import EmbedPool
from evo2_hydra.errors import UserError
from evo2_hydra.infer.embed import embed_batch, run_embed
from evo2_hydra.infer.layers import resolve_layers
from evo2_hydra.model import build_model, load_into_model
from evo2_hydra.score import reverse_complement
from tests.ckpt_factory import make_random_savanna_checkpoint, random_savanna_module
from tests.conftest import to_obj
from tests.vtx_reference import (
    install_vortex_cpu_shim,
    model_config,
    random_savanna_state_dict,
    savanna_to_vortex,
    vortex_config,
)

CONTEXT = 256
HOOK_NAMES = ["embedding_layer", "blocks.0.mlp.l3", "blocks.3", "blocks.5.mlp", "blocks.7", "norm"]


pytestmark = pytest.mark.usefixtures("one_thread")


def vtx_hooks(vortex_state, config, input_ids, workdir, names):
    """What evo2's `Evo2.forward(return_embeddings=True, layer_names=...)` captures: a forward
    hook per named submodule of vtx's StripedHyena, `output[0]` for tuple outputs."""
    install_vortex_cpu_shim()
    cwd = os.getcwd()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    try:
        from vortex.model.model import StripedHyena
        from vortex.model.utils import dotdict, load_checkpoint

        torch.save(vortex_state, workdir / "vortex.pt")
        model = StripedHyena(dotdict(config))
        load_checkpoint(model, str(workdir / "vortex.pt"))
        model = model.float().eval()
        captured, handles = {}, []
        for name in names:

            def hook(_module, _inputs, output, name=name):
                captured[name] = (output[0] if isinstance(output, tuple) else output).detach()

            handles.append(model.get_submodule(name).register_forward_hook(hook))
        try:
            with torch.no_grad():
                model(input_ids)
        finally:
            for h in handles:
                h.remove()
        return captured
    finally:
        os.chdir(cwd)


def test_embeddings_match_vtx_hooks(tmp_path):
    cfg = model_config("evo2_tiny")
    state = random_savanna_state_dict(cfg, CONTEXT, seed=3, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    text = "".join("ACGTacgtN"[i] for i in torch.randint(0, 9, (200,), generator=g).tolist())
    ids = torch.tensor([list(text.encode())])
    reference = vtx_hooks(
        savanna_to_vortex(state, cfg), vortex_config(cfg), ids, tmp_path, HOOK_NAMES
    )
    model = load_into_model(build_model(cfg, CONTEXT), state, cfg, CONTEXT).eval()
    layers = resolve_layers(HOOK_NAMES, cfg)
    # in chunks of 64 tokens: the chunked path is what long inputs take
    pooler = embed_batch(model, cfg, [text], layers, EmbedPool.none, chunk_tokens=64)
    for name, capture in layers.items():
        ours = torch.from_numpy(pooler.result(capture, 0))
        theirs = reference[name][0].float()
        assert ours.shape == theirs.shape == (200, cfg.hidden_size), name
        assert theirs.abs().max() > 0.1, name  # not a trivial tensor
        diff = (ours - theirs).abs().max().item()
        assert diff <= 1e-3 * max(1.0, theirs.abs().max().item()), f"{name}: {diff:.2e}"
    # the name kinds are different tensors: mixing them up would fail the comparison above
    assert (reference["blocks.7"] - reference["norm"]).abs().max() > 0.1
    mlp = torch.from_numpy(pooler.result("blocks.5.mlp.l3", 0))
    block = embed_batch(model, cfg, [text], {"b": "blocks.5"}, EmbedPool.none, 0).result(
        "blocks.5", 0
    )
    assert (mlp - torch.from_numpy(block)).abs().max() > 0.1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    cfg = model_config("evo2_tiny")
    path = make_random_savanna_checkpoint(root, cfg, CONTEXT, layout="single", seed=21)
    module = random_savanna_module(cfg, CONTEXT, seed=21)
    model = load_into_model(build_model(cfg, CONTEXT), module, cfg, CONTEXT).eval()
    texts = ["ACGTACGTAAACCCGGGTTT", "GATTACA" * 9, "acgtnACGT", "TTTTGGGGCCCCAAAA" * 4, "CG"]
    seqs = root / "seqs.jsonl"
    seqs.write_text(
        "".join(json.dumps({"id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    return cfg, path, model, texts, seqs


def direct(model, text, capture):
    """One sequence, unchunked, every position; upper-cased as task=embed feeds it (the run's
    text policy: the model trained on upper-cased input)."""
    cfg = model_config("evo2_tiny")
    text = text.upper()
    return embed_batch(model, cfg, [text], {capture: capture}, EmbedPool.none, 0).result(capture, 0)


def compose(compose_cfg, path, seqs, out, *extra):
    return to_obj(
        compose_cfg(
            [
                "task=embed",
                f"ckpt.path={path}",
                f"ckpt.context={CONTEXT}",
                f"embed.input={seqs}",
                f"embed.output={out}",
                *extra,
            ]
        )
    )


def test_pooled_outputs_in_input_order(compose_cfg, setup, tmp_path):
    cfg, path, model, texts, seqs = setup
    out = run_embed(
        compose(
            compose_cfg,
            path,
            seqs,
            tmp_path / "mean",
            "embed.layers=[blocks.2.mlp.l3,norm]",
            "embed.batch_size=2",
            "embed.reverse_complement=true",
        )
    )
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["id"] for r in index] == [f"s{i}" for i in range(len(texts))]
    for layer in ("blocks.2.mlp.l3", "norm"):
        array = np.load(out / f"{layer}.npy")
        assert array.shape == (len(texts), 2 * cfg.hidden_size) and array.dtype == np.float32
        for row, text in enumerate(texts):
            fwd = direct(model, text, layer).mean(axis=0)
            rc = direct(model, reverse_complement(text), layer).mean(axis=0)
            np.testing.assert_allclose(array[row], np.concatenate([fwd, rc]), atol=1e-5)
    manifest = json.loads((out / "embed.json").read_text())
    assert manifest["pool"] == "mean" and manifest["reverse_complement"] is True

    last = run_embed(
        compose(
            compose_cfg,
            path,
            seqs,
            tmp_path / "last",
            "embed.layers=[blocks.4]",
            "embed.pool=last",
            "embed.save_dtype=float16",
        )
    )
    array = np.load(last / "blocks.4.npy")
    assert array.dtype == np.float16
    for row, text in enumerate(texts):
        np.testing.assert_allclose(
            array[row], direct(model, text, "blocks.4")[-1], atol=2e-2, rtol=1e-3
        )


def test_per_position_and_chunked(compose_cfg, setup, tmp_path):
    cfg, path, model, texts, seqs = setup
    out = run_embed(
        compose(
            compose_cfg,
            path,
            seqs,
            tmp_path / "none",
            "embed.layers=[embedding_layer,blocks.6.mlp]",
            "embed.pool=none",
            "embed.chunk_tokens=8",
            "embed.batch_size=3",
        )
    )
    for i, text in enumerate(texts):
        for layer, capture in (
            ("embedding_layer", "embedding_layer"),
            ("blocks.6.mlp", "blocks.6.mlp.l3"),
        ):
            array = np.load(out / layer / f"{i:06d}.npy")
            assert array.shape == (len(text), cfg.hidden_size)
            np.testing.assert_allclose(array, direct(model, text, capture), atol=1e-4)


def test_unknown_layer_lists_valid_names(compose_cfg, setup, tmp_path):
    _, path, _, _, seqs = setup
    with pytest.raises(UserError) as err:
        run_embed(compose(compose_cfg, path, seqs, tmp_path / "bad", "embed.layers=[blocks.8]"))
    message = str(err.value)
    assert "unknown layer 'blocks.8'" in message and "blocks.0 .. blocks.7" in message
    assert "\n" not in message and not (tmp_path / "bad").exists()


def test_cli_bad_layer_exit_2(run_entry, setup, tmp_path):
    _, path, _, _, seqs = setup
    proc = run_entry(
        "launch.py",
        "task=embed",
        f"ckpt.path={path}",
        f"ckpt.context={CONTEXT}",
        f"embed.input={seqs}",
        f"embed.output={tmp_path / 'cli'}",
        "embed.layers=[blocks.1.mixer]",
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: embed.layers: unknown layer 'blocks.1.mixer'")
    )
    assert not (tmp_path / "cli").exists()
