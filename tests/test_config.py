"""The config tree: every shipped option composes and validates; bad input fails naming the key."""

from __future__ import annotations

import pytest

from evo2_hydra.config import ClusterKind, ConfigError, Packing, RunConfig, Task
from tests.conftest import CONF, to_obj

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
CKPTS = sorted(p.stem for p in (CONF / "ckpt").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
CLUSTERS = sorted(p.stem for p in (CONF / "cluster").glob("*.yaml"))
TARGETS = sorted(p.stem for p in (CONF / "target").glob("*.yaml"))


def test_required_options_exist():
    assert {"evo2_1b", "evo2_7b", "evo2_40b", "evo2_tiny"} <= set(MODELS)
    assert {"local", "slurm"} <= set(CLUSTERS)
    assert {"vortex", "nemo", "savanna"} <= set(TARGETS)
    assert {
        "savanna_evo2_1b_base",
        "savanna_evo2_7b_base",
        "savanna_evo2_7b",
        "savanna_evo2_40b_base",
        "savanna_evo2_40b",
    } <= set(CKPTS)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes_with_its_default_ckpt(compose_cfg, model):
    run = to_obj(compose_cfg([f"model={model}"]))
    assert isinstance(run, RunConfig)
    assert run.model.name == model
    assert run.ckpt.model == model


@pytest.mark.parametrize("ckpt", [c for c in CKPTS if c.startswith("savanna_")])
def test_every_preset_composes_with_its_model(compose_cfg, ckpt):
    model = "evo2_" + ckpt.split("_")[2]
    run = to_obj(compose_cfg([f"model={model}", f"ckpt={ckpt}"]))
    assert run.ckpt.name == ckpt
    assert run.model.mlp_inner_size == run.ckpt.mlp_inner_size


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("cluster", CLUSTERS)
def test_data_and_cluster_options_compose(compose_cfg, data, cluster):
    run = to_obj(compose_cfg([f"data={data}", f"cluster={cluster}"]))
    assert run.cluster.kind == ClusterKind(cluster)


@pytest.mark.parametrize("target", TARGETS)
def test_convert_targets_compose(compose_cfg, target):
    conv = to_obj(compose_cfg([f"target={target}"], config_name="convert"))
    assert conv.target.kind.value == target


def test_product_command_lines_compose(compose_cfg):
    run = to_obj(compose_cfg(["model=evo2_7b", "data.packing=padded", "ckpt.context=4096"]))
    assert (run.model.name, run.data.packing, run.ckpt.context) == ("evo2_7b", Packing.padded, 4096)
    assert run.task == Task.finetune
    for context in (4096, 8192, 16384):  # the points of `-m ... ckpt.context=4096,8192,16384`
        assert (
            to_obj(compose_cfg(["model=evo2_7b", f"ckpt.context={context}"])).ckpt.context
            == context
        )
    conv = to_obj(compose_cfg(["target=vortex"], config_name="convert"))
    assert conv.target.kind.value == "vortex"


def test_architecture_values_follow_the_spec(compose_cfg):
    expect = {
        # name: hidden, layers, heads, hcs/hcm groups, mlp, rope base, pattern
        "evo2_1b": (1920, 25, 15, 128, 5120, 1e4, "SDH*SDHSDH*SDHSDH*SDHSDH*"),
        "evo2_7b": (4096, 32, 32, 256, 11008, 1e4, "SDH*SDHSDH*SDHSDH*SDHSDH*SDHSDH*"),
        "evo2_40b": (
            8192,
            50,
            64,
            512,
            21888,
            1e6,
            "SDH*SDHSDH*SDHSDH*SDHSDH*SDHSDH*SDH*SDHSDH*SDHSDH*",
        ),
        "evo2_tiny": (64, 8, 4, 4, 128, 1e4, "SDH*SDH*"),
    }
    for name, (hidden, layers, heads, groups, mlp, base, pattern) in expect.items():
        m = to_obj(compose_cfg([f"model={name}"])).model
        assert (m.hidden_size, m.num_layers, m.num_attention_heads) == (hidden, layers, heads)
        assert (m.hcs_groups, m.hcm_groups, m.hcl_groups) == (groups, groups, hidden)
        assert (m.mlp_inner_size, m.rope_base, m.operator_pattern) == (mlp, base, pattern)
        assert (m.featurizer_conv_len, m.hcs_filter_len, m.hcm_filter_len) == (3, 7, 128)
        assert (m.hcl_modal_order, m.vocab_size, m.norm_eps, m.tie_embeddings) == (
            16,
            512,
            1e-6,
            True,
        )
    tiny = to_obj(compose_cfg(["model=evo2_tiny"])).model
    assert tiny.layer_types() == ["hcs", "hcm", "hcl", "attention"] * 2
    assert tiny.head_dim == 16


def test_1m_presets_patch_the_model(compose_cfg):
    m = to_obj(compose_cfg(["model=evo2_7b", "ckpt=savanna_evo2_7b"])).model
    assert (m.mlp_inner_size, m.rope_scaling_factor) == (11264, 128.0)
    m = to_obj(compose_cfg(["model=evo2_40b", "ckpt=savanna_evo2_40b"])).model
    assert (m.mlp_inner_size, m.rope_scaling_factor) == (22528, 128.0)


def test_post_init_rules(compose_cfg):
    with pytest.raises(ConfigError, match="ckpt.context=-1"):
        to_obj(compose_cfg(["ckpt.context=-1"]))
    with pytest.raises(ConfigError, match="max_context"):
        to_obj(compose_cfg(["model=evo2_1b", "ckpt.context=16384"]))
    with pytest.raises(ConfigError, match="checkpoint of evo2_7b"):
        to_obj(compose_cfg(["model=evo2_1b", "ckpt=savanna_evo2_7b"]))
    with pytest.raises(ConfigError, match="operator_pattern"):
        to_obj(compose_cfg(["model.operator_pattern=SDH"]))
    with pytest.raises(ConfigError, match="train.zero_stage"):
        to_obj(compose_cfg(["train.zero_stage=4"]))
    with pytest.raises(ConfigError, match="one byte"):
        to_obj(compose_cfg(["data.condition.tokens={A: '12'}"]))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.pakcing=padded", "pakcing"),
        ("data.packing=spiral", "packing"),
        ("ckpt.context=-1", "ckpt.context"),
        ("ckpt.context=abc", "context"),
        ("model=evo2_3b", "evo2_3b"),
        ("train.zero_stage=7", "train.zero_stage"),
    ],
)
def test_bad_input_fails_naming_the_key(run_entry, tmp_path, override, key):
    proc = run_entry("launch.py", override, "task=plan")
    assert proc.returncode != 0
    assert key in proc.stdout + proc.stderr
    runs = tmp_path / "outputs" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a run that never started left a folder"


def test_cfg_job_prints_the_overrides(run_entry):
    proc = run_entry(
        "launch.py", "--cfg", "job", "model=evo2_7b", "data.packing=padded", "ckpt.context=4096"
    )
    assert proc.returncode == 0, proc.stderr
    assert "packing: padded" in proc.stdout
    assert "context: 4096" in proc.stdout
    assert "name: evo2_7b" in proc.stdout


def test_convert_cfg_composes(run_entry):
    proc = run_entry("convert.py", "--cfg", "job", "target=vortex")
    assert proc.returncode == 0, proc.stderr
    assert "kind: vortex" in proc.stdout


def test_plan_leaves_no_empty_run_folder(run_entry, tmp_path):
    proc = run_entry("launch.py", "task=plan", "model=evo2_7b", "ckpt.context=8192")
    assert proc.returncode == 0, proc.stderr
    runs = tmp_path / "outputs" / "runs"
    assert not runs.exists() or not any(runs.iterdir())
