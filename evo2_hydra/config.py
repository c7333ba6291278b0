"""Typed run configuration: the schema every YAML file under ``conf/`` fills in.

Dataclasses say *what* can be configured; ``conf/`` says *which values*; Hydra's config groups say
*which combination*. The root schemas (``RunConfig`` for ``launch.py``, ``ConvertConfig`` for
``convert.py``) are stored in Hydra's ConfigStore, so a misspelled key or a value of the wrong type
fails at compose time, and cross-field rules run in ``__post_init__`` when the entry point converts
the composed config to objects (``OmegaConf.to_object``).

Each module receives only its own slice (``build_model(run.model, ...)``, ``prepare_data(run.data,
...)``), never the whole run config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class ConfigError(ValueError):
    """A configuration value that is well-typed but not acceptable; the message names the key."""


# ----------------------------------------------------------------------------------------------
# Enums (OmegaConf 2.3 has no Literal support; str-valued Enums round-trip through YAML).


class Task(str, Enum):
    finetune = "finetune"
    preprocess = "preprocess"
    plan = "plan"
    score = "score"
    generate = "generate"


class Packing(str, Enum):
    padded = "padded"  # one document per sample, right-padded to ckpt.context
    contiguous = "contiguous"  # GPT-style windows of context+1 tokens over concatenated documents


class ToUpper(str, Enum):
    none = "none"  # train on tokens as they are
    upper = "upper"  # upper-case inputs and labels
    weighted = "weighted"  # upper-case; lowercase labels weighted, divided by the mask sum
    normalized_weighted = (
        "normalized_weighted"  # as Evo 2 trained: weights renormalised per micro-batch
    )


class OnError(str, Enum):
    fail = "fail"
    skip = "skip"


class Precision(str, Enum):
    bf16 = "bf16"
    fp32 = "fp32"


class DecayStyle(str, Enum):
    cosine = "cosine"
    linear = "linear"
    exponential = "exponential"
    constant = "constant"


class NoDecaySet(str, Enum):
    savanna = "savanna"  # savanna's exact (odd) groups: see spec savanna.md §7.1
    conventional = "conventional"  # no decay for every norm, bias, filter and embedding


class DecayPreset(str, Enum):
    strong = "strong"
    normal = "normal"
    weak = "weak"


class ClusterKind(str, Enum):
    local = "local"
    slurm = "slurm"


class Device(str, Enum):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class OutputFormat(str, Enum):
    text = "text"
    json = "json"


class ScoreDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class TargetKind(str, Enum):
    vortex = "vortex"
    nemo = "nemo"
    savanna = "savanna"


class NemoFormat(str, Enum):
    torch_dist = "torch_dist"
    zarr = "zarr"


class PeftMethod(str, Enum):
    none = "none"  # full finetune: every parameter trains
    lora = "lora"  # low-rank adapters through `peft`; the base stays frozen


class Offload(str, Enum):
    none = "none"
    optimizer = "optimizer"  # ZeRO-Offload: optimizer states (and the fp32 master) in CPU memory
    optimizer_and_params = "optimizer_and_params"  # ZeRO-Infinity to CPU (needs zero_stage=3)


class CastDtype(str, Enum):
    keep = "keep"
    bfloat16 = "bfloat16"
    float32 = "float32"


# ----------------------------------------------------------------------------------------------
# Model


OPERATOR_SYMBOLS = {"S": "hcs", "D": "hcm", "H": "hcl", "*": "attention"}


@dataclass
class ModelConfig:
    """StripedHyena 2 architecture (no paths, no context length: those belong to ``ckpt``)."""

    name: str = MISSING
    hidden_size: int = MISSING
    num_layers: int = MISSING
    # One symbol per layer: S = hcs (Hyena-SE), D = hcm (Hyena-MR), H = hcl (Hyena-LI), * = attention.
    operator_pattern: str = MISSING
    num_attention_heads: int = MISSING
    hcs_groups: int = MISSING  # savanna num_groups_hyena_short
    hcm_groups: int = MISSING  # savanna num_groups_hyena_medium
    hcl_groups: int = MISSING  # savanna num_groups_hyena (= hidden_size: one filter per channel)
    featurizer_conv_len: int = 3  # savanna short-conv-L, the depthwise conv over the 3D projection
    hcs_filter_len: int = 7  # savanna hyena_se_len
    hcm_filter_len: int = 128  # savanna hyena_mr_len
    hcl_modal_order: int = 16  # savanna hyena_filter_order
    hcm_decay_preset: DecayPreset = DecayPreset.weak  # only used to initialise a fresh model
    mlp_inner_size: int = MISSING  # F; the 1M releases pad it (ckpt presets set that)
    vocab_size: int = 512
    rope_base: float = 10000.0  # only for a fresh model: loaded checkpoints carry inv_freq
    rope_scaling_factor: float = 1.0  # positions are divided by this (128 for the 1M releases)
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    max_context: int = 8192  # longest context (tokens) this size supports

    def __post_init__(self) -> None:
        if self.name is MISSING or self.hidden_size is MISSING:
            return  # partially specified schema node (e.g. during composition)
        if len(self.operator_pattern) != self.num_layers:
            raise ConfigError(
                f"model.operator_pattern has {len(self.operator_pattern)} symbols but "
                f"model.num_layers={self.num_layers}"
            )
        bad = set(self.operator_pattern) - set(OPERATOR_SYMBOLS)
        if bad:
            raise ConfigError(
                f"model.operator_pattern: unknown symbols {sorted(bad)}; expected S, D, H or *"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        for key in ("hcs_groups", "hcm_groups", "hcl_groups"):
            groups = getattr(self, key)
            if groups <= 0 or self.hidden_size % groups:
                raise ConfigError(
                    f"model.{key}={groups} must be positive and divide "
                    f"model.hidden_size={self.hidden_size}"
                )
        if self.rope_scaling_factor <= 0:
            raise ConfigError("model.rope_scaling_factor must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_types(self) -> list[str]:
        """Operator name per layer: 'hcs', 'hcm', 'hcl' or 'attention'."""
        return [OPERATOR_SYMBOLS[s] for s in self.operator_pattern]


# ----------------------------------------------------------------------------------------------
# Checkpoint (starting weights + the context the run trains at)


@dataclass
class CkptConfig:
    """Where the starting weights come from, and what the weights themselves cannot say."""

    name: str = "none"  # preset name (savanna_evo2_7b, ...) or the model name for a plain choice
    model: str | None = None  # model size this preset was released for; None = any
    # A savanna .pt file, a global_stepN folder, a folder holding `latest`, or one of our run folders.
    path: str | None = None
    context: int = (
        8192  # tokens per sample the run trains at; context-dependent filters are resized to it
    )
    source_context: int | None = (
        None  # width of filter.h/decay/t in the file; None = read it from the file
    )
    mlp_inner_size: int | None = None  # overrides model.mlp_inner_size (1M releases: 11264 / 22528)
    rope_scaling_factor: float | None = None  # overrides model.rope_scaling_factor
    interleave_legacy: bool = False  # convert non-interleaved (legacy) projections on load
    # Allow full pickle loading (runs arbitrary code!). Only for files you trust.
    trust_pickle: bool = False
    random_init: bool = False  # start from freshly initialised weights when no path is given
    # Zero-pad a narrower MLP in the file (w1/w2 rows, w3 columns) to the model's MLP width, as the
    # 1M releases are padded (e.g. an 11008-wide 7B file to 11264). Off: a width mismatch is an error.
    pad_mlp: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.context, int) or self.context <= 0:
            raise ConfigError(f"ckpt.context={self.context}: must be a positive number of tokens")
        if self.source_context is not None and self.source_context <= 0:
            raise ConfigError(f"ckpt.source_context={self.source_context}: must be positive")


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class ConditionConfig:
    """Prepend a conditioning token chosen by a JSONL field (e.g. clade A -> '1')."""

    # (`tokens` comes first: the attribute `field` would shadow dataclasses.field below it)
    tokens: dict[str, str] = field(default_factory=dict)  # class name -> single-byte token
    field: str | None = (
        None  # JSONL field holding the class name; None = sequences used as they are
    )


@dataclass
class DataConfig:
    # Training input: JSONL (.jsonl / .jsonl.gz) path(s), or BIN/IDX prefix(es). One path or a list.
    input: Any = None
    valid_input: Any = None  # validation input(s); None = carve it out of `input` with `split`
    test_input: Any = None
    weights: list[float] | None = None  # blending weights, one per training input; None = by size
    split: str = "969,30,1"  # train,valid,test document split when no valid_input is given
    output_prefix: str | None = None  # task=preprocess: where the .bin/.idx go
    packing: Packing = Packing.padded
    append_eod: bool = True  # EOD (0) after each document
    text_key: str = "text"
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    truncate: bool = False  # padded mode: cut documents longer than the context instead of failing
    on_error: OnError = OnError.fail  # bad JSONL lines: fail, or skip and count them
    to_upper: ToUpper = ToUpper.normalized_weighted
    lowercase_weight: float = 0.1  # loss weight of lowercase labels (to_upper weighted modes)
    mask_control_tags: bool = True  # drop phylogenetic tag spans from the loss (savanna §5.3)
    eod_mask_loss: bool = False  # savanna's input-side masks: drop positions whose input is EOD
    pad_mask_loss: bool = False  # ... or PAD (padded mode masks PAD labels regardless)
    # Preprocessing processes; 0 = automatic (cores - 1, at most 8, for inputs over 48 MB on 4+ cores).
    workers: int = 0
    cache_dir: str = "${paths.cache_dir}/data"  # preprocessed data, keyed by a content hash
    seed: int = 1234  # sample shuffling seed (pass it as build_train_stream's seed)

    def __post_init__(self) -> None:
        if not 0.0 <= self.lowercase_weight <= 1.0:
            raise ConfigError(f"data.lowercase_weight={self.lowercase_weight}: expected 0..1")
        for name, token in self.condition.tokens.items():
            if len(str(token).encode("utf-8")) != 1:
                raise ConfigError(
                    f"data.condition.tokens.{name}={token!r}: a conditioning token must be one byte"
                )

    @staticmethod
    def as_list(value: Any) -> list[str]:
        """Normalise a one-path-or-list value to a list of strings."""
        if value is None:
            return []
        if isinstance(value, str):
            return [p for p in value.split(",") if p]
        return [str(v) for v in value]


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps (savanna train-iters)
    micro_batch_size: int = 1  # samples per GPU per micro-step
    grad_accum_steps: int = 1
    zero_stage: int = 1
    precision: Precision = Precision.bf16
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup: float = 0.05  # fraction of lr_decay_steps spent warming up (savanna `warmup`)
    decay_style: DecayStyle = DecayStyle.cosine
    lr_decay_steps: int | None = None  # None = steps
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    no_decay_set: NoDecaySet = NoDecaySet.savanna
    grad_clip: float = 1.0
    # recompute each block in backward (savanna finetunes checkpoint every layer; the demo turns it off)
    activation_checkpointing: bool = True
    save_every: int = 100  # steps between checkpoints (and one at the end)
    keep_last: int = 2  # checkpoints kept; older ones are pruned
    eval_every: int = 50
    eval_steps: int = 10  # validation micro-batches per evaluation
    log_every: int = 1
    resume: bool = True  # continue from the latest checkpoint in the output folder
    # Move optimizer states (ZeRO-1/2/3) or also the parameters (ZeRO-3) to CPU memory.
    offload: Offload = Offload.none

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage={self.zero_stage}: expected 0, 1, 2 or 3")
        if self.offload != Offload.none and self.zero_stage == 0:
            raise ConfigError(
                f"train.offload={self.offload.value} needs ZeRO (train.zero_stage=1, 2 or 3)"
            )
        if self.offload == Offload.optimizer_and_params and self.zero_stage != 3:
            raise ConfigError(
                "train.offload=optimizer_and_params offloads partitioned parameters: it needs "
                f"train.zero_stage=3 (got {self.zero_stage}); use train.offload=optimizer"
            )
        for key in ("steps", "micro_batch_size", "grad_accum_steps", "save_every", "eval_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}={getattr(self, key)}: must be positive")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"train.warmup={self.warmup}: expected a fraction in [0, 1)")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} is above train.lr={self.lr}")


# ----------------------------------------------------------------------------------------------
# Parameter-efficient finetuning


DEFAULT_LORA_TARGETS = [
    "mixer.dense_projection",  # hyena/attention input projection (BioNeMo: dense_projection)
    "mixer.dense",  # mixer output projection (BioNeMo CLI default includes it)
    "mlp.w1",
    "mlp.w2",
    "mlp.w3",
]


@dataclass
class PeftConfig:
    """`peft=none` (default) or `peft=lora` (conf/peft/); BioNeMo's Evo 2 LoRA defaults."""

    method: PeftMethod = PeftMethod.none
    rank: int = 16  # LoRA r
    alpha: float = 32.0  # scale alpha / r
    dropout: float = 0.1  # dropout on the adapter input
    # Module-name patterns: a name ending in the pattern (`mlp.w1`) or an fnmatch pattern on the
    # full name (`sequential.2.*.dense`). Only nn.Linear modules can be adapted.
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.method == PeftMethod.none:
            return
        if self.rank <= 0:
            raise ConfigError(f"peft.rank={self.rank}: must be a positive number")
        if self.alpha <= 0:
            raise ConfigError(f"peft.alpha={self.alpha}: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout={self.dropout}: expected a probability in [0, 1)")
        if not self.targets:
            raise ConfigError("peft.targets is empty: name at least one module pattern")

    @property
    def enabled(self) -> bool:
        return self.method != PeftMethod.none


# ----------------------------------------------------------------------------------------------
# Cluster


@dataclass
class ClusterConfig:
    """Where processes run. Site values (partition, account, ...) come from conf/local or env vars."""

    kind: ClusterKind = ClusterKind.local
    device: Device = Device.auto
    tasks: int = 1  # local: processes on this machine
    gpu_memory_gb: float = 80.0  # memory per GPU, for the plan's fits/does-not-fit verdict
    # Slurm (cluster=slurm); hydra.launcher interpolates these.
    partition: str | None = None  # site value, required for cluster=slurm
    account: str | None = None  # site value (sbatch --account), when the site needs one
    qos: str | None = None  # site value (sbatch --qos)
    nodes: int = 1  # nodes per job
    gpus_per_node: int = 0  # one task per GPU; 0 for CPU partitions (then tasks_per_node counts)
    tasks_per_node: int = 1  # processes per node when gpus_per_node=0
    cpus_per_task: int = 1  # CPUs per process (data loading threads)
    mem_gb: int | None = None  # memory per node in GB; None = the site default
    timeout_min: int = 60  # job time limit in minutes
    constraint: str | None = None  # sbatch --constraint (node features, e.g. h100)
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # extra sbatch options
    setup: list[str] = field(default_factory=list)  # lines run before the task (module load, env)
    # Requeue on timeout this many times. Safe only because training auto-resumes from `latest`.
    max_num_timeout: int = 0
    array_parallelism: int = 256  # sweep points running at once (sbatch --array=...%N)
    # Wait for the jobs and report failures (the submitting shell stays busy); false = print the
    # job ids and log paths, then return.
    wait: bool = True

    def __post_init__(self) -> None:
        for key in ("tasks", "nodes", "tasks_per_node", "cpus_per_task", "timeout_min"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"cluster.{key}={getattr(self, key)}: must be positive")
        if self.gpus_per_node < 0:
            raise ConfigError(f"cluster.gpus_per_node={self.gpus_per_node}: must be >= 0")

    @property
    def world_size(self) -> int:
        """Processes the run expects: nodes x (GPUs per node, or tasks per node on CPU)."""
        if self.kind == ClusterKind.local:
            return self.tasks
        per_node = self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node
        return self.nodes * per_node


# ----------------------------------------------------------------------------------------------
# Task-specific slices


@dataclass
class PlanConfig:
    format: OutputFormat = OutputFormat.text
    force: bool = False  # submit even when the memory plan says the run does not fit


@dataclass
class ScoreConfig:
    input: str | None = None  # JSONL with sequences to score
    output: str | None = None  # output folder (must not exist yet); None = <run folder>/score
    text_key: str = "text"  # JSONL field holding the sequence
    logits: bool = False  # also write [L, 512] float32 logits per sequence (.npy)
    dtype: ScoreDtype = ScoreDtype.float32
    batch_size: int = 1  # sequences per forward pass (right-padded; causal, so padding is inert)
    reverse_complement: bool = False  # average with the reverse complement's score
    log_probs: bool = False  # also write per-position log-probabilities [L-1] float32 (.npy)

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"score.batch_size={self.batch_size}: must be positive")


@dataclass
class GenerateConfig:
    prompt: str = ""  # text the sequences continue (printable ASCII; after the condition token)
    condition: str | None = None  # a class name from the run's conditioning mapping
    n: int = 1  # sequences to sample
    length: int = 100  # new tokens per sequence (at most; stops earlier at EOD)
    temperature: float = 1.0  # softmax temperature; 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set of tokens with this much probability; 1.0 = off
    seed: int = 0  # sampling seed (same seed, settings and weights -> same sequences)
    cached: bool = True  # incremental decoding with hyena/attention caches (false: re-forward)
    batch_size: int = 16  # sequences sampled together
    dtype: ScoreDtype = ScoreDtype.float32  # compute dtype of the model
    # torch threads on CPU; 0 = auto: 1 below hidden_size 1024 (per-token ops too small to split:
    # 2 threads made evo2_tiny ~17x slower), else torch's default
    cpu_threads: int = 0
    output: str | None = None  # output folder; None = <run folder>/generations/<time>

    def __post_init__(self) -> None:
        for key in ("n", "length", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"generate.{key}={getattr(self, key)}: must be positive")
        if self.cpu_threads < 0:
            raise ConfigError(f"generate.cpu_threads={self.cpu_threads}: must be >= 0 (0 = auto)")
        if self.temperature < 0:
            raise ConfigError(f"generate.temperature={self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise ConfigError(f"generate.top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"generate.top_p={self.top_p}: expected a value in (0, 1]")


@dataclass
class PathsConfig:
    output_root: str = "outputs"  # every run folder lives below this
    cache_dir: str = "${paths.output_root}/cache"  # prepared data and checkpoints, shared by sweeps


# ----------------------------------------------------------------------------------------------
# Root configs


def check_model_ckpt(model: ModelConfig, ckpt: CkptConfig) -> None:
    """Apply the checkpoint preset's patches to the model and check the pair is consistent."""
    if ckpt.model is not None and ckpt.model != model.name:
        raise ConfigError(
            f"ckpt={ckpt.name} is a checkpoint of {ckpt.model}, but model={model.name}; "
            f"choose model={ckpt.model} or another ckpt"
        )
    if ckpt.mlp_inner_size is not None:
        model.mlp_inner_size = ckpt.mlp_inner_size
    if ckpt.rope_scaling_factor is not None:
        model.rope_scaling_factor = ckpt.rope_scaling_factor
    if ckpt.context > model.max_context:
        raise ConfigError(
            f"ckpt.context={ckpt.context} exceeds model.max_context={model.max_context} "
            f"for {model.name}"
        )


@dataclass
class RunConfig:
    """Root config of launch.py."""

    task: Task = Task.finetune
    run_name: str = "${model.name}-ctx${ckpt.context}"
    seed: int = 1234
    dry_run: bool = False  # validate and print what would run, run nothing
    output_dir: str = "${hydra:runtime.output_dir}"
    model: ModelConfig = field(default_factory=ModelConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        if self.model.name is MISSING:
            return
        check_model_ckpt(self.model, self.ckpt)


@dataclass
class TargetConfig:
    kind: TargetKind = TargetKind.vortex


@dataclass
class NemoTargetConfig:
    format: NemoFormat = NemoFormat.torch_dist
    model_size: str | None = None  # 1b/7b/40b (+ _arc_1m); None = from the model and ckpt


@dataclass
class SavannaTargetConfig:
    mp: int | None = None  # model-parallel shards to write; None = keep the source's
    dtype: CastDtype = CastDtype.keep


@dataclass
class ConvertConfig:
    """Root config of convert.py (shares model/ckpt/paths with RunConfig)."""

    source: str | None = (
        None  # anything ckpt.path accepts; None = newest run under paths.output_root
    )
    # output folder; must not exist unless overwrite=true. None = paths.output_root/exports/<source>-<target>
    output: str | None = None
    overwrite: bool = False
    verify: bool | None = (
        None  # run a probe through source and result; None = when it fits in memory
    )
    target: TargetConfig = field(default_factory=TargetConfig)
    nemo: NemoTargetConfig = field(default_factory=NemoTargetConfig)
    savanna: SavannaTargetConfig = field(default_factory=SavannaTargetConfig)
    output_dir: str = "${hydra:runtime.output_dir}"
    model: ModelConfig = field(default_factory=ModelConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        if self.savanna.mp is not None and self.savanna.mp <= 0:
            raise ConfigError(f"savanna.mp={self.savanna.mp}: must be positive")
        if self.model.name is MISSING:
            return
        check_model_ckpt(self.model, self.ckpt)


REPO_ROOT = Path(__file__).resolve().parents[1]


def register_configs() -> None:
    """Store the schemas so YAML files can extend them (`defaults: [base_run, _self_, ...]`).

    Also registers `${evo2_repo:}`, the repository root, so shipped examples resolve from any cwd.
    """
    if not OmegaConf.has_resolver("evo2_repo"):
        OmegaConf.register_new_resolver("evo2_repo", lambda: str(REPO_ROOT))
    cs = ConfigStore.instance()
    cs.store(name="base_run", node=RunConfig)
    cs.store(name="base_convert", node=ConvertConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="ckpt", name="base_ckpt", node=CkptConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="cluster", name="base_cluster", node=ClusterConfig)
    cs.store(group="peft", name="base_peft", node=PeftConfig)
    cs.store(group="target", name="base_target", node=TargetConfig)
    from evo2_hydra.cluster.launcher import register_launcher  # hydra/launcher: evo2_slurm

    register_launcher()
