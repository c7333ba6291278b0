"""The config tree: every shipped option composes and validates; bad input fails naming the key."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from evo2_hydra.config import ClusterKind, ConfigError, Dtype, Packing, RunConfig, Task
from tests.conftest import CONF, REPO, to_obj

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
    assert run.ckpt.model == model


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
        assert (m.hcl_modal_order, m.vocab_size, m.norm_eps) == (16, 512, 1e-6)
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
        ("+data.pakcing=padded", "pakcing"),  # Hydra's own suggestion for the line above
        ("+pakcing=padded", "pakcing"),
        ("seed=1e23", "seed"),
        ("train.steps=9223372036854775808", "train.steps"),
        ("train.lr=nan", "train.lr"),
    ],
)
def test_bad_input_fails_naming_the_key(run_entry, tmp_path, override, key):
    proc = run_entry("launch.py", override, "task=plan")
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
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


# ----------------------------------------------------------------------------------------------
# The printed config is the config that runs (issue #17)


def _as_yaml(run) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(run))


@pytest.mark.parametrize("ckpt", [c for c in CKPTS if c.startswith("savanna_")])
def test_composed_config_is_what_runs(compose_cfg, ckpt):
    """What `--cfg job` prints (the composed config) equals the dataclasses the run receives.

    The 1M presets used to patch model values in `__post_init__`, so `--cfg job` showed 11008
    while the run used 11264.
    """
    model = "evo2_" + ckpt.split("_")[2]
    cfg = compose_cfg([f"model={model}", f"ckpt={ckpt}"])
    printed = OmegaConf.to_container(cfg, resolve=True)
    run = to_obj(cfg)
    assert printed == OmegaConf.to_container(OmegaConf.structured(run), resolve=True)


def test_cfg_job_shows_the_preset_model_values(run_entry):
    proc = run_entry("launch.py", "--cfg", "job", "model=evo2_7b", "ckpt=savanna_evo2_7b")
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert (printed.model.mlp_inner_size, printed.model.rope_scaling_factor) == (11264, 128.0)


@pytest.mark.parametrize("ckpt", ["evo2_tiny", "savanna_evo2_7b", "savanna_evo2_40b"])
def test_saved_config_recomposes_to_the_same_run(compose_cfg, ckpt):
    from evo2_hydra.train.run import config_yaml

    model = "evo2_tiny" if ckpt == "evo2_tiny" else "evo2_" + ckpt.split("_")[2]
    run = to_obj(compose_cfg([f"model={model}", f"ckpt={ckpt}", "train.steps=7"]))
    saved = yaml.safe_load(config_yaml(run))
    again = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), saved))
    assert again == run


def test_command_line_wins_over_the_preset(compose_cfg):
    m = to_obj(compose_cfg(["model=evo2_7b", "ckpt=savanna_evo2_7b", "model.mlp_inner_size=11008"]))
    assert m.model.mlp_inner_size == 11008


# ----------------------------------------------------------------------------------------------
# Dead fields, targets own their knobs, one dtype spelling


def test_dead_fields_are_gone():
    from evo2_hydra.config import CkptConfig, ConvertConfig, DataConfig, ModelConfig

    names = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (DataConfig, ConvertConfig)}
    assert "seed" not in names[DataConfig]
    assert not {"output_dir", "nemo", "savanna"} & names[ConvertConfig]
    assert "tie_embeddings" not in {f.name for f in dataclasses.fields(ModelConfig)}
    assert not {"mlp_inner_size", "rope_scaling_factor"} & {
        f.name for f in dataclasses.fields(CkptConfig)
    }


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        (["target=nemo", "target.format=zarr"], {"kind": "nemo", "format": "zarr"}),
        (["target=savanna", "target.mp=2", "target.dtype=float32"], {"mp": 2, "dtype": "float32"}),
        (["target=vortex"], {"kind": "vortex"}),
    ],
)
def test_each_target_owns_its_knobs(compose_cfg, overrides, expect):
    conv = to_obj(compose_cfg(overrides, config_name="convert"))
    got = {k: getattr(conv.target, k) for k in expect}
    assert {k: getattr(v, "value", v) for k, v in got.items()} == expect


@pytest.mark.parametrize(
    "overrides",
    [
        ["target=vortex", "target.format=zarr"],
        ["target=vortex", "target.mp=2"],
        ["target=nemo", "target.mp=2"],
        ["target=savanna", "target.format=zarr"],
    ],
)
def test_another_targets_knob_is_refused(compose_cfg, overrides):
    with pytest.raises(ConfigCompositionException, match="Could not override 'target"):
        compose_cfg(overrides, config_name="convert")


@pytest.mark.parametrize("key", ["train.precision", "score.dtype", "generate.dtype"])
def test_one_dtype_spelling(compose_cfg, key):
    run = to_obj(compose_cfg([f"{key}=bfloat16"]))
    section, name = key.split(".")
    assert getattr(getattr(run, section), name) == Dtype.bfloat16
    with pytest.raises(ConfigCompositionException):
        compose_cfg([f"{key}=bf16"])


# ----------------------------------------------------------------------------------------------
# Unknown keys, compose-time validation (issue #13 item 13)


def test_unknown_keys_are_refused_however_added(compose_cfg):
    from evo2_hydra.config import check_known_keys

    for override in ("+data.pakcing=padded", "+train.lr_max=1", "+typo=1"):
        with pytest.raises(ConfigError, match="unknown key"):
            check_known_keys(compose_cfg([override]))
    check_known_keys(compose_cfg(["+data.condition.tokens.C=3"]))  # a dict field takes any key


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=-1 train.min_lr=0", "train.lr=-1"),  # (min_lr=0: not caught as min_lr > lr)
        ("train.lr=nan", "train.lr"),
        ("train.lr=inf", "train.lr"),
        ("train.min_lr=-1e-6", "train.min_lr"),
        ("train.adam_beta1=2", "train.adam_beta1"),
        ("train.adam_beta2=1.0", "train.adam_beta2"),
        ("train.adam_eps=0", "train.adam_eps"),
        ("train.weight_decay=nan", "train.weight_decay"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("seed=-1", "seed"),
        ("train.steps=9223372036854775808", "train.steps"),
        ("train.log_every=0", "train.log_every"),
        ("train.eval_steps=0", "train.eval_steps"),
        ("train.keep_last=0", "train.keep_last"),
        ("generate.temperature=nan", "generate.temperature"),
        ("generate.seed=-5", "generate.seed"),
        ("cluster.gpu_memory_gb=inf", "cluster.gpu_memory_gb"),
        ("model.rope_base=0", "model.rope_base"),
    ],
)
def test_bad_values_are_refused_at_compose_time(compose_cfg, override, key):
    """Each case was accepted by the first build (checked against its commit 60682c2)."""
    with pytest.raises(ConfigError, match=re.escape(key)):
        to_obj(compose_cfg(override.split()))


def test_a_refused_value_leaves_no_run_folder(run_entry, tmp_path):
    """A crash on a bad value used to leave config.yaml behind, which blocked the fixed command."""
    proc = run_entry("launch.py", "train.lr=-1", "train.min_lr=0")
    assert proc.returncode == 2 and "train.lr=-1" in proc.stderr, proc.stderr
    runs = tmp_path / "outputs" / "runs"
    assert not runs.exists() or not any(runs.iterdir())


# ----------------------------------------------------------------------------------------------
# --resolve, dry run, --help, no Hydra below the CLI


@pytest.mark.parametrize("script", ["launch.py", "convert.py"])
def test_cfg_job_resolve_works(run_entry, script):
    proc = run_entry(script, "--cfg", "job", "--resolve")
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert "${" not in proc.stdout
    if script == "launch.py":
        assert printed.output_dir.endswith(f"runs/{printed.run_name}")


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_dry_run_runs_nothing(run_entry, tmp_path, cluster):
    extra = ["cluster.partition=debug", "cluster.gpus_per_node=0"] if cluster == "slurm" else []
    proc = run_entry("launch.py", "dry_run=true", f"cluster={cluster}", *extra, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for part in ("batch plan: 4 (micro batch)", "DeepSpeed config: {", "memory: ", "run folder:"):
        assert part in proc.stdout, proc.stdout
    out = tmp_path / "outputs"
    made = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    # (Hydra records a multirun's overrides in the sweep folder before any launcher runs)
    assert not [p for p in made if p.name != "multirun.yaml"], made
    assert not (out / "cache").exists()


@pytest.mark.parametrize("script", ["launch.py", "convert.py"])
def test_help_shows_the_field_docs(run_entry, script):
    proc = run_entry(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "== Config groups (group=option) ==" in proc.stdout
    if script == "launch.py":
        assert "Tokens per sample the run trains at" in proc.stdout  # CkptConfig.context's doc
        assert "savanna_evo2_7b" in proc.stdout and "finetune" in proc.stdout
    else:
        assert "target.format" in proc.stdout and "Weight storage" in proc.stdout


def test_help_and_field_reference_are_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_help.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_field_has_a_docstring():
    from scripts.render_help import parse_schema

    classes, _ = parse_schema()
    missing = [f"{c}.{f.name}" for c, fields in classes.items() for f in fields if not f.doc]
    assert not missing


def test_model_package_imports_no_hydra():
    code = (
        "import sys, evo2_hydra.model, evo2_hydra.config; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('hydra', 'submitit')]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


PATH_FIELD = re.compile(r"(^|_)(input|output|path|reference|variants|prompts|tsv|dir|root)$")


def test_sweep_folder_names_leave_out_every_path():
    """A path in a sweep point's folder name (override_dirname) would nest folders by its
    slashes: every path-valued key is excluded (a whole excluded group counts)."""
    import typing

    from evo2_hydra import config as config_module

    def keys(cls, prefix=""):
        out = []
        for name, kind in typing.get_type_hints(cls, vars(config_module)).items():
            if dataclasses.is_dataclass(kind):
                out += keys(kind, f"{prefix}{name}.")
            elif PATH_FIELD.search(name):
                out.append(prefix + name)
        return out

    excluded = set(
        yaml.safe_load((CONF / "train.yaml").read_text())["hydra"]["job"]["config"][
            "override_dirname"
        ]["exclude_keys"]
    )
    path_keys = keys(RunConfig)
    assert {"score.input", "vep.reference", "data.input", "ckpt.path"} <= set(path_keys)
    missing = [k for k in path_keys if k not in excluded and k.split(".")[0] not in excluded]
    assert not missing, f"add to hydra.job.config.override_dirname.exclude_keys: {missing}"
