"""savanna <-> NeMo2 as a pure state-dict adapter: key map, shapes, dtypes and `context/` metadata.

No file is read or written here (`checkpoint/nemo_io.py` writes and reads the folders).

Weights (NVIDIA/NeMo `nemo/collections/llm/gpt/model/hyena.py` importer): full (TP=1) tensors under
the Megatron keys prefixed `module.`; `linear_fc1` = `cat(w1, w2)` (gate first), hcm `h`/`decay` cut
to 128 taps, filters `{h, decay, gamma, R, p}` in float32 and everything else bf16 (as BioNeMo's
MBridge converter). `context/io.json` is a minimal fiddle graph: TrainerContext -> HyenaModel ->
Hyena*Config + ByteLevelTokenizer (NeMo `nemo/lightning/io/`). DCP stores global tensors with chunk
metadata, so the output loads at any tensor-parallel size (checked with megatron-core 0.15).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch import Tensor

from evo2_hydra.checkpoint.adapters.vortex import block_index, final_norm_index
from evo2_hydra.checkpoint.mapped import concat_rows
from evo2_hydra.config import ModelConfig, NemoFormat
from evo2_hydra.errors import UserError

log = logging.getLogger(__name__)

PREFIX = "module."
FP32_SUFFIXES = (".filter.h", ".filter.decay", ".filter.gamma", ".filter.R", ".filter.p")
# TransformerEngine modules whose `_extra_state` Megatron-Core 0.15 / NeMo 2.6 requests for Evo 2
# (checked by loading on CPU: output_layer yes, core_attention no).
HYENA_TE_MODULES = ("mixer.dense_projection", "mixer.dense", "mlp.linear_fc1", "mlp.linear_fc2")
ATTENTION_TE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
TOP_TE_MODULES = ("output_layer",)
EXTRA_STATE_SUFFIX = "._extra_state/shard_0_1"

HYENA_MODULE = "nemo.collections.llm.gpt.model.hyena"
TOKENIZER = ("nemo.collections.common.tokenizers.bytelevel_tokenizers", "ByteLevelTokenizer")


@dataclass(frozen=True)
class NemoSize:
    """One NeMo Evo 2 preset: its config class and the architecture it stands for."""

    config_class: str  # NeMo config class in nemo.collections.llm.gpt.model.hyena
    hidden_size: int
    num_layers: int
    ffn_hidden_size: int
    seq_length: int  # the class default
    pattern: str


NEMO_SIZES = {
    "1b": NemoSize("Hyena1bConfig", 1920, 25, 5120, 8192, "SDH*SDHSDH*SDHSDH*SDHSDH*"),
    "7b": NemoSize("Hyena7bConfig", 4096, 32, 11008, 8192, "SDH*SDHSDH*SDHSDH*SDHSDH*SDHSDH*"),
    "7b_arc_1m": NemoSize(
        "Hyena7bARCLongContextConfig", 4096, 32, 11264, 1048576, "SDH*SDHSDH*SDHSDH*SDHSDH*SDHSDH*"
    ),
    "40b": NemoSize(
        "Hyena40bConfig",
        8192,
        50,
        21888,
        8192,
        "SDH*SDHSDH*SDHSDH*SDHSDH*SDHSDH*SDH*SDHSDH*SDHSDH*",
    ),
    "40b_arc_1m": NemoSize(
        "Hyena40bARCLongContextConfig",
        8192,
        50,
        22528,
        1048576,
        "SDH*SDHSDH*SDHSDH*SDHSDH*SDHSDH*SDH*SDHSDH*SDHSDH*",
    ),
}
# NeMo's own names for the 1M variants.
NEMO_SIZE_ALIASES = {"7b_arc_longcontext": "7b_arc_1m", "40b_arc_longcontext": "40b_arc_1m"}


def resolve_model_size(model_size: str | None, cfg: ModelConfig) -> str | None:
    """The NeMo `--model-size` for this model: the given one (checked) or the one that fits.

    None (no preset fits and none was asked for, e.g. evo2_tiny): the context names the base
    `HyenaConfig` with every architecture value spelled out.
    """
    fits = [
        name
        for name, s in NEMO_SIZES.items()
        if (s.hidden_size, s.num_layers, s.ffn_hidden_size, s.pattern)
        == (cfg.hidden_size, cfg.num_layers, cfg.mlp_inner_size, cfg.operator_pattern)
    ]
    if model_size is None:
        if not fits:
            log.warning(
                "no NeMo Evo 2 preset (%s) matches model=%s: context/io.json names the base "
                "HyenaConfig with explicit architecture values",
                ", ".join(NEMO_SIZES),
                cfg.name,
            )
            return None
        return fits[0]
    name = NEMO_SIZE_ALIASES.get(model_size, model_size)
    if name not in NEMO_SIZES:
        raise UserError(
            f"target.model_size={model_size}: expected one of {', '.join(NEMO_SIZES)} "
            f"(or {', '.join(NEMO_SIZE_ALIASES)})"
        )
    if name not in fits:
        s = NEMO_SIZES[name]
        raise UserError(
            f"target.model_size={model_size} is hidden {s.hidden_size}, {s.num_layers} layers, "
            f"MLP {s.ffn_hidden_size}, but model={cfg.name} is hidden {cfg.hidden_size}, "
            f"{cfg.num_layers} layers, MLP {cfg.mlp_inner_size}"
            + (f"; the matching size is {fits[0]}" if fits else "")
        )
    return name


# ------------------------------------------------------------------------------------------------
# Key mapping (NVIDIA/NeMo `nemo/collections/llm/gpt/model/hyena.py`, `PyTorchHyenaImporter`)


Producer = Callable[[], Tensor]
# (NeMo key, (shape, dtype), producer): what the writers are handed, planned without reading data
Entry = tuple[str, tuple[tuple[int, ...], torch.dtype], Producer]


def _cast(key: str, tensor: Tensor) -> Tensor:
    dtype = torch.float32 if key.endswith(FP32_SUFFIXES) else torch.bfloat16
    return tensor.to(dtype)


def _taps(tensor: Tensor, taps: int) -> Tensor:
    """hcm `h`/`decay` cut (or zero-padded) to `taps` columns: NeMo stores exactly the used taps."""
    if tensor.shape[1] >= taps:
        return tensor[:, :taps]
    return torch.nn.functional.pad(tensor, (0, taps - tensor.shape[1]))


def savanna_to_nemo(
    sd: Mapping[str, Tensor],
    cfg: ModelConfig,
    shapes: Mapping[str, tuple[int, ...]],
    hcm_taps: int = 128,
) -> Iterator[Entry]:
    """Yield `(nemo key, (shape, dtype), producer)`; `sd` is read only when `producer()` runs.

    `shapes` are the source's (MP=1) shapes, so planning reads no tensor data.
    """

    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise UserError(f"savanna state dict: {key} is missing (model={cfg.name})")
        return tuple(shapes[key])

    def entry(key: str, shape: tuple[int, ...], make: Callable[[], Tensor]):
        dtype = torch.float32 if key.endswith(FP32_SUFFIXES) else torch.bfloat16
        return PREFIX + key, (shape, dtype), lambda: _cast(key, make())

    def copy(dst: str, src: str):
        return entry(dst, need(src), lambda: sd[src])

    yield copy("embedding.word_embeddings.weight", "sequential.0.word_embeddings.weight")
    for layer, kind in enumerate(cfg.layer_types()):
        s = f"sequential.{block_index(layer)}."
        d = f"decoder.layers.{layer}."
        if kind == "attention":
            a = d + "self_attention."
            yield copy(a + "linear_qkv.layer_norm_weight", s + "input_layernorm.weight")
            yield copy(a + "linear_qkv.weight", s + "mixer.dense_projection.weight")
            yield copy(a + "linear_proj.weight", s + "mixer.dense.weight")
            yield copy(a + "linear_proj.bias", s + "mixer.dense.bias")
        else:
            m = d + "mixer."
            yield copy(m + "dense_projection.layer_norm_weight", s + "input_layernorm.weight")
            yield copy(m + "dense_projection.weight", s + "mixer.dense_projection.weight")
            conv_key = s + "mixer.hyena_proj_conv.short_conv_weight"
            conv = need(conv_key)
            yield entry(  # fast_conv_proj layout: 2-D [3H, 3]
                m + "hyena_proj_conv.short_conv_weight",
                (conv[0], math.prod(conv[1:])),
                lambda k=conv_key: sd[k].reshape(sd[k].shape[0], -1),
            )
            yield copy(m + "dense.weight", s + "mixer.dense.weight")
            yield copy(m + "dense.bias", s + "mixer.dense.bias")
            if kind == "hcs":
                yield copy(
                    m + "mixer.short_conv.short_conv_weight",
                    s + "mixer.mixer.short_conv.short_conv_weight",
                )
            else:
                yield copy(m + "mixer.conv_bias", s + "mixer.mixer.conv_bias")
            if kind == "hcm":
                for name in ("h", "decay"):
                    key = s + f"mixer.mixer.filter.{name}"
                    yield entry(
                        m + f"mixer.filter.{name}",
                        (need(key)[0], hcm_taps),
                        lambda k=key: _taps(sd[k], hcm_taps),
                    )
            if kind == "hcl":
                for name in ("gamma", "R", "p"):
                    yield copy(m + f"mixer.filter.{name}", s + f"mixer.mixer.filter.{name}")
        yield copy(d + "mlp.linear_fc1.layer_norm_weight", s + "pre_mlp_layernorm.weight")
        w1, w2 = need(s + "mlp.w1.weight"), need(s + "mlp.w2.weight")
        yield entry(
            d + "mlp.linear_fc1.weight",
            (w1[0] + w2[0], w1[1]),
            # Gate first. A placeholder for the writers (their bytes one after the other), so
            # it is cast part by part: the outer cast is then a no-op that reads nothing.
            lambda k=s, d=d: concat_rows(
                [
                    _cast(d + "mlp.linear_fc1.weight", sd[k + f"mlp.{w}.weight"])
                    for w in ("w1", "w2")
                ]
            ),
        )
        yield copy(d + "mlp.linear_fc2.weight", s + "mlp.w3.weight")
    yield copy(
        "decoder.final_norm.weight", f"sequential.{final_norm_index(cfg.num_layers)}.norm.weight"
    )


def extra_state_keys(cfg: ModelConfig) -> list[str]:
    """Every `_extra_state` ShardedObject key the NeMo Evo 2 model declares (module. prefixed)."""
    keys = [PREFIX + m + EXTRA_STATE_SUFFIX for m in TOP_TE_MODULES]
    for layer, kind in enumerate(cfg.layer_types()):
        modules = ATTENTION_TE_MODULES if kind == "attention" else HYENA_TE_MODULES
        keys += [f"{PREFIX}decoder.layers.{layer}.{m}{EXTRA_STATE_SUFFIX}" for m in modules]
    return keys


def empty_extra_state() -> Tensor:
    """What TransformerEngine returns as extra state for a module that never ran FP8."""
    return torch.empty(0, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------
# context/ (NVIDIA/NeMo `nemo/lightning/io/`: fiddle `io.json`, `model.yaml`)


def _pyref(module: str, name: str) -> dict[str, str]:
    return {"type": "pyref", "module": module, "name": name}


def _snake_case(name: str) -> str:
    """fiddle's object names: `Hyena7bARCLongContextConfig` -> `hyena7b_arclong_context_config`."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


class _FiddleGraph:
    """Writes what `fiddle._src.experimental.serialization.dump_json` writes for a tree of
    `fdl.Config`s (format 0.0.1), without importing fiddle or NeMo.

    Objects are emitted children first (a node's argument values, then its traverser metadata,
    then the node), named `<snake_case class>_<n>`; a non-empty `argument_names` tuple and the two
    empty tag/history dicts are objects of their own, an empty tuple is inline; argument values
    are leaves carrying their path. tests/test_convert_nemo.py checks byte-for-byte equality with
    fiddle's own output for the same graph.
    """

    EMPTY_TUPLE = {"type": _pyref("builtins", "tuple"), "items": [], "metadata": None}

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self._counts: dict[str, int] = {}

    def _add(self, base: str, record: dict[str, Any]) -> dict[str, str]:
        self._counts[base] = self._counts.get(base, 0) + 1
        key = f"{base}_{self._counts[base]}"
        self.objects[key] = record
        return {"type": "ref", "key": key}

    def _empty_dict(self) -> dict[str, str]:
        return self._add(
            "dict", {"type": _pyref("builtins", "dict"), "items": [], "metadata": self.EMPTY_TUPLE}
        )

    def config(self, fn: tuple[str, str], items: dict[str, Any], path: str) -> dict[str, str]:
        """`fdl.Config(fn, **items)`; values are refs from earlier `config` calls or plain leaves."""
        values = [
            [
                f"Attr(name='{k}')",
                v if _is_ref(v) else {"type": "leaf", "value": v, "paths": [f"{path}.{k}"]},
            ]
            for k, v in items.items()
        ]
        if items:
            names = self._add(
                "tuple",
                {
                    "type": _pyref("builtins", "tuple"),
                    "items": [[f"Index(index={i})", n] for i, n in enumerate(items)],
                    "metadata": None,
                },
            )
        else:
            names = self.EMPTY_TUPLE
        tags, history = self._empty_dict(), self._empty_dict()
        metadata_cls = _pyref("fiddle._src.config", "BuildableTraverserMetadata")
        metadata = self._add(
            "buildable_traverser_metadata",
            {
                "type": metadata_cls,
                "items": [
                    ["Attr(name='fn_or_cls')", _pyref(*fn)],
                    ["Attr(name='argument_names')", names],
                    ["Attr(name='argument_tags')", tags],
                    ["Attr(name='argument_history')", history],
                ],
                "metadata": metadata_cls,
            },
        )
        return self._add(
            _snake_case(fn[1]),
            {
                "type": _pyref("fiddle._src.config", "Config"),
                "items": values,
                "metadata": metadata,
                "paths": [path],
            },
        )


def _is_ref(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") == "ref"


def architecture_values(cfg: ModelConfig, context: int) -> dict[str, Any]:
    """NeMo HyenaConfig field values for a model no preset describes."""
    return {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.mlp_inner_size,
        "num_attention_heads": cfg.num_attention_heads,
        "hybrid_override_pattern": cfg.operator_pattern,
        "num_groups_hyena": cfg.hcl_groups,
        "num_groups_hyena_medium": cfg.hcm_groups,
        "num_groups_hyena_short": cfg.hcs_groups,
        "hyena_filter_order": cfg.hcl_modal_order,
        "hyena_short_conv_len": cfg.hcs_filter_len,
        "hyena_medium_conv_len": cfg.hcm_filter_len,
        "short_conv_L": cfg.featurizer_conv_len,
        "seq_length": context,
        "rotary_base": int(cfg.rope_base),
        "layernorm_epsilon": cfg.norm_eps,
        "vocab_size": cfg.vocab_size,
        "remove_activation_post_first_layer": True,
        "add_attn_proj_bias": True,
        "use_short_conv_bias": False,
    } | (
        {}
        if cfg.rope_scaling_factor == 1.0
        else {"seq_len_interpolation_factor": cfg.rope_scaling_factor}
    )


def config_overrides(model_size: str | None, cfg: ModelConfig, context: int) -> dict[str, Any]:
    """Only values that differ from the NeMo class defaults (fiddle stores only set arguments)."""
    if model_size is None:
        return architecture_values(cfg, context)
    return {} if context == NEMO_SIZES[model_size].seq_length else {"seq_length": context}


def config_class(model_size: str | None) -> str:
    """The NeMo config class for a preset name (the base HyenaConfig when there is none)."""
    return "HyenaConfig" if model_size is None else NEMO_SIZES[model_size].config_class


def io_json(model_size: str | None, context: int, cfg: ModelConfig) -> dict[str, Any]:
    """fiddle JSON of TrainerContext(model=HyenaModel(config=<size config>, tokenizer=ByteLevel))."""
    graph = _FiddleGraph()
    config = graph.config(
        (HYENA_MODULE, config_class(model_size)),
        config_overrides(model_size, cfg, context),
        "<root>.model.config",
    )
    tokenizer = graph.config(TOKENIZER, {}, "<root>.model.tokenizer")
    model = graph.config(
        (HYENA_MODULE, "HyenaModel"), {"config": config, "tokenizer": tokenizer}, "<root>.model"
    )
    root = graph.config(("nemo.lightning.io.pl", "TrainerContext"), {"model": model}, "<root>")
    return {
        "root": root,
        "objects": graph.objects,
        "refcounts": {key: 1 for key in graph.objects},
        "version": "0.0.1",
    }


def model_yaml(model_size: str | None, context: int, cfg: ModelConfig) -> str:
    """context/model.yaml: the HyenaModel with its config, as NeMo writes it."""
    body = {
        "_target_": f"{HYENA_MODULE}.HyenaModel",
        "config": {
            "_target_": f"{HYENA_MODULE}.{config_class(model_size)}",
            **architecture_values(cfg, context),
            "share_embeddings_and_output_weights": True,
        },
        "tokenizer": {"_target_": ".".join(TOKENIZER)},
    }
    return "# NeMo2 model context written by evo2_hydra convert.py target=nemo\n" + yaml.safe_dump(
        body, sort_keys=False
    )


COMMON_PT = {"pytorch-lightning_version": "2.5.0", "epoch": 0, "global_step": 0, "state_dict": {}}


def metadata_json(fmt: NemoFormat) -> dict[str, Any]:
    """weights/metadata.json: exactly the four keys NeMo's loader reads."""
    return {
        "sharded_backend": fmt.value,
        "sharded_backend_version": 1,
        "common_backend": "torch",
        "common_backend_version": 1,
    }


def nemo_to_savanna(weights: Mapping[str, Any], cfg: ModelConfig) -> dict[str, Tensor]:
    """NeMo weights back to a savanna state dict at context = the stored hcm taps (128).

    What NeMo does not store is rebuilt as NeMo itself would: `inv_freq` from the configured RoPE
    base, the hcl `t` buffer as arange; the unused savanna norms are left out (optional keys).
    """

    def get(key: str) -> Tensor:
        if PREFIX + key not in weights:
            raise UserError(f"NeMo checkpoint: {PREFIX}{key} is missing")
        return weights[PREFIX + key]

    out: dict[str, Tensor] = {
        "sequential.0.word_embeddings.weight": get("embedding.word_embeddings.weight")
    }
    taps = cfg.hcm_filter_len
    for layer, kind in enumerate(cfg.layer_types()):
        s, d = f"sequential.{block_index(layer)}.", f"decoder.layers.{layer}."
        if kind == "attention":
            out[s + "input_layernorm.weight"] = get(
                d + "self_attention.linear_qkv.layer_norm_weight"
            )
            out[s + "mixer.dense_projection.weight"] = get(d + "self_attention.linear_qkv.weight")
            out[s + "mixer.dense.weight"] = get(d + "self_attention.linear_proj.weight")
            out[s + "mixer.dense.bias"] = get(d + "self_attention.linear_proj.bias")
            head_dim = cfg.hidden_size // cfg.num_attention_heads
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
            out[s + "mixer.rotary_emb.inv_freq"] = 1.0 / cfg.rope_base**exponents
        else:
            m = d + "mixer."
            out[s + "input_layernorm.weight"] = get(m + "dense_projection.layer_norm_weight")
            out[s + "mixer.dense_projection.weight"] = get(m + "dense_projection.weight")
            out[s + "mixer.hyena_proj_conv.short_conv_weight"] = get(
                m + "hyena_proj_conv.short_conv_weight"
            )
            out[s + "mixer.dense.weight"] = get(m + "dense.weight")
            out[s + "mixer.dense.bias"] = get(m + "dense.bias")
            if kind == "hcs":
                out[s + "mixer.mixer.short_conv.short_conv_weight"] = get(
                    m + "mixer.short_conv.short_conv_weight"
                )
            else:
                out[s + "mixer.mixer.conv_bias"] = get(m + "mixer.conv_bias")
            if kind == "hcm":
                out[s + "mixer.mixer.filter.h"] = get(m + "mixer.filter.h")
                out[s + "mixer.mixer.filter.decay"] = get(m + "mixer.filter.decay")
            if kind == "hcl":
                for name in ("gamma", "R", "p"):
                    out[s + f"mixer.mixer.filter.{name}"] = get(m + f"mixer.filter.{name}")
                out[s + "mixer.mixer.filter.t"] = torch.arange(taps, dtype=torch.float32).view(
                    1, 1, -1
                )
        out[s + "pre_mlp_layernorm.weight"] = get(d + "mlp.linear_fc1.layer_norm_weight")
        fc1 = get(d + "mlp.linear_fc1.weight")
        out[s + "mlp.w1.weight"], out[s + "mlp.w2.weight"] = fc1.chunk(2, dim=0)
        out[s + "mlp.w3.weight"] = get(d + "mlp.linear_fc2.weight")
    out[f"sequential.{final_norm_index(cfg.num_layers)}.norm.weight"] = get(
        "decoder.final_norm.weight"
    )
    return out
