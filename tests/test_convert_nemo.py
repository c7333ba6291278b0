"""target=nemo: the torch_dist folder reloaded with torch.distributed.checkpoint, the zarr folder read
with the zarr package, every tensor checked against the savanna -> NeMo mapping written out here
from NVIDIA/NeMo `nemo/collections/llm/gpt/model/hyena.py` (independently of the exporter's own
tables)."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
import zarr
from omegaconf import OmegaConf
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from evo2_hydra.checkpoint.adapters.nemo import io_json, resolve_model_size
from evo2_hydra.checkpoint.loader import load_module_state_dict
from evo2_hydra.convert.run import run_convert
from evo2_hydra.errors import UserError
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.vtx_reference import model_config

FP32 = ("filter.h", "filter.decay", "filter.gamma", "filter.R", "filter.p")


def expected_nemo(state, cfg):
    """module.<NeMo key> -> tensor, straight from NeMo's `PyTorchHyenaImporter` key map."""
    out = {"embedding.word_embeddings.weight": state["sequential.0.word_embeddings.weight"]}
    for i, kind in enumerate(cfg.layer_types()):
        s, d = f"sequential.{i + 2}.", f"decoder.layers.{i}."
        if kind == "attention":
            out[d + "self_attention.linear_qkv.layer_norm_weight"] = state[
                s + "input_layernorm.weight"
            ]
            out[d + "self_attention.linear_qkv.weight"] = state[s + "mixer.dense_projection.weight"]
            out[d + "self_attention.linear_proj.weight"] = state[s + "mixer.dense.weight"]
            out[d + "self_attention.linear_proj.bias"] = state[s + "mixer.dense.bias"]
        else:
            out[d + "mixer.dense_projection.layer_norm_weight"] = state[
                s + "input_layernorm.weight"
            ]
            out[d + "mixer.dense_projection.weight"] = state[s + "mixer.dense_projection.weight"]
            out[d + "mixer.hyena_proj_conv.short_conv_weight"] = state[
                s + "mixer.hyena_proj_conv.short_conv_weight"
            ]
            out[d + "mixer.dense.weight"] = state[s + "mixer.dense.weight"]
            out[d + "mixer.dense.bias"] = state[s + "mixer.dense.bias"]
            if kind == "hcs":
                out[d + "mixer.mixer.short_conv.short_conv_weight"] = state[
                    s + "mixer.mixer.short_conv.short_conv_weight"
                ]
            else:
                out[d + "mixer.mixer.conv_bias"] = state[s + "mixer.mixer.conv_bias"]
            if kind == "hcm":
                out[d + "mixer.mixer.filter.h"] = state[s + "mixer.mixer.filter.h"][:, :128]
                out[d + "mixer.mixer.filter.decay"] = state[s + "mixer.mixer.filter.decay"][:, :128]
            if kind == "hcl":
                for name in ("gamma", "R", "p"):
                    out[d + f"mixer.mixer.filter.{name}"] = state[s + f"mixer.mixer.filter.{name}"]
        out[d + "mlp.linear_fc1.layer_norm_weight"] = state[s + "pre_mlp_layernorm.weight"]
        out[d + "mlp.linear_fc1.weight"] = torch.cat(
            [state[s + "mlp.w1.weight"], state[s + "mlp.w2.weight"]]
        )
        out[d + "mlp.linear_fc2.weight"] = state[s + "mlp.w3.weight"]
    out["decoder.final_norm.weight"] = state[f"sequential.{cfg.num_layers + 3}.norm.weight"]
    return {
        "module." + k: v.to(torch.float32 if k.endswith(FP32) else torch.bfloat16)
        for k, v in out.items()
    }


def convert(compose_cfg, *overrides):
    return run_convert(OmegaConf.to_object(compose_cfg(list(overrides), config_name="convert")))


@pytest.fixture
def tiny_source(tmp_path):
    cfg = model_config("evo2_tiny")
    path = make_random_savanna_checkpoint(tmp_path / "src", cfg, 256, layout="latest", mp=2, seed=5)
    state, _ = load_module_state_dict(path)
    return cfg, path, {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_torch_dist_reloads_exactly(tmp_path, compose_cfg, tiny_source):
    cfg, source, state = tiny_source
    out = tmp_path / "nemo"
    convert(compose_cfg, "target=nemo", f"source={source}", f"output={out}", "verify=true")
    assert sorted(p.name for p in out.iterdir()) == ["context", "manifest.json", "weights"]
    meta = json.loads((out / "weights" / "metadata.json").read_text())
    assert meta == {
        "sharded_backend": "torch_dist",
        "sharded_backend_version": 1,
        "common_backend": "torch",
        "common_backend_version": 1,
    }
    common = torch.load(out / "weights" / "common.pt", weights_only=True)
    assert common["pytorch-lightning_version"] and "singleton_local_shards" not in str(common)
    graph = json.loads((out / "context" / "io.json").read_text())
    assert graph["version"] == "0.0.1" and graph["root"] == {
        "type": "ref",
        "key": "trainer_context_1",
    }
    assert {
        "trainer_context_1",
        "hyena_model_1",
        "hyena_config_1",
        "byte_level_tokenizer_1",
    } <= graph["objects"].keys()
    assert "HyenaModel" in (out / "context" / "model.yaml").read_text()

    reader = FileSystemReader(str(out / "weights"))
    metadata = reader.read_metadata().state_dict_metadata
    expected = expected_nemo(state, cfg)
    tensors = {k for k, m in metadata.items() if isinstance(m, TensorStorageMetadata)}
    objects = {k for k, m in metadata.items() if isinstance(m, BytesStorageMetadata)}
    assert tensors == set(expected)
    assert "module.output_layer.weight" not in tensors  # tied to the embedding
    # One extra state per TransformerEngine module NeMo's Evo 2 declares (README: output_layer
    # yes, core_attention no).
    assert "module.output_layer._extra_state/shard_0_1" in objects
    assert not any("core_attention" in k for k in objects)
    assert "module.decoder.layers.3.self_attention.linear_qkv._extra_state/shard_0_1" in objects
    assert "module.decoder.layers.0.mlp.linear_fc2._extra_state/shard_0_1" in objects
    assert len(objects) == 1 + 4 * cfg.num_layers

    loaded = {
        k: torch.empty(tuple(metadata[k].size), dtype=metadata[k].properties.dtype) for k in tensors
    }
    byte_items = {}

    class KeepBytes(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO):
            byte_items[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    dcp.load(
        {**loaded, **{k: None for k in objects}},
        storage_reader=reader,
        planner=KeepBytes(flatten_state_dict=False),
        no_dist=True,
    )
    for key, want in expected.items():
        got = loaded[key]
        assert got.dtype == want.dtype and torch.equal(got, want), key
    assert byte_items.keys() == objects
    for value in byte_items.values():  # list-wrapped empty uint8 tensor, not flattened (Megatron)
        assert isinstance(value, list) and value[0].dtype == torch.uint8 and value[0].numel() == 0


def test_zarr_is_readable_by_zarr(tmp_path, compose_cfg, tiny_source):
    cfg, source, state = tiny_source
    out = tmp_path / "zarr"
    convert(
        compose_cfg,
        "target=nemo",
        "target.format=zarr",
        f"source={source}",
        f"output={out}",
        "verify=false",
    )
    weights = out / "weights"
    assert json.loads((weights / "metadata.json").read_text())["sharded_backend"] == "zarr"
    expected = expected_nemo(state, cfg)
    for key, want in expected.items():
        spec = json.loads((weights / key / ".zarray").read_text())
        assert (
            spec["zarr_format"] == 2
            and spec["shape"] == list(want.shape)
            and spec["compressor"] is None
        )
        if want.dtype == torch.float32:
            array = zarr.open_array(str(weights / key), mode="r", zarr_format=2)
            assert array.dtype == "float32" and torch.equal(torch.from_numpy(array[...]), want), key
        else:
            # zarr-python has no bfloat16 dtype: Megatron's "bfloat16" arrays hold the raw 2-byte values.
            assert spec["dtype"] == "bfloat16"
            raw = (weights / key / ".".join("0" * want.dim())).read_bytes()
            assert raw == want.view(torch.int16).numpy().tobytes(), key
    extra = torch.load(
        weights / "module.output_layer._extra_state" / "shard_0_1.pt", weights_only=True
    )
    assert isinstance(extra, torch.Tensor) and extra.numel() == 0  # the object itself, not a list


def test_model_sizes_and_context():
    seven = model_config("evo2_7b")
    assert resolve_model_size(None, seven) == "7b"
    long = model_config("evo2_7b", mlp_inner_size=11264)
    assert (
        resolve_model_size(None, long)
        == "7b_arc_1m"
        == resolve_model_size("7b_arc_longcontext", long)
    )
    assert resolve_model_size(None, model_config("evo2_40b", mlp_inner_size=22528)) == "40b_arc_1m"
    assert resolve_model_size("1b", model_config("evo2_1b")) == "1b"
    with pytest.raises(
        UserError,
        match=r"target.model_size=7b is hidden 4096.*MLP 11008.*matching size is 7b_arc_1m",
    ):
        resolve_model_size("7b", long)
    with pytest.raises(UserError, match="expected one of"):
        resolve_model_size("13b", seven)
    graph = io_json("7b_arc_1m", 4096, long)
    config = graph["objects"]["hyena7b_arclong_context_config_1"]
    metadata = graph["objects"][config["metadata"]["key"]]
    assert metadata["items"][0][1] == {
        "type": "pyref",
        "module": "nemo.collections.llm.gpt.model.hyena",
        "name": "Hyena7bARCLongContextConfig",
    }
    assert config["items"] == [
        [
            "Attr(name='seq_length')",
            {"type": "leaf", "value": 4096, "paths": ["<root>.model.config.seq_length"]},
        ]
    ]


def _stub_nemo_classes(monkeypatch, config_fields: dict) -> dict:
    """Importable stand-ins for the NeMo classes io.json names (fiddle resolves them by module path)."""
    import dataclasses
    import sys
    import types

    config_cls = {
        name: dataclasses.make_dataclass(
            name, [(k, object, None) for k in config_fields.get(name, [])]
        )
        for name in ("HyenaConfig", "Hyena7bARCLongContextConfig")
    }

    class HyenaModel:
        def __init__(self, config=None, tokenizer=None, optim=None):
            self.config, self.tokenizer = config, tokenizer

    class ByteLevelTokenizer:
        def __init__(self, special_tokens=None):
            pass

    class TrainerContext:
        def __init__(self, model=None, trainer=None, extra=None):
            self.model = model

    classes = {
        "nemo.collections.llm.gpt.model.hyena": {**config_cls, "HyenaModel": HyenaModel},
        "nemo.collections.common.tokenizers.bytelevel_tokenizers": {
            "ByteLevelTokenizer": ByteLevelTokenizer
        },
        "nemo.lightning.io.pl": {"TrainerContext": TrainerContext},
    }
    for module_name, members in classes.items():
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
        for cls_name, cls in members.items():
            cls.__module__, cls.__qualname__, cls.__name__ = module_name, cls_name, cls_name
            setattr(sys.modules[module_name], cls_name, cls)
    return {
        **config_cls,
        "HyenaModel": HyenaModel,
        "ByteLevelTokenizer": ByteLevelTokenizer,
        "TrainerContext": TrainerContext,
    }


@pytest.mark.parametrize("size", ["7b_arc_1m", None])
def test_io_json_is_exactly_what_fiddle_writes(monkeypatch, size):
    """Our io.json equals fiddle's own dump_json of the same fdl.Config graph, and loads back."""
    import fiddle as fdl  # test extra
    from fiddle._src.experimental import serialization

    from evo2_hydra.checkpoint.adapters.nemo import config_class, config_overrides

    cfg = model_config("evo2_7b", mlp_inner_size=11264) if size else model_config("evo2_tiny")
    overrides = config_overrides(size, cfg, 4096)
    cls = _stub_nemo_classes(monkeypatch, {config_class(size): list(overrides)})
    graph = fdl.Config(
        cls["TrainerContext"],
        model=fdl.Config(
            cls["HyenaModel"],
            config=fdl.Config(cls[config_class(size)], **overrides),
            tokenizer=fdl.Config(cls["ByteLevelTokenizer"]),
        ),
    )
    ours = io_json(size, 4096, cfg)
    assert json.dumps(ours) == serialization.dump_json(graph)
    built = fdl.build(serialization.load_json(json.dumps(ours)))
    assert built.model.config.seq_length == 4096
    assert isinstance(built.model.tokenizer, cls["ByteLevelTokenizer"])
