"""The model's state_dict layout against the spec, strict loading, round trips and bad checkpoints."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from evo2_hydra.errors import UserError
from evo2_hydra.model import (
    build_model,
    check_state_dict,
    expected_state_dict_shapes,
    load_into_model,
)
from tests.conftest import to_obj
from tests.vtx_reference import model_config, random_savanna_state_dict

# ---------------- the reference listing (evo2 configs, savanna `tools/7b/conversion/params.py`)

SPEC_LAYERS = {  # 0-based layer indices per operator, evo2 `evo2/configs/*.yml`
    "evo2_1b": dict(
        hcs=[0, 4, 7, 11, 14, 18, 21],
        hcm=[1, 5, 8, 12, 15, 19, 22],
        hcl=[2, 6, 9, 13, 16, 20, 23],
        attn=[3, 10, 17, 24],
    ),
    "evo2_7b": dict(
        hcs=[0, 4, 7, 11, 14, 18, 21, 25, 28],
        hcm=[1, 5, 8, 12, 15, 19, 22, 26, 29],
        hcl=[2, 6, 9, 13, 16, 20, 23, 27, 30],
        attn=[3, 10, 17, 24, 31],
    ),
    "evo2_40b": dict(
        hcs=[0, 4, 7, 11, 14, 18, 21, 25, 28, 32, 36, 39, 43, 46],
        hcm=[1, 5, 8, 12, 15, 19, 22, 26, 29, 33, 37, 40, 44, 47],
        hcl=[2, 6, 9, 13, 16, 20, 23, 27, 30, 34, 38, 41, 45, 48],
        attn=[3, 10, 17, 24, 31, 35, 42, 49],
    ),
}
SPEC_SIZES = {  # hidden D, groups G (hcs = hcm), MLP F (8K base), evo2 configs
    "evo2_1b": (1920, 128, 5120),
    "evo2_7b": (4096, 256, 11008),
    "evo2_40b": (8192, 512, 21888),
}


def spec_listing(name: str, context: int, mlp: int | None = None) -> dict[str, tuple[int, ...]]:
    """savanna's per-layer key listing (TE `_extra_state` keys aside), for every model size."""
    dim, groups, default_mlp = SPEC_SIZES[name]
    F = mlp or default_mlp
    layers = SPEC_LAYERS[name]
    n = sum(len(v) for v in layers.values())
    out = {
        "sequential.0.word_embeddings.weight": (512, dim),
        f"sequential.{n + 3}.norm.weight": (dim,),
    }
    for kind, indices in layers.items():
        for layer in indices:
            s = f"sequential.{layer + 2}."
            out.update(
                {
                    s + "input_layernorm.weight": (dim,),
                    s + "post_attention_layernorm.weight": (dim,),
                    s + "pre_mlp_layernorm.weight": (dim,),
                    s + "outer_mlp_layernorm.weight": (dim,),
                    s + "mixer.dense_projection.weight": (3 * dim, dim),
                    s + "mixer.dense.weight": (dim, dim),
                    s + "mixer.dense.bias": (dim,),
                    s + "mlp.w1.weight": (F, dim),
                    s + "mlp.w2.weight": (F, dim),
                    s + "mlp.w3.weight": (dim, F),
                }
            )
            if kind == "attn":
                out[s + "mixer.rotary_emb.inv_freq"] = (64,)
                continue
            out[s + "mixer.hyena_proj_conv.short_conv_weight"] = (3 * dim, 3)
            if kind == "hcs":
                out[s + "mixer.mixer.short_conv.short_conv_weight"] = (groups, 1, 7)
            elif kind == "hcm":
                out[s + "mixer.mixer.conv_bias"] = (dim,)
                out[s + "mixer.mixer.filter.h"] = (groups, context)
                out[s + "mixer.mixer.filter.decay"] = (groups, context)
            else:
                out[s + "mixer.mixer.conv_bias"] = (dim,)
                for p in ("gamma", "R", "p"):
                    out[s + f"mixer.mixer.filter.{p}"] = (dim, 16)
                out[s + "mixer.mixer.filter.t"] = (1, 1, context)
    return out


def test_7b_at_8192_matches_spec_listing_exactly():
    listing = spec_listing("evo2_7b", 8192)
    assert "sequential.35.norm.weight" in listing and len(listing) == 435
    shapes = expected_state_dict_shapes(model_config("evo2_7b"), 8192)
    assert set(shapes) == set(listing)
    assert shapes == listing
    assert list(shapes)[0] == "sequential.0.word_embeddings.weight"


@pytest.mark.parametrize("name, context", [("evo2_1b", 8192), ("evo2_40b", 4096)])
def test_1b_and_40b_match_spec_shapes(name, context):
    assert expected_state_dict_shapes(model_config(name), context) == spec_listing(name, context)


@pytest.mark.parametrize(
    "preset, model, mlp",
    [("savanna_evo2_7b", "evo2_7b", 11264), ("savanna_evo2_40b", "evo2_40b", 22528)],
)
def test_1m_release_presets_select_padded_mlp_and_rope_scaling(compose_cfg, preset, model, mlp):
    run = to_obj(compose_cfg([f"model={model}", f"ckpt={preset}", "ckpt.context=2048"]))
    assert run.model.mlp_inner_size == mlp and run.model.rope_scaling_factor == 128.0
    built = build_model(run.model, run.ckpt.context)
    shapes = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    assert shapes == spec_listing(model, 2048, mlp=mlp)
    attention = [b.mixer for b in built.blocks if b.kind == "attention"]
    assert attention and all(m.rope_scaling_factor == 128.0 for m in attention)


def test_40b_meta_build_is_fast_and_allocates_nothing():
    cfg = model_config("evo2_40b")
    start = time.perf_counter()
    model = build_model(cfg, 1_048_576)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"meta build took {elapsed:.2f}s"
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.is_meta for t in tensors)
    assert sum(p.numel() for p in model.parameters()) > 40e9


# ---------------------------------------------------------------- loading


def test_round_trip_is_byte_equal(tmp_path, tiny):
    """Savanna-layout file -> load -> save -> load: every tensor byte-equal, dtypes kept."""
    context = 256
    state = random_savanna_state_dict(tiny, context, seed=1, dtype=torch.bfloat16)
    torch.save({"module": state, "dp_world_size": 1}, tmp_path / "in.pt")
    loaded = torch.load(tmp_path / "in.pt", weights_only=True)["module"]

    model = load_into_model(build_model(tiny, context, dtype=torch.bfloat16), loaded, tiny, context)
    torch.save({"module": model.state_dict()}, tmp_path / "out.pt")
    saved = torch.load(tmp_path / "out.pt", weights_only=True)["module"]
    again = load_into_model(
        build_model(tiny, context, dtype=torch.bfloat16), saved, tiny, context
    ).state_dict()

    original = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    assert set(saved) == set(original) == set(again)
    for key, tensor in original.items():
        for other in (saved[key], again[key]):
            assert other.dtype == tensor.dtype and other.shape == tensor.shape, key
            assert torch.equal(
                other.contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)
            ), key
    assert saved["sequential.4.mixer.mixer.filter.t"].dtype == torch.float32


def test_load_float32_model_from_bf16_checkpoint(tiny):
    state = random_savanna_state_dict(tiny, 128, seed=2, dtype=torch.bfloat16)
    model = load_into_model(build_model(tiny, 128), state, tiny, 128)
    assert model.embedding.weight.dtype == torch.float32
    assert torch.equal(model.embedding.weight, state["sequential.0.word_embeddings.weight"].float())
    logits = model(torch.randint(0, 512, (2, 50)))
    assert (
        logits.shape == (2, 50, 512)
        and logits.dtype == torch.float32
        and torch.isfinite(logits).all()
    )


def test_absent_unused_norms_load_as_ones(tiny):
    state = random_savanna_state_dict(tiny, 128, seed=2)
    dropped = [k for k in state if "post_attention_layernorm" in k or "outer_mlp_layernorm" in k]
    for key in dropped:
        del state[key]
    model = load_into_model(build_model(tiny, 128), state, tiny, 128)
    assert torch.equal(model.sequential[2].outer_mlp_layernorm.weight, torch.ones(64))


def test_bf16_build_forward_and_t_stays_float32(tiny):
    torch.manual_seed(0)
    model = build_model(tiny, 128, device="cpu", dtype=torch.bfloat16)
    assert model.sequential[4].mixer.mixer.filter.t.dtype == torch.float32
    assert model(torch.randint(0, 512, (1, 40))).dtype == torch.bfloat16


def test_activation_checkpointing_gives_same_gradients(tiny):
    torch.manual_seed(0)
    plain = build_model(tiny, 128, device="cpu")
    ckpt = build_model(tiny, 128, device="cpu", checkpoint_activations=True)
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 512, (2, 64))
    grads = []
    for model in (plain, ckpt):
        model(ids).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 80  # all but the unused norms
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


# ---------------------------------------------------------------- bad checkpoints


def _error(cfg, context, shapes) -> str:
    with pytest.raises(UserError) as info:
        check_state_dict(cfg, context, shapes)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_context_width_is_named(tiny):
    shapes = expected_state_dict_shapes(tiny, 256)
    message = _error(tiny, 512, shapes)
    assert "sequential.3.mixer.mixer.filter.h file [4, 256] vs model [4, 512]" in message
    assert "context width" in message and "ckpt.source_context=256" in message


def test_bad_mlp_width_is_named(tiny):
    wider = dataclasses.replace(tiny, mlp_inner_size=160)
    message = _error(tiny, 256, expected_state_dict_shapes(wider, 256))
    assert "sequential.2.mlp.w1.weight file [160, 64] vs model [128, 64]" in message
    assert "MLP width" in message and "model.mlp_inner_size=160" in message


def test_bad_model_size_is_named(tiny):
    message = _error(tiny, 256, expected_state_dict_shapes(model_config("evo2_1b"), 256))
    assert "model size" in message and "model=evo2_1b" in message and "1920" in message


def test_missing_and_unexpected_keys_are_listed_and_nothing_loads(tiny):
    state = random_savanna_state_dict(tiny, 128, seed=4)
    del state["sequential.5.mixer.rotary_emb.inv_freq"]
    state["sequential.2.mixer.bogus.weight"] = torch.zeros(3)
    model = build_model(tiny, 128)
    with pytest.raises(UserError) as info:
        load_into_model(model, state, tiny, 128)
    message = str(info.value)
    assert "missing 1: sequential.5.mixer.rotary_emb.inv_freq [8]" in message
    assert "unexpected 1: sequential.2.mixer.bogus.weight [3]" in message
    assert all(p.is_meta for p in model.parameters())  # never a partial load


def test_vortex_file_is_recognised(tiny):
    message = _error(
        tiny, 128, {"embedding_layer.weight": (512, 64), "blocks.0.pre_norm.scale": (64,)}
    )
    assert "vortex" in message
