"""Typed run configuration: the schema every YAML file under ``conf/`` fills in.

Dataclasses say *what* can be configured; ``conf/`` says *which values*; Hydra's config groups say
*which combination*. Every field is documented once, by the attribute docstring under it; that
text is what ``python launch.py --help`` shows (``scripts/render_help.py`` renders it into
``conf/hydra/help/``). The CLI layer (``evo2_hydra/cli.py``) stores the root schemas
(``RunConfig`` for ``launch.py``, ``ConvertConfig`` for ``convert.py``) in Hydra's ConfigStore, so a
misspelled key or a value of the wrong type fails at compose time; the rules that need a value's
meaning run in ``__post_init__`` when the entry point converts the composed config to objects
(``OmegaConf.to_object``). This module imports nothing from Hydra.

Each module receives only its own slice (``build_model(run.model, ...)``, ``prepare_data(run.data,
...)``), never the whole run config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING

REPO_ROOT = Path(__file__).resolve().parents[1]

# Largest value an int field may hold: torch and numpy index with int64.
INT64_MAX = 2**63 - 1


class ConfigError(ValueError):
    """A configuration value that is well-typed but not acceptable; the message names the key."""


def check_numbers(obj: Any, section: str) -> None:
    """Refuse NaN/inf in float fields and ints outside int64 in any config dataclass.

    Runs first in every ``__post_init__``, so the per-field rules below can compare numbers safely.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{section}.{f.name}" if section else f.name
        if isinstance(value, bool) or value is MISSING:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value}: must be a finite number")
        if isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ConfigError(f"{key}={value}: out of range (at most {INT64_MAX})")


def check_positive(obj: Any, section: str, *keys: str) -> None:
    """Refuse a value <= 0 for each named field."""
    for key in keys:
        value = getattr(obj, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{key}={value}: must be positive")


def check_non_negative(obj: Any, section: str, *keys: str) -> None:
    """Refuse a value < 0 for each named field."""
    for key in keys:
        value = getattr(obj, key)
        if value is not None and value < 0:
            raise ConfigError(f"{section}.{key}={value}: must be >= 0")


# ----------------------------------------------------------------------------------------------
# Enums (OmegaConf 2.3 has no Literal support; str-valued Enums round-trip through YAML, by name).


class Task(str, Enum):
    """What ``launch.py`` does.

    finetune: prepare data and base weights, train with DeepSpeed, save checkpoints (the default).
    preprocess: JSONL -> savanna BIN/IDX files (data.input -> data.output_prefix).
    plan: parameter table and per-GPU memory estimate; builds nothing real.
    score: per-sequence log-likelihoods of score.input under ckpt.path.
    generate: sample sequences from ckpt.path (generate.condition, generate.prompt).
    embed: per-sequence embeddings of embed.input from chosen layers (embed.layers).
    vep: variant effect scores of vep.variants against vep.reference.
    """

    finetune = "finetune"
    preprocess = "preprocess"
    plan = "plan"
    score = "score"
    generate = "generate"
    embed = "embed"
    vep = "vep"


class Packing(str, Enum):
    """How documents become fixed-length samples."""

    padded = "padded"  # one document per sample, right-padded to ckpt.context
    contiguous = "contiguous"  # GPT-style windows of context+1 tokens over concatenated documents


class ToUpper(str, Enum):
    """Case handling of inputs and labels."""

    none = "none"  # train on tokens as they are
    upper = "upper"  # upper-case inputs and labels
    weighted = "weighted"  # upper-case; lowercase labels weighted, divided by the mask sum
    normalized_weighted = "normalized_weighted"  # as Evo 2 trained: renormalised per micro-batch


class OnError(str, Enum):
    """What to do with a bad input line."""

    fail = "fail"
    skip = "skip"


class Alphabet(str, Enum):
    """What to do with a sequence holding characters outside data.charset (docs/data.md)."""

    error = "error"  # one line naming file, line/record and character; exit 2
    skip = "skip"  # leave the record out, counted in the summary
    keep = "keep"  # keep its bytes as tokens, counted (bytes 0/1 = EOD/PAD are still refused)


class Charset(str, Enum):
    """Characters a sequence may hold."""

    printable = "printable"  # ASCII 32..126: bases, N, IUPAC codes, phylogenetic tags
    iupac = "iupac"  # A C G T U N + IUPAC ambiguity codes, either case


class ReverseComplement(str, Enum):
    """Reverse-complement augmentation at preprocessing."""

    none = "none"
    both = "both"  # each window and its reverse complement (twice the documents)
    random = "random"  # each window or its reverse complement, a seeded choice per window


class Dtype(str, Enum):
    """A floating-point dtype, spelled as torch spells it (the one spelling for every dtype key)."""

    bfloat16 = "bfloat16"
    float32 = "float32"


class CastDtype(str, Enum):
    """A dtype to cast to, or ``keep`` the file's."""

    keep = "keep"
    bfloat16 = "bfloat16"
    float32 = "float32"


class DecayStyle(str, Enum):
    """Learning-rate decay after warm-up (savanna's AnnealingLR styles)."""

    cosine = "cosine"
    linear = "linear"
    exponential = "exponential"
    constant = "constant"


class NoDecaySet(str, Enum):
    """Which parameters get no weight decay."""

    savanna = "savanna"  # savanna's exact (odd) groups: only hcm filter.h and mixer.dense.bias
    conventional = "conventional"  # no decay for every norm, bias, filter and embedding


class DecayPreset(str, Enum):
    """Initial hcm decay rates of a freshly initialised model."""

    strong = "strong"
    normal = "normal"
    weak = "weak"


class ClusterKind(str, Enum):
    """Where processes run."""

    local = "local"
    slurm = "slurm"


class Device(str, Enum):
    """Compute device."""

    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class OutputFormat(str, Enum):
    """How ``task=plan`` prints."""

    text = "text"
    json = "json"


class EmbedPool(str, Enum):
    """How per-position embeddings are reduced per sequence."""

    mean = "mean"  # average over every position of the sequence
    last = "last"  # the last position (it has seen the whole sequence)
    none = "none"  # every position: one [L, D] array per sequence


class SaveDtype(str, Enum):
    """dtype of saved embedding arrays."""

    float32 = "float32"
    float16 = "float16"


class TargetKind(str, Enum):
    """The format ``convert.py`` writes."""

    vortex = "vortex"
    nemo = "nemo"
    savanna = "savanna"


class NemoFormat(str, Enum):
    """NeMo2 weight storage."""

    torch_dist = "torch_dist"
    zarr = "zarr"


class PeftMethod(str, Enum):
    """peft.method: full finetune or LoRA adapters."""

    none = "none"  # full finetune: every parameter trains
    lora = "lora"  # low-rank adapters through `peft`; the base stays frozen


class Offload(str, Enum):
    """train.offload: what DeepSpeed keeps in CPU memory instead of on the GPU."""

    none = "none"
    optimizer = "optimizer"  # ZeRO-Offload: optimizer states (and the fp32 master) in CPU memory
    optimizer_and_params = "optimizer_and_params"  # ZeRO-Infinity to CPU (needs zero_stage=3)


# ----------------------------------------------------------------------------------------------
# Model


OPERATOR_SYMBOLS = {"S": "hcs", "D": "hcm", "H": "hcl", "*": "attention"}


@dataclass
class ModelConfig:
    """StripedHyena 2 architecture (no paths, no context length: those belong to ``ckpt``)."""

    name: str = MISSING
    """Model size name (evo2_tiny, evo2_1b, evo2_7b, evo2_40b); names run folders."""
    hidden_size: int = MISSING
    """Width D of the residual stream."""
    num_layers: int = MISSING
    """Number of blocks; must equal the length of operator_pattern."""
    operator_pattern: str = MISSING
    """One symbol per layer: S = hcs (Hyena-SE), D = hcm (Hyena-MR), H = hcl (Hyena-LI), * = attention."""
    num_attention_heads: int = MISSING
    """Attention heads; must divide hidden_size."""
    hcs_groups: int = MISSING
    """Filter groups of hcs layers (savanna num_groups_hyena_short)."""
    hcm_groups: int = MISSING
    """Filter groups of hcm layers (savanna num_groups_hyena_medium)."""
    hcl_groups: int = MISSING
    """Filter groups of hcl layers (savanna num_groups_hyena; = hidden_size, one filter per channel)."""
    featurizer_conv_len: int = 3
    """Taps of the depthwise conv over the 3D projection (savanna short-conv-L)."""
    hcs_filter_len: int = 7
    """Taps of the hcs filters (savanna hyena_se_len)."""
    hcm_filter_len: int = 128
    """Taps of the hcm filters (savanna hyena_mr_len)."""
    hcl_modal_order: int = 16
    """Poles of each hcl modal filter (savanna hyena_filter_order)."""
    hcm_decay_preset: DecayPreset = DecayPreset.weak
    """hcm decay rates of a freshly initialised model (loaded weights carry their own)."""
    mlp_inner_size: int = MISSING
    """MLP width F. The 1M releases pad it (11264 / 22528): their ckpt presets set this value."""
    vocab_size: int = 512
    """Embedding rows (byte tokens; savanna pads the 256 bytes to 512)."""
    rope_base: float = 10000.0
    """RoPE base of a freshly initialised model (loaded checkpoints carry inv_freq)."""
    rope_scaling_factor: float = 1.0
    """Positions are divided by this (128 for the 1M releases: their ckpt presets set it)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    max_context: int = 8192
    """Longest context (tokens) this size supports; ckpt.context may not exceed it."""

    def __post_init__(self) -> None:
        if self.name is MISSING or self.hidden_size is MISSING:
            return  # partially specified schema node (e.g. during composition)
        check_numbers(self, "model")
        check_positive(
            self, "model", "hidden_size", "num_layers", "num_attention_heads", "mlp_inner_size",
            "vocab_size", "featurizer_conv_len", "hcs_filter_len", "hcm_filter_len",
            "hcl_modal_order", "rope_base", "norm_eps", "max_context",
        )  # fmt: skip
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
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    def layer_types(self) -> list[str]:
        """Operator name per layer: 'hcs', 'hcm', 'hcl' or 'attention'."""
        return [OPERATOR_SYMBOLS[s] for s in self.operator_pattern]


# ----------------------------------------------------------------------------------------------
# Checkpoint (starting weights + the context the run trains at)


@dataclass
class CkptConfig:
    """Where the starting weights come from, and what the weights themselves cannot say.

    A release preset (``ckpt=savanna_evo2_7b``) also sets the model values its weights need
    (``model.mlp_inner_size``, ``model.rope_scaling_factor``): see conf/ckpt/.
    """

    name: str = "none"
    """Preset name (savanna_evo2_7b, ...), or the model name for a plain choice."""
    model: str | None = None
    """Model size this preset was released for; another model= is refused. None = any."""
    path: str | None = None
    """Starting weights: a savanna .pt file, a global_stepN folder, a folder holding `latest`, a run folder, a vortex .pt, a NeMo2 folder, or hf://owner/repo."""
    context: int = 8192
    """Tokens per sample the run trains at; context-dependent filters are resized to it."""
    source_context: int | None = None
    """Width of filter.h/decay/t in the file; None = read it from the file."""
    interleave_legacy: bool = False
    """Convert non-interleaved (legacy) Hyena projections on load."""
    trust_pickle: bool = False
    """Allow full pickle loading (runs arbitrary code!). Only for files you trust."""
    random_init: bool = False
    """Start from freshly initialised weights when no path is given."""
    pad_mlp: bool = False
    """Zero-pad a narrower MLP in the file to model.mlp_inner_size (as the 1M releases are padded); off: a mismatch is an error."""

    def __post_init__(self) -> None:
        check_numbers(self, "ckpt")
        if not isinstance(self.context, int) or self.context <= 0:
            raise ConfigError(f"ckpt.context={self.context}: must be a positive number of tokens")
        if self.source_context is not None and self.source_context <= 0:
            raise ConfigError(f"ckpt.source_context={self.source_context}: must be positive")


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class ConditionConfig:
    """Prepend a conditioning token chosen per record (e.g. clade A -> '1').

    The class name comes from a JSONL field (`field`), or for FASTA from the header
    (`header_regex`, one group) or a two-column TSV `id<TAB>class` (`tsv`).
    """

    # (`tokens` comes first: the attribute `field` would shadow dataclasses.field below it)
    tokens: dict[str, str] = field(default_factory=dict)
    """Class name -> single-byte token."""
    field: str | None = None
    """JSONL field holding the class name; None = sequences are used as they are."""
    header_regex: str | None = None
    """FASTA: regex on the header line (after '>') whose one group is the class name."""
    tsv: str | None = None
    """FASTA: TSV file of record id <TAB> class name (no header row)."""

    @property
    def enabled(self) -> bool:
        """Whether records get a conditioning token."""
        return self.field is not None or self.header_regex is not None or self.tsv is not None

    def __post_init__(self) -> None:
        if self.header_regex is not None:
            import re

            try:
                groups = re.compile(self.header_regex).groups
            except re.error as err:
                raise ConfigError(
                    f"data.condition.header_regex={self.header_regex!r}: not a regex ({err})"
                ) from None
            if groups != 1:
                raise ConfigError(
                    f"data.condition.header_regex={self.header_regex!r} has {groups} groups; "
                    "expected exactly one (the class name)"
                )
            if self.tsv is not None:
                raise ConfigError("data.condition: give header_regex or tsv, not both")


@dataclass
class DataConfig:
    """Training data: inputs, packing, text policy, windows, tokens and loss weights."""

    input: Any = None
    """Training input: JSONL (.jsonl[.gz]) or FASTA (.fa/.fasta/.fna[.gz], bgzip too) path(s), or BIN/IDX prefix(es); one path or a list."""
    valid_input: Any = None
    """Validation input(s); None = carve it out of `input` with `split`."""
    test_input: Any = None
    """Test input(s); None = carve it out of `input` with `split`."""
    weights: list[float] | None = None
    """Blending weights, one per training input; None = in proportion to size."""
    split: str = "969,30,1"
    """train,valid,test document split when no valid_input is given."""
    output_prefix: str | None = None
    """task=preprocess: where the .bin/.idx files go."""
    packing: Packing = Packing.padded
    """padded: one document per sample, right-padded to ckpt.context; contiguous: GPT-style windows."""
    append_eod: bool = True
    """Append EOD (token 0) after each document."""
    text_key: str = "text"
    """JSONL field holding the sequence."""
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    """Conditioning tokens (data.condition.field / header_regex / tsv, data.condition.tokens)."""
    truncate: bool = False
    """Padded packing: cut documents longer than the context instead of failing."""
    on_error: OnError = OnError.fail
    """Bad JSONL lines / FASTA records: fail, or skip and count them."""
    alphabet: Alphabet = Alphabet.error
    """Characters outside data.charset: error, skip the record, or keep them (docs/data.md, text policy)."""
    charset: Charset = Charset.printable
    """Characters a sequence may hold: printable (ASCII 32..126) or iupac (ACGTUN + IUPAC codes)."""
    window: int | None = None
    """Cut records longer than this many characters into windows; null = records as they are, 0 = fit ckpt.context."""
    stride: int | None = None
    """Characters between window starts (overlap = window - stride); null = window (no overlap)."""
    keep_partial_window: bool = True
    """Keep a last window shorter than `window`."""
    reverse_complement: ReverseComplement = ReverseComplement.none
    """Augmentation at preprocessing: none, both (each window and its reverse complement) or random."""
    reverse_complement_seed: int = 1234
    """reverse_complement=random: seed of which windows are flipped."""
    to_upper: ToUpper = ToUpper.normalized_weighted
    """Case handling: none, upper, weighted, or normalized_weighted (as Evo 2 trained)."""
    lowercase_weight: float = 0.1
    """Loss weight of lowercase labels (to_upper weighted modes), 0..1."""
    mask_control_tags: bool = True
    """Drop phylogenetic tag spans from the loss (savanna's control tags)."""
    eod_mask_loss: bool = False
    """savanna's input-side mask: drop positions whose input is EOD."""
    pad_mask_loss: bool = False
    """savanna's input-side mask: drop positions whose input is PAD (padded packing masks PAD labels regardless)."""
    workers: int = 0
    """Preprocessing processes; 0 = automatic (cores - 1, at most 8, for inputs over 48 MB on 4+ cores)."""
    cache_dir: str = "${paths.cache_dir}/data"
    """Preprocessed data, keyed by a content hash and shared by runs."""

    def __post_init__(self) -> None:
        check_numbers(self, "data")
        check_non_negative(self, "data", "workers")
        if not 0.0 <= self.lowercase_weight <= 1.0:
            raise ConfigError(f"data.lowercase_weight={self.lowercase_weight}: expected 0..1")
        for weight in self.weights or []:
            if not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"data.weights={self.weights}: expected finite values >= 0")
        for name, token in self.condition.tokens.items():
            if len(str(token).encode("utf-8")) != 1:
                raise ConfigError(
                    f"data.condition.tokens.{name}={token!r}: a conditioning token must be one byte"
                )
            if str(token) in ("\x00", "\x01"):
                raise ConfigError(
                    f"data.condition.tokens.{name}: bytes 0 and 1 are the EOD and PAD tokens"
                )
        if self.window is not None and self.window < 0:
            raise ConfigError(
                f"data.window={self.window}: expected a length, 0 (fit the context) or null"
            )
        if self.stride is not None and (self.stride <= 0 or self.window is None):
            raise ConfigError(
                f"data.stride={self.stride}: expected a positive step, together with data.window"
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
    """Optimizer, schedule, engine and cadences of a finetune (defaults: savanna's 7B finetune recipe)."""

    steps: int = 100
    """Optimizer steps to train (savanna train-iters)."""
    micro_batch_size: int = 1
    """Samples per GPU (rank) per micro-step."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    precision: Dtype = Dtype.bfloat16
    """Training dtype: bfloat16 (mixed precision, fp32 master weights) or float32."""
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 1e-6
    """Learning-rate floor of the decay (at most lr)."""
    warmup: float = 0.05
    """Fraction of lr_decay_steps spent warming up, in [0, 1) (savanna `warmup`)."""
    decay_style: DecayStyle = DecayStyle.cosine
    """Decay after warm-up: cosine, linear, exponential or constant."""
    lr_decay_steps: int | None = None
    """Length of the decay in steps; None = steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1, in [0, 1)."""
    adam_beta2: float = 0.95
    """AdamW beta2, in [0, 1)."""
    adam_eps: float = 1e-8
    """AdamW epsilon (positive)."""
    no_decay_set: NoDecaySet = NoDecaySet.savanna
    """Parameters without weight decay: savanna's exact set, or conventional (norms, biases, filters, embeddings)."""
    grad_clip: float = 1.0
    """Gradient norm clipping; 0 = off."""
    activation_checkpointing: bool = True
    """Recompute each block in backward (savanna finetunes checkpoint every layer; the demo turns it off)."""
    save_every: int = 100
    """Steps between checkpoints (and one at the end)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are pruned."""
    eval_every: int = 50
    """Steps between evaluations (and one at step 0 and at the end)."""
    eval_steps: int = 10
    """Validation micro-batches per evaluation."""
    log_every: int = 1
    """Steps between console/metrics log lines."""
    resume: bool = True
    """Continue from the latest checkpoint in the run folder."""
    offload: Offload = Offload.none
    """Move optimizer states (ZeRO-1/2/3: optimizer) or also the parameters (ZeRO-3: optimizer_and_params) to CPU memory."""

    def __post_init__(self) -> None:
        check_numbers(self, "train")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage={self.zero_stage}: expected 0, 1, 2 or 3")
        check_positive(
            self, "train", "steps", "micro_batch_size", "grad_accum_steps", "save_every",
            "eval_every", "eval_steps", "log_every", "keep_last", "lr_decay_steps", "adam_eps",
        )  # fmt: skip
        check_non_negative(self, "train", "lr", "min_lr", "weight_decay", "grad_clip")
        if self.offload != Offload.none and self.zero_stage == 0:
            raise ConfigError(
                f"train.offload={self.offload.value} needs ZeRO (train.zero_stage=1, 2 or 3)"
            )
        if self.offload == Offload.optimizer_and_params and self.zero_stage != 3:
            raise ConfigError(
                "train.offload=optimizer_and_params offloads partitioned parameters: it needs "
                f"train.zero_stage=3 (got {self.zero_stage}); use train.offload=optimizer"
            )
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"train.warmup={self.warmup}: expected a fraction in [0, 1)")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"train.{key}={getattr(self, key)}: expected a value in [0, 1)")
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
    """none (full finetune) or lora (adapters through `peft`; the base stays frozen)."""
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA scale numerator: adapters are scaled by alpha / rank."""
    dropout: float = 0.1
    """Dropout on the adapter input, in [0, 1)."""
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Module-name patterns: a name ending in the pattern (`mlp.w1`) or an fnmatch pattern on the full name (`sequential.2.*.dense`); only nn.Linear modules can be adapted."""

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
    """local (this machine) or slurm (set by the cluster group)."""
    device: Device = Device.auto
    """auto (cuda when available, else cpu), cpu or cuda."""
    tasks: int = 1
    """cluster=local: processes on this machine."""
    gpu_memory_gb: float = 80.0
    """Memory per GPU in GiB, for the plan's fits/does-not-fit verdict."""
    partition: str | None = None
    """Slurm partition (site value, required for cluster=slurm)."""
    account: str | None = None
    """sbatch --account (site value), when the site needs one."""
    qos: str | None = None
    """sbatch --qos (site value)."""
    nodes: int = 1
    """Nodes per job."""
    gpus_per_node: int = 0
    """One task per GPU; 0 for CPU partitions (then tasks_per_node counts)."""
    tasks_per_node: int = 1
    """Processes per node when gpus_per_node=0."""
    cpus_per_task: int = 1
    """CPUs per process (data loading threads)."""
    mem_gb: int | None = None
    """Memory per node in GB; None = the site default."""
    timeout_min: int = 60
    """Job time limit in minutes."""
    constraint: str | None = None
    """sbatch --constraint (node features, e.g. h100)."""
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    """Extra sbatch options ({mail-type: END})."""
    setup: list[str] = field(default_factory=list)
    """Lines run in the sbatch script before the task (module load, env)."""
    max_num_timeout: int = 0
    """Requeue on timeout this many times (safe: training resumes from `latest`)."""
    array_parallelism: int = 256
    """Sweep points running at once (sbatch --array=...%N)."""
    wait: bool = True
    """Wait for the jobs and report failures; false = print job ids and log paths, then return."""

    def __post_init__(self) -> None:
        check_numbers(self, "cluster")
        check_positive(
            self, "cluster", "tasks", "nodes", "tasks_per_node", "cpus_per_task", "timeout_min",
            "gpu_memory_gb", "mem_gb", "array_parallelism",
        )  # fmt: skip
        check_non_negative(self, "cluster", "gpus_per_node", "max_num_timeout")

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
    """task=plan: parameter table and memory estimate."""

    format: OutputFormat = OutputFormat.text
    """text (tables) or json (one object on stdout)."""
    force: bool = False
    """Run (or submit) a finetune even when the memory plan says it does not fit."""


def check_chunk_tokens(section: str, value: int | None) -> None:
    """Refuse a negative chunk size (0 = never chunk, None = automatic)."""
    if value is not None and value < 0:
        raise ConfigError(
            f"{section}.chunk_tokens={value}: expected a positive number of tokens, 0 (never "
            "chunk) or null (automatic)"
        )


@dataclass
class ScoreConfig:
    """task=score: per-sequence log-likelihoods."""

    input: str | None = None
    """JSONL (.jsonl[.gz]) or FASTA (.fa/.fasta/.fna[.gz]) file of sequences to score."""
    output: str | None = None
    """Output folder (must not exist yet); None = <checkpoint's run>/scores/<time>."""
    text_key: str = "text"
    """JSONL field holding the sequence (FASTA: the record's sequence)."""
    logits: bool = False
    """Also write [L, 512] float32 logits per sequence (.npy)."""
    dtype: Dtype = Dtype.float32
    """Compute dtype of the model: float32 or bfloat16."""
    batch_size: int = 1
    """Sequences per forward pass (right-padded; causal, so padding is inert)."""
    reverse_complement: bool = False
    """Average with the reverse complement's score."""
    log_probs: bool = False
    """Also write per-position log-probabilities [L-1] float32 (.npy)."""
    chunk_tokens: int | None = None
    """Tokens per forward chunk (exact: states carried between chunks); None = automatic (only when the whole forward would not fit), 0 = never."""

    def __post_init__(self) -> None:
        check_numbers(self, "score")
        check_positive(self, "score", "batch_size")
        check_chunk_tokens("score", self.chunk_tokens)


@dataclass
class GenerateConfig:
    """task=generate: sample sequences from a checkpoint."""

    prompt: str = ""
    """Text the sequences continue (printable ASCII; after the condition token)."""
    prompts: str | None = None
    """JSONL/FASTA file of prompts (instead of `prompt`): n sequences continue each record."""
    condition: str | None = None
    """A class name from the run's conditioning mapping."""
    n: int = 1
    """Sequences to sample."""
    length: int = 100
    """New tokens per sequence (at most; stops earlier at EOD)."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = off."""
    top_p: float = 1.0
    """Keep the smallest set of tokens with this much probability, in (0, 1]; 1 = off."""
    seed: int = 0
    """Sampling seed (same seed, settings and weights -> same sequences)."""
    cached: bool = True
    """Incremental decoding with hyena/attention caches (false: re-run the whole prefix per token)."""
    batch_size: int = 16
    """Sequences sampled together."""
    dtype: Dtype = Dtype.float32
    """Compute dtype of the model: float32 or bfloat16."""
    cpu_threads: int = 0
    """torch threads on CPU; 0 = auto (1 below hidden_size 1024, where 2 threads made evo2_tiny ~17x slower)."""
    output: str | None = None
    """Output folder; None = <checkpoint's run>/generations/<time>."""
    chunk_tokens: int | None = None
    """Prompt prefill in chunks of this many tokens; None = automatic, 0 = one pass."""

    def __post_init__(self) -> None:
        check_numbers(self, "generate")
        check_chunk_tokens("generate", self.chunk_tokens)
        check_positive(self, "generate", "n", "length", "batch_size")
        check_non_negative(self, "generate", "cpu_threads", "temperature", "top_k", "seed")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"generate.top_p={self.top_p}: expected a value in (0, 1]")


@dataclass
class EmbedConfig:
    """task=embed: per-sequence (or per-position) embeddings from chosen layers."""

    input: str | None = None
    """JSONL or FASTA file of sequences (as score.input)."""
    output: str | None = None
    """Output folder; None = <run folder>/embed/<time> for our runs."""
    text_key: str = "text"
    """JSONL field holding the sequence."""
    layers: list[str] = field(default_factory=list)
    """vortex / evo2-package module names: embedding_layer, blocks.N (block output), blocks.N.mlp.l3 (MLP output before the residual add), norm (final norm)."""
    pool: EmbedPool = EmbedPool.mean
    """Per sequence: mean over positions, the last position, or none (every position, [L, D])."""
    dtype: Dtype = Dtype.float32
    """Compute dtype of the model: float32 or bfloat16."""
    save_dtype: SaveDtype = SaveDtype.float32
    """dtype of the written arrays: float32 or float16."""
    reverse_complement: bool = False
    """Also embed the reverse complement (pooled: [forward | reverse] columns; none: a separate array)."""
    batch_size: int = 8
    """Sequences per forward pass, grouped by length."""
    chunk_tokens: int | None = None
    """As score.chunk_tokens."""

    def __post_init__(self) -> None:
        check_numbers(self, "embed")
        check_positive(self, "embed", "batch_size")
        check_chunk_tokens("embed", self.chunk_tokens)


@dataclass
class VepConfig:
    """task=vep: variant effect scores (alternative minus reference window log-likelihood)."""

    reference: str | None = None
    """Reference genome: FASTA or bgzip FASTA.gz (indexed with pysam: .fai/.gzi)."""
    variants: str | None = None
    """VCF / VCF.gz, or TSV/CSV with columns chrom,pos,ref,alt (1-based)."""
    window: int = 8192
    """Tokens around each variant (as the Evo 2 BRCA1 notebook: seq[p - w//2 : p + w//2])."""
    output: str | None = None
    """Output folder; None = <run folder>/vep/<time> for our runs."""
    on_mismatch: OnError = OnError.fail
    """A REF that differs from the reference: fail, or skip it."""
    reverse_complement: bool = False
    """Also score both windows' reverse complements."""
    dtype: Dtype = Dtype.float32
    """Compute dtype of the model: float32 or bfloat16."""
    chunk_tokens: int | None = None
    """As score.chunk_tokens."""
    share_prefix: bool = True
    """Continue the alternative window from the reference's state at the variant (exact, less work); false: both from scratch."""

    def __post_init__(self) -> None:
        check_numbers(self, "vep")
        if self.window < 2:
            raise ConfigError(f"vep.window={self.window}: must be at least 2 tokens")
        check_chunk_tokens("vep", self.chunk_tokens)


@dataclass
class PathsConfig:
    """Where outputs and caches live."""

    output_root: str = "outputs"
    """Every run folder lives below this."""
    cache_dir: str = "${paths.output_root}/cache"
    """Prepared data and base checkpoints, shared by runs and sweep points."""


# ----------------------------------------------------------------------------------------------
# Root configs


def check_model_ckpt(model: ModelConfig, ckpt: CkptConfig) -> None:
    """Check that the checkpoint preset belongs to the model and the context fits it.

    (The preset's model values are set by the preset file itself, in the config tree, so what
    ``--cfg job`` prints is what runs.)
    """
    if ckpt.model is not None and ckpt.model != model.name:
        raise ConfigError(
            f"ckpt={ckpt.name} is a checkpoint of {ckpt.model}, but model={model.name}; "
            f"choose model={ckpt.model} or another ckpt"
        )
    if ckpt.context > model.max_context:
        raise ConfigError(
            f"ckpt.context={ckpt.context} exceeds model.max_context={model.max_context} "
            f"for {model.name}"
        )


@dataclass
class RunConfig:
    """Root config of launch.py: finetune, preprocess, plan, score, generate, embed or vep with Evo 2."""

    task: Task = Task.finetune
    """What to do: finetune, preprocess, plan, score, generate, embed or vep."""
    run_name: str = "${evo2_run_name:}"
    """Run folder name under paths.output_root/runs: <model>-<data>-<hash of the settings that define the run> (evo2_hydra/run_identity.py), so the same command finds its own folder again."""
    resume: str | None = None
    """Continue the run in this folder with its saved config; only settings that may change on resume (train.steps, cadences, cluster.*) may be overridden."""
    seed: int = 1234
    """Seed of initialisation, data order and dropout-free training randomness (0..2^63-1)."""
    dry_run: bool = False
    """Validate and print what would run (folders, batch plan, DeepSpeed config, memory); run nothing."""
    output_dir: str = "${evo2_output_dir:}"
    """The run folder (set by Hydra from hydra.run.dir / hydra.sweep.dir)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture (group `model`)."""
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    """Starting weights and training context (group `ckpt`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data (group `data`)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule, engine, cadences."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """Parameter-efficient finetuning (group `peft`: none or lora)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Where it runs (group `cluster`)."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """task=plan options."""
    score: ScoreConfig = field(default_factory=ScoreConfig)
    """task=score options."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """task=generate options."""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    """task=embed options."""
    vep: VepConfig = field(default_factory=VepConfig)
    """task=vep options."""
    paths: PathsConfig = field(default_factory=PathsConfig)
    """Output and cache folders."""

    def __post_init__(self) -> None:
        if self.seed is not MISSING and not 0 <= self.seed <= INT64_MAX:
            raise ConfigError(f"seed={self.seed}: expected 0..{INT64_MAX}")
        if self.model.name is MISSING:
            return
        check_model_ckpt(self.model, self.ckpt)


@dataclass
class TargetConfig:
    """The export format (group `target`); each format's own options live in its subclass."""

    kind: TargetKind = TargetKind.vortex
    """vortex, nemo or savanna (set by target=...)."""


@dataclass
class VortexTargetConfig(TargetConfig):
    """target=vortex: the flat .pt + .yml that evo2/vtx load. No options."""

    kind: TargetKind = TargetKind.vortex
    """vortex."""


@dataclass
class NemoTargetConfig(TargetConfig):
    """target=nemo: a NeMo2 checkpoint folder."""

    kind: TargetKind = TargetKind.nemo
    """nemo."""
    format: NemoFormat = NemoFormat.torch_dist
    """Weight storage: torch_dist or zarr."""
    model_size: str | None = None
    """NeMo preset name: 1b, 7b, 7b_arc_1m, 40b, 40b_arc_1m; None = from the model and MLP width."""


@dataclass
class SavannaTargetConfig(TargetConfig):
    """target=savanna: re-save as savanna (reshard, gather ZeRO-3, cast, resize)."""

    kind: TargetKind = TargetKind.savanna
    """savanna."""
    mp: int | None = None
    """Model-parallel shards to write; None = keep the source's."""
    dtype: CastDtype = CastDtype.keep
    """Cast the weights: keep, bfloat16 or float32."""

    def __post_init__(self) -> None:
        check_numbers(self, "target")
        check_positive(self, "target", "mp")


@dataclass
class ConvertConfig:
    """Root config of convert.py: export or re-save checkpoints (shares model/ckpt/paths with RunConfig)."""

    source: str | None = None
    """Anything ckpt.path accepts; None = the newest run under paths.output_root."""
    output: str | None = None
    """Output folder; must not exist unless overwrite=true. None = paths.output_root/exports/<source>-<target>."""
    overwrite: bool = False
    """Replace an existing output folder."""
    verify: bool | None = None
    """Run a probe through source and result; None = when two float32 copies fit in memory."""
    target: TargetConfig = field(default_factory=TargetConfig)
    """The format to write and its options (group `target`)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture when the source has no saved run config (group `model`)."""
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    """Checkpoint preset and the context to write (group `ckpt`)."""
    paths: PathsConfig = field(default_factory=PathsConfig)
    """Output and cache folders."""

    def __post_init__(self) -> None:
        if self.model.name is MISSING:
            return
        check_model_ckpt(self.model, self.ckpt)


def check_known_keys(cfg: Any, path: str = "") -> None:
    """Refuse keys the schema does not declare, however they were added.

    Hydra refuses ``data.pakcing=padded`` but then suggests ``+data.pakcing=padded``, which adds
    the key to the struct config; ``OmegaConf.to_object`` would then drop or misplace it silently.
    Walks every node typed by a dataclass and compares its keys with the dataclass fields.
    """
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        return
    schema = OmegaConf.get_type(cfg)
    declared = (
        {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    )
    for key in cfg.keys():
        full = f"{path}.{key}" if path else str(key)
        if declared is not None and key not in declared:
            fields = ", ".join(sorted(declared))
            raise ConfigError(
                f"unknown key {full}: {schema.__name__} has no field {key!r} (fields: {fields})"
            )
        if declared is not None:
            check_known_keys(cfg._get_node(key), full)
