"""NeMo2 and Megatron-Bridge checkpoints in (convert.py source=DIR, ckpt.path=DIR).

Sources: our own NeMo2 export (torch_dist and zarr) of a random evo2_tiny savanna checkpoint, the
same NeMo2 zarr folder re-chunked as a tensor-parallel-2 save writes it (Megatron-Core 0.15
`strategies/zarr.py`), and Megatron-Bridge folders written here in the documented layout (BioNeMo
`nemo2_to_mbridge.py`: iter_0000001/ with DCP files, common.pt, metadata.json, run_config.yaml,
train_state.pt; keys without `module.`), built from an independent key map
(tests/test_convert_nemo.py's `expected_nemo`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from omegaconf import OmegaConf
from torch.distributed.checkpoint import FileSystemWriter

from evo2_hydra.checkpoint.loader import load_module_state_dict
from evo2_hydra.checkpoint.megatron import detect_megatron, import_megatron, read_weights
from evo2_hydra.checkpoint.prepare import prepare_base_checkpoint
from evo2_hydra.convert.run import run_convert
from evo2_hydra.errors import UserError
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.test_convert_nemo import expected_nemo
from tests.vtx_reference import model_config

FP32 = ("filter.h", "filter.decay", "filter.gamma", "filter.R", "filter.p")


def convert(compose_cfg, *overrides):
    return run_convert(OmegaConf.to_object(compose_cfg(list(overrides), config_name="convert")))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(model, savanna source path, its MP=1 tensors) — a random evo2_tiny at context 256."""
    cfg = model_config("evo2_tiny")
    path = make_random_savanna_checkpoint(tmp_path_factory.mktemp("src"), cfg, 256, seed=3)
    state, _ = load_module_state_dict(path)
    return cfg, path, {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def stored(state: dict, cfg) -> dict:
    """What a NeMo2 export stores of a savanna state, in savanna names: 128 hcm taps, NeMo dtypes."""
    nemo = expected_nemo(state, cfg)
    out = {}
    for key, value in state.items():
        if key.endswith(("filter.h", "filter.decay")) and value.dim() == 2:
            value = value[:, :128]
        out[key] = value.to(torch.float32 if key.endswith(FP32) else torch.bfloat16)
    assert nemo  # the reference map exists for this model
    return out


# ---------------------------------------------------------------------------------------------
# NeMo2


@pytest.mark.parametrize("fmt", ["torch_dist", "zarr"])
def test_nemo2_round_trip_is_byte_exact(tmp_path, compose_cfg, source, fmt):
    cfg, path, state = source
    n1, n2, sav = tmp_path / "n1", tmp_path / "n2", tmp_path / "sav"
    convert(compose_cfg, "target=nemo", f"target.format={fmt}", f"source={path}", f"output={n1}")
    # Import: every stored tensor comes back bit for bit.
    ck = detect_megatron(n1)
    assert ck is not None and ck.kind == "nemo2" and ck.backend == fmt
    imported, model = import_megatron(ck)
    assert model.name == "evo2_tiny" and model.mlp_inner_size == cfg.mlp_inner_size
    want = stored(state, cfg)
    for key, value in imported.items():
        if key.endswith(("filter.t", "inv_freq")):
            continue  # not stored by NeMo: rebuilt (arange, RoPE)
        assert same_bytes(value, want[key]), key
    # NeMo2 -> NeMo2 through our import: the same tensors (and, for zarr, the same files).
    convert(
        compose_cfg,
        "target=nemo",
        f"target.format={fmt}",
        f"source={n1}",
        f"output={n2}",
        "verify=true",
    )
    w1, w2 = read_weights(detect_megatron(n1)), read_weights(detect_megatron(n2))
    assert w1.keys() == w2.keys()
    assert all(same_bytes(w1[k], w2[k]) for k in w1)
    if fmt == "zarr":
        for f in (n1 / "weights").rglob("*"):
            if f.is_file() and f.name != "common.pt":
                assert (
                    f.read_bytes() == (n2 / "weights" / f.relative_to(n1 / "weights")).read_bytes()
                ), f
    # NeMo2 -> savanna (verify=true compares logits), then back: same tensors again.
    convert(compose_cfg, "target=savanna", f"source={n1}", f"output={sav}", "verify=true")
    manifest = json.loads((sav / "manifest.json").read_text())
    assert (
        manifest["verify_max_logit_diff"] is not None and manifest["verify_max_logit_diff"] < 1e-3
    )
    n3 = tmp_path / "n3"
    convert(compose_cfg, "target=nemo", f"target.format={fmt}", f"source={sav}", f"output={n3}")
    w3 = read_weights(detect_megatron(n3))
    assert all(same_bytes(w1[k], w3[k]) for k in w1)


def rechunk_zarr_tp2(weights: Path) -> int:
    """Rewrite every zarr array as a TP=2 save stores it: two chunks along the split axis."""
    rechunked = 0
    for zarray in weights.glob("*/.zarray"):
        meta = json.loads(zarray.read_text())
        shape = meta["shape"]
        axis = (
            1
            if zarray.parent.name.endswith(
                ("dense.weight", "linear_proj.weight", "linear_fc2.weight")
            )
            else 0
        )
        if len(shape) <= axis or shape[axis] % 2:
            continue
        dtype = {"<f4": torch.float32, "bfloat16": torch.bfloat16}[meta["dtype"]]
        full_name = ".".join("0" for _ in shape)
        raw = bytearray((zarray.parent / full_name).read_bytes())
        full = torch.frombuffer(raw, dtype=dtype).reshape(shape)
        (zarray.parent / full_name).unlink()
        chunks = list(shape)
        chunks[axis] //= 2
        for i, piece in enumerate(full.chunk(2, dim=axis)):
            index = [0] * len(shape)
            index[axis] = i
            data = piece.contiguous().view(torch.uint8).numpy().tobytes()
            (zarray.parent / ".".join(map(str, index))).write_bytes(data)
        meta["chunks"] = chunks
        zarray.write_text(json.dumps(meta))
        rechunked += 1
    return rechunked


def test_nemo2_zarr_tensor_parallel_shards_merge(tmp_path, compose_cfg, source):
    cfg, path, _ = source
    n1 = tmp_path / "n1"
    convert(compose_cfg, "target=nemo", "target.format=zarr", f"source={path}", f"output={n1}")
    tp2 = tmp_path / "tp2"
    shutil.copytree(n1, tp2)
    assert rechunk_zarr_tp2(tp2 / "weights") > 20
    assert (tp2 / "weights" / "module.decoder.layers.0.mixer.dense.weight" / "0.1").is_file()
    w1, w2 = read_weights(detect_megatron(n1)), read_weights(detect_megatron(tp2))
    assert w1.keys() == w2.keys() and all(same_bytes(w1[k], w2[k]) for k in w1)


def test_torch_dist_tensor_parallel_chunks_merge(tmp_path, compose_cfg, source):
    """A DCP tensor saved as two TP chunks (two storage items) reads back whole."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    cfg, path, _ = source
    n1 = tmp_path / "n1"
    convert(compose_cfg, "target=nemo", f"source={path}", f"output={n1}")
    w1 = read_weights(detect_megatron(n1))
    # Re-save every tensor as two row chunks, as two TP ranks' ShardedTensor shards are stored.
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
    from torch.distributed._shard.sharded_tensor.metadata import (
        ShardedTensorMetadata,
        TensorProperties,
    )

    def two_chunks(t: torch.Tensor) -> ShardedTensor:
        rows = t.shape[0] // 2
        shards, metas = [], []
        for i, piece in enumerate((t[:rows], t[rows:])):
            offsets = [rows * i] + [0] * (t.dim() - 1)
            meta = ShardMetadata(offsets, list(piece.shape), "rank:0/cpu")
            shards.append(Shard(piece.contiguous(), meta))
            metas.append(meta)
        props = TensorProperties(dtype=t.dtype)
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, ShardedTensorMetadata(metas, t.shape, props), process_group=None
        )

    import torch.distributed as dist

    # Sharded tensors need a process group: one gloo rank holding both chunks.
    # (an in-process finetune earlier in the session may have left its one-rank group up: reuse it)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
        )
    assert dist.get_world_size() == 1
    tp2 = tmp_path / "tp2"
    try:
        state = {
            "module." + k: two_chunks(v) if v.dim() and v.shape[0] % 2 == 0 else v
            for k, v in w1.items()
        }
        shutil.copytree(n1 / "context", tp2 / "context")
        (tp2 / "weights").mkdir()
        shutil.copy(n1 / "weights" / "metadata.json", tp2 / "weights")
        dcp.save(state, storage_writer=FileSystemWriter(str(tp2 / "weights")))
    finally:
        if owned:
            dist.destroy_process_group()
    meta = dcp.FileSystemReader(str(tp2 / "weights")).read_metadata()
    chunked = [k for k, m in meta.state_dict_metadata.items() if len(getattr(m, "chunks", [])) == 2]
    assert chunked and isinstance(
        meta.state_dict_metadata[chunked[0]].chunks[0], ChunkStorageMetadata
    )
    w2 = read_weights(detect_megatron(tp2))
    assert w1.keys() == w2.keys() and all(same_bytes(w1[k], w2[k]) for k in w1)


# ---------------------------------------------------------------------------------------------
# Megatron-Bridge


def write_mbridge(root: Path, state: dict, cfg, *, full_width: bool, te: bool = True) -> Path:
    """An MBridge checkpoint in the documented layout (BNM savanna_to_mbridge): keys without
    `module.`, hcm filters at the savanna width when `full_width`, `--no-te` norm names if not te."""
    tensors = {k.removeprefix("module."): v for k, v in expected_nemo(state, cfg).items()}
    if full_width:
        for layer, kind in enumerate(cfg.layer_types()):
            if kind == "hcm":
                for name in ("h", "decay"):
                    tensors[f"decoder.layers.{layer}.mixer.mixer.filter.{name}"] = state[
                        f"sequential.{layer + 2}.mixer.mixer.filter.{name}"
                    ].float()
    if not te:
        renames = {
            "mixer.dense_projection.layer_norm_weight": "norm.weight",
            "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
            "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
        }
        for key in list(tensors):
            for old, new in renames.items():
                if key.endswith(old):
                    tensors[key.removesuffix(old) + new] = tensors.pop(key)
    step = root / "iter_0000001"
    step.mkdir(parents=True)
    dcp.save(
        tensors,
        storage_writer=FileSystemWriter(str(step), single_file_per_rank=False),
        no_dist=True,
    )
    (root / "latest_checkpointed_iteration.txt").write_text("1\n")
    train_state = {"step": torch.tensor(1), "consumed_train_samples": torch.tensor(0)}
    torch.save(train_state, step / "train_state.pt")
    torch.save(train_state, root / "latest_train_state.pt")
    torch.save({"checkpoint_version": 3.0, "iteration": 1, "optimizer": {}}, step / "common.pt")
    (step / "metadata.json").write_text(
        json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                    "common_backend": "torch", "common_backend_version": 1})
    )  # fmt: skip
    provider = {
        "_target_": "bionemo.evo2.models.evo2_provider.HyenaModelProvider",
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.mlp_inner_size,
        "num_attention_heads": cfg.num_attention_heads,
        "hybrid_override_pattern": cfg.operator_pattern,
        "num_groups_hyena": cfg.hcl_groups,
        "num_groups_hyena_medium": cfg.hcm_groups,
        "num_groups_hyena_short": cfg.hcs_groups,
        "hyena_medium_conv_len": 128,
        "seq_length": 256,
        "vocab_size": 512,
        "params_dtype": {"_target_": "torch.bfloat16", "_call_": False},
    }
    (step / "run_config.yaml").write_text(
        yaml.safe_dump({"model": provider, "checkpoint": {"save": str(root)}})
    )
    return root


@pytest.mark.parametrize("full_width,te", [(False, True), (True, True), (False, False)])
def test_mbridge_imports_to_the_same_tensors(tmp_path, source, full_width, te):
    cfg, _, state = source
    root = write_mbridge(tmp_path / "mb", state, cfg, full_width=full_width, te=te)
    for given in (root, root / "iter_0000001"):
        ck = detect_megatron(given)
        assert ck.kind == "mbridge" and ck.iteration == 1
        imported, model = import_megatron(ck)
        assert model.name == "evo2_tiny"
        want = stored(state, cfg)
        for key, value in imported.items():
            if key.endswith(("filter.t", "inv_freq")):
                continue
            expect = want[key]
            if full_width and key.endswith(("filter.h", "filter.decay")):
                expect = state[key].float()
            assert same_bytes(value, expect), key
        t = next(v for k, v in imported.items() if k.endswith("filter.t"))
        assert t.shape[-1] == (256 if full_width else 128)


def test_mbridge_convert_verifies_logits_and_ckpt_path_finetunes(tmp_path, compose_cfg, source):
    cfg, _, state = source
    root = write_mbridge(tmp_path / "mb", state, cfg, full_width=True)
    out = tmp_path / "vortex"
    convert(compose_cfg, "target=vortex", f"source={root}", f"output={out}", "verify=true")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verify_max_logit_diff"] < 1e-3 and manifest["source"].endswith("(mbridge)")
    # ckpt.path naming the MBridge folder: prepared like any base checkpoint (finetune input).
    run_cfg = OmegaConf.to_object(
        compose_cfg(["model=evo2_tiny", f"ckpt.path={root}", "ckpt.context=256"])
    )
    base = prepare_base_checkpoint(run_cfg.ckpt, run_cfg.model, tmp_path / "base")
    module, _ = load_module_state_dict(base)
    assert same_bytes(
        module["sequential.0.word_embeddings.weight"],
        state["sequential.0.word_embeddings.weight"].to(torch.bfloat16),
    )
    h = "sequential.3.mixer.mixer.filter.h"  # the model uses its first 128 taps (hcm_filter_len)
    assert same_bytes(module[h][:, :128].float(), state[h][:, :128].float())


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_nemo_and_mbridge_dirs_one_line(tmp_path, compose_cfg, source, run_entry):
    cfg, path, state = source
    n1 = tmp_path / "n1"
    convert(compose_cfg, "target=nemo", f"source={path}", f"output={n1}")

    def fails(folder: Path, pattern: str) -> None:
        with pytest.raises(UserError, match=pattern) as err:
            import_megatron(detect_megatron(folder))
        assert "\n" not in str(err.value)

    # Another model: model.yaml says hidden 1920 (no preset with this pattern) / model= chosen.
    other = tmp_path / "other"
    shutil.copytree(n1, other)
    text = (other / "context" / "model.yaml").read_text()
    (other / "context" / "model.yaml").write_text(
        text.replace("hidden_size: 64", "hidden_size: 1920")
    )
    fails(other, r"no model= preset has hidden 1920, 8 layers, pattern SDH\*SDH\*")
    proc = run_entry(
        "convert.py", "target=vortex", f"source={n1}", "model=evo2_1b", f"output={tmp_path / 'x'}"
    )
    assert proc.returncode == 2
    assert (
        "a checkpoint of another model (hidden 64, 8 layers" in proc.stderr.strip().splitlines()[-1]
    )
    assert "model=evo2_1b is hidden 1920" in proc.stderr and not (tmp_path / "x").exists()
    # A missing shard file (torch_dist).
    missing = tmp_path / "missing"
    shutil.copytree(n1, missing)
    victim = sorted((missing / "weights").glob("*.distcp"))[3]
    victim.unlink()
    fails(missing, rf"{victim.name}: missing shard file")
    # zarr: a missing chunk, and a chunk grid that does not divide (TP size 3 of 64 rows).
    z = tmp_path / "z"
    convert(compose_cfg, "target=nemo", "target.format=zarr", f"source={path}", f"output={z}")
    rechunk_zarr_tp2(z / "weights")
    array = z / "weights" / "module.decoder.layers.0.mixer.dense_projection.weight"
    (array / "1.0").rename(tmp_path / "chunk")
    fails(z, r"dense_projection.weight/1\.0: missing chunk \(tensor-parallel shard\)")
    (tmp_path / "chunk").rename(array / "1.0")
    meta = json.loads((array / ".zarray").read_text())
    meta["chunks"] = [meta["shape"][0] // 3 + 1, meta["shape"][1]]
    (array / ".zarray").write_text(json.dumps(meta))
    fails(z, r"chunks \[65, 64\] do not divide shape \[192, 64\] \(a tensor-parallel size")
    # MBridge: run_config.yaml of another model; latest naming a missing iteration.
    mb = write_mbridge(tmp_path / "mb", state, cfg, full_width=False)
    run_config = mb / "iter_0000001" / "run_config.yaml"
    loaded = yaml.safe_load(run_config.read_text())
    loaded["model"]["hybrid_override_pattern"] = "SDH*SDHS"
    run_config.write_text(yaml.safe_dump(loaded))
    fails(mb, r"Megatron-Bridge.*no model= preset has hidden 64, 8 layers, pattern SDH\*SDHS")
    (mb / "latest_checkpointed_iteration.txt").write_text("5\n")
    with pytest.raises(UserError, match=r"names iteration 5, but .*iter_0000005 does not exist"):
        detect_megatron(mb)


def test_model_shape_from_io_json_when_model_yaml_is_missing(tmp_path, compose_cfg, source):
    cfg, path, _ = source
    n1 = tmp_path / "n1"
    convert(compose_cfg, "target=nemo", f"source={path}", f"output={n1}")
    (n1 / "context" / "model.yaml").unlink()
    ck = detect_megatron(n1)
    assert ck.arch_source.endswith("io.json")
    _, model = import_megatron(ck)
    assert dataclasses.asdict(model) == dataclasses.asdict(
        dataclasses.replace(cfg, max_context=model.max_context)
    )
    assert math.isclose(model.rope_base, cfg.rope_base)
