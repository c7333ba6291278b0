"""NeMo2 and Megatron-Bridge (MBridge) Evo 2 checkpoints in, without NeMo or Megatron installed.

Layouts (NVIDIA/bionemo-framework `sub-packages/bionemo-evo2/.../utils/checkpoint/README.md`,
`recipes/evo2_megatron` `nemo2_to_mbridge.py`; NVIDIA/NeMo `nemo/lightning/io/`):
- NeMo2: `DIR/context/{io.json, model.yaml}` + `DIR/weights/` (`metadata.json` names the backend:
  `torch_dist` = PyTorch DCP `.metadata` + `__R_I.distcp`; `zarr` = one zarr v2 array folder per
  key). Keys are Megatron names prefixed `module.`.
- MBridge: `DIR/latest_checkpointed_iteration.txt` + `DIR/iter_NNNNNNN/` (DCP files,
  `metadata.json`, `run_config.yaml` whose `model:` section is the model provider, `common.pt`,
  `train_state.pt`). Keys have no prefix; `DIR` may also be an `iter_*` folder itself.

Tensor-parallel shards are merged by construction: DCP and zarr both store every tensor with its
global shape and the chunk each rank held, so reading into full-size tensors joins them (torch's
DCP reader does it for torch_dist; here, chunk by chunk, for zarr). Before reading, every chunk
is checked to exist and to tile its tensor exactly (a missing `.distcp` file or zarr chunk, or a
chunk grid that does not divide the shape, is one line naming it).

The model comes from the checkpoint's own metadata (`context/model.yaml` `config:`, else the
config class named in `context/io.json`; MBridge `run_config.yaml` `model:`), matched to one of
our model presets by width, depth and operator pattern, with the MLP width, RoPE scaling and
filter sizes as stored. The weights become a savanna state dict through the NeMo key map of
convert/nemo.py (MBridge's names are NeMo's without `module.`; its `--no-te` layout names the
three norms differently and is renamed first). TransformerEngine `_extra_state` objects and
optimizer state are not read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from evo2_hydra.config import ModelConfig
from evo2_hydra.errors import UserError

log = logging.getLogger(__name__)

ITER_RE = re.compile(r"^iter_(\d{7})$")
LATEST_ITERATION = "latest_checkpointed_iteration.txt"
NEMO_PREFIX = "module."

# Megatron / NeMo HyenaConfig / MBridge provider field -> ModelConfig field.
ARCH_FIELDS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "mlp_inner_size",
    "num_attention_heads": "num_attention_heads",
    "hybrid_override_pattern": "operator_pattern",
    "num_groups_hyena": "hcl_groups",
    "num_groups_hyena_medium": "hcm_groups",
    "num_groups_hyena_short": "hcs_groups",
    "hyena_filter_order": "hcl_modal_order",
    "hyena_short_conv_len": "hcs_filter_len",
    "hyena_medium_conv_len": "hcm_filter_len",
    "short_conv_L": "featurizer_conv_len",
    "rotary_base": "rope_base",
    "layernorm_epsilon": "norm_eps",
    "vocab_size": "vocab_size",
    "seq_len_interpolation_factor": "rope_scaling_factor",
}
IDENTITY = ("hidden_size", "num_layers", "operator_pattern")

# MBridge `--no-te` norm names (BNM savanna_to_mbridge / mbridge_to_vortex) -> the TE names NeMo uses.
NO_TE_NAMES = {
    r"^(decoder\.layers\.\d+\.)norm\.weight$": r"\1mixer.dense_projection.layer_norm_weight",
    r"^(decoder\.layers\.\d+\.)input_layernorm\.weight$": r"\1self_attention.linear_qkv.layer_norm_weight",
    r"^(decoder\.layers\.\d+\.)pre_mlp_layernorm\.weight$": r"\1mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class MegatronCheckpoint:
    """A NeMo2 or Megatron-Bridge checkpoint folder as found on disk."""

    kind: str  # "nemo2" | "mbridge"
    root: Path  # the checkpoint folder as given
    weights: Path  # NeMo2 weights/ or MBridge iter_NNNNNNN/
    backend: str  # "torch_dist" | "zarr"
    arch: dict[str, Any]  # model fields from the checkpoint's metadata (Megatron names)
    arch_source: str  # the file they came from
    iteration: int | None

    def describe(self) -> str:
        label = "NeMo2" if self.kind == "nemo2" else "Megatron-Bridge"
        it = "" if self.iteration is None else f", iteration {self.iteration}"
        return f"{self.root} ({label}, {self.backend}{it})"


# ---------------------------------------------------------------------------------------------
# Detection


def _mbridge_iter_dir(root: Path) -> Path:
    latest = root / LATEST_ITERATION
    if latest.is_file():
        text = latest.read_text().strip()
        if not text.isdigit():
            raise UserError(f"{latest}: expected an iteration number, found {text[:40]!r}")
        step = root / f"iter_{int(text):07d}"
        if not step.is_dir():
            raise UserError(f"{latest}: names iteration {text}, but {step} does not exist")
        return step
    steps = sorted(p for p in root.iterdir() if ITER_RE.match(p.name) and p.is_dir())
    return steps[-1]


def detect_megatron(path: str | Path) -> MegatronCheckpoint | None:
    """The NeMo2 / MBridge checkpoint at `path`, or None when it is neither."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "weights").is_dir() and (path / "context").is_dir():
        return _nemo2(path, path / "weights")
    if path.name == "weights" and (path.parent / "context").is_dir():
        return _nemo2(path.parent, path)
    if (path / LATEST_ITERATION).is_file() or any(
        ITER_RE.match(p.name) for p in path.iterdir() if p.is_dir()
    ):
        step = _mbridge_iter_dir(path)
        return _mbridge(path, step)
    if ITER_RE.match(path.name) and (path / "run_config.yaml").is_file():
        return _mbridge(path, path)
    return None


def _backend(weights: Path) -> str:
    meta = weights / "metadata.json"
    if not meta.is_file():
        raise UserError(
            f"{meta}: missing; Megatron writes it last, so the checkpoint is incomplete "
            "(interrupted save or partial copy)"
        )
    try:
        backend = json.loads(meta.read_text()).get("sharded_backend")
    except (ValueError, AttributeError) as err:
        raise UserError(f"{meta}: not a JSON object with sharded_backend") from err
    if backend not in ("torch_dist", "zarr"):
        raise UserError(f"{meta}: sharded_backend={backend!r}; expected torch_dist or zarr")
    return backend


def _nemo2(root: Path, weights: Path) -> MegatronCheckpoint:
    backend = _backend(weights)
    arch, where = _nemo2_arch(root / "context")
    return MegatronCheckpoint("nemo2", root, weights, backend, arch, where, None)


def _mbridge(root: Path, step: Path) -> MegatronCheckpoint:
    backend = _backend(step)
    run_config = step / "run_config.yaml"
    if not run_config.is_file():
        raise UserError(
            f"{run_config}: missing (the model shape of an MBridge checkpoint is read from it)"
        )
    loaded = _yaml(run_config)
    model = loaded.get("model") if isinstance(loaded, dict) else None
    if not isinstance(model, dict):
        raise UserError(f"{run_config}: no `model:` section (the MBridge model provider)")
    m = ITER_RE.match(step.name)
    return MegatronCheckpoint(
        "mbridge", root, step, backend, model, str(run_config), int(m.group(1)) if m else None
    )


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads the `!!python/...` tags of Megatron/NeMo dumps as plain values."""


def _python_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", _python_tag)
_Loader.add_multi_constructor("!", _python_tag)


def _yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not readable YAML: {str(err).splitlines()[0]}") from err


def _nemo2_arch(context: Path) -> tuple[dict[str, Any], str]:
    model_yaml = context / "model.yaml"
    if model_yaml.is_file():
        loaded = _yaml(model_yaml)
        config = loaded.get("config") if isinstance(loaded, dict) else None
        if isinstance(config, dict):
            return config, str(model_yaml)
    io_json = context / "io.json"
    if io_json.is_file():
        return _io_json_arch(io_json), str(io_json)
    raise UserError(f"{context}: neither model.yaml nor io.json (the NeMo2 model context)")


def _io_json_arch(io_json: Path) -> dict[str, Any]:
    """The model config of a fiddle io.json: its NeMo size class's values plus the set arguments."""
    from evo2_hydra.checkpoint.adapters.nemo import NEMO_SIZES

    data = json.loads(io_json.read_text())
    objects = data.get("objects", {})
    for record in objects.values():
        if "<root>.model.config" not in record.get("paths", []):
            continue
        meta = objects.get(record.get("metadata", {}).get("key", ""), {})
        cls = next(
            (
                v.get("name")
                for k, v in meta.get("items", [])
                if "fn_or_cls" in k and isinstance(v, dict)
            ),
            None,
        )
        arch: dict[str, Any] = {}
        size = next((s for s in NEMO_SIZES.values() if s.config_class == cls), None)
        if size is not None:
            arch = {
                "hidden_size": size.hidden_size,
                "num_layers": size.num_layers,
                "ffn_hidden_size": size.ffn_hidden_size,
                "hybrid_override_pattern": size.pattern,
                "seq_length": size.seq_length,
            }
        for key, value in record.get("items", []):
            m = re.match(r"Attr\(name='(\w+)'\)", key)
            if m and isinstance(value, dict) and value.get("type") == "leaf":
                arch[m.group(1)] = value.get("value")
        if arch:
            return arch
    raise UserError(f"{io_json}: no model config found (expected <root>.model.config)")


# ---------------------------------------------------------------------------------------------
# The model


def _preset_models() -> list[ModelConfig]:
    from omegaconf import OmegaConf

    from evo2_hydra.config import REPO_ROOT

    found = []
    for path in sorted((REPO_ROOT / "conf" / "model").glob("*.yaml")):
        raw = OmegaConf.load(path)
        raw.pop("defaults", None)
        found.append(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)))
    return found


def arch_values(ck: MegatronCheckpoint) -> dict[str, Any]:
    """ModelConfig field values the checkpoint's metadata states."""
    out: dict[str, Any] = {}
    for source, target in ARCH_FIELDS.items():
        value = ck.arch.get(source)
        if value is None:
            continue
        if target in ("rope_base", "norm_eps", "rope_scaling_factor"):
            value = float(value)
        elif target != "operator_pattern":
            value = int(value)
        out[target] = value
    missing = [k for k in IDENTITY if k not in out]
    if missing:
        raise UserError(
            f"{ck.arch_source}: no {', '.join(missing)} in the model config "
            f"({'model' if ck.kind == 'mbridge' else 'config'} section)"
        )
    return out


def _shape_text(values: Mapping[str, Any]) -> str:
    return (
        f"hidden {values['hidden_size']}, {values['num_layers']} layers, "
        f"pattern {values['operator_pattern']}"
    )


def model_for(
    ck: MegatronCheckpoint, chosen: ModelConfig | None, chosen_on_cli: bool = False
) -> ModelConfig:
    """The model this checkpoint holds: `chosen` when it matches, else the matching preset.

    Raises:
        UserError: `chosen` was asked for explicitly and does not match, or no preset matches.
    """
    values = arch_values(ck)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}

    def matches(model: ModelConfig) -> bool:
        return all(getattr(model, k) == values[k] for k in IDENTITY)

    if chosen is not None and (matches(chosen) or chosen_on_cli):
        if not matches(chosen):
            raise UserError(
                f"{ck.describe()}: a checkpoint of another model ({_shape_text(values)}, from "
                f"{ck.arch_source}), but model={chosen.name} is "
                f"{_shape_text(dataclasses.asdict(chosen))}; choose the matching model="
            )
        base = chosen
    else:
        base = next((m for m in _preset_models() if matches(m)), None)
        if base is None:
            raise UserError(
                f"{ck.describe()}: no model= preset has {_shape_text(values)} "
                f"(from {ck.arch_source})"
            )
    return dataclasses.replace(base, **{k: v for k, v in values.items() if k in fields})


# ---------------------------------------------------------------------------------------------
# Reading the weights


def read_weights(ck: MegatronCheckpoint) -> dict[str, Tensor]:
    """Every tensor of the checkpoint at its global shape (TP chunks joined), Megatron keys."""
    raw = _read_torch_dist(ck.weights) if ck.backend == "torch_dist" else _read_zarr(ck.weights)
    out = {}
    for key, value in raw.items():
        key = key.removeprefix(NEMO_PREFIX) if ck.kind == "nemo2" else key
        for pattern, repl in NO_TE_NAMES.items():
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _read_torch_dist(folder: Path) -> dict[str, Tensor]:
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (folder / ".metadata").is_file():
        raise UserError(f"{folder}/.metadata: missing (the index of a torch_dist checkpoint)")
    reader = FileSystemReader(str(folder))
    try:
        metadata = reader.read_metadata()
    except Exception as err:  # a damaged pickle fails in many ways
        raise UserError(f"{folder}/.metadata: unreadable: {err}") from err
    files = {info.relative_path for info in metadata.storage_data.values()}
    for name in sorted(files):
        if not (folder / name).is_file():
            raise UserError(f"{folder / name}: missing shard file (listed in {folder}/.metadata)")
    state: dict[str, Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata) or key.startswith(
            ("optimizer.", "rng_state")
        ):
            continue
        covered = sum(math.prod(c.sizes) for c in meta.chunks)
        if covered != math.prod(meta.size):
            raise UserError(
                f"{folder}: {key} has chunks for {covered} of {math.prod(meta.size)} elements "
                "(tensor-parallel shards missing or overlapping)"
            )
        state[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single.*")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


ZARR_DTYPES = {
    "<f4": torch.float32,
    "bfloat16": torch.bfloat16,
    "<f2": torch.float16,
    "<f8": torch.float64,
}


def _read_zarr(folder: Path) -> dict[str, Tensor]:
    state = {}
    for zarray in sorted(folder.glob("*/.zarray")):
        if zarray.parent.name.startswith(("optimizer.", "rng_state")):
            continue
        state[zarray.parent.name] = read_zarr_array(zarray.parent)
    if not state:
        raise UserError(f"{folder}: no zarr arrays (<key>/.zarray) in a zarr checkpoint")
    return state


def read_zarr_array(array_dir: Path) -> Tensor:
    """A zarr v2 array (raw C-order chunks, as Megatron writes them) as one tensor."""
    meta = json.loads((array_dir / ".zarray").read_text())
    where = array_dir / ".zarray"
    if meta.get("compressor") is not None or meta.get("filters"):
        raise UserError(f"{where}: compressed zarr chunks are not supported (Megatron writes raw)")
    if meta["dtype"] not in ZARR_DTYPES:
        raise UserError(
            f"{where}: dtype {meta['dtype']!r}; expected one of {', '.join(ZARR_DTYPES)}"
        )
    shape, chunks = list(meta["shape"]), list(meta["chunks"])
    dtype = ZARR_DTYPES[meta["dtype"]]
    if len(chunks) != len(shape) or any(s % c for s, c in zip(shape, chunks)):
        raise UserError(
            f"{where}: chunks {chunks} do not divide shape {shape} (a tensor-parallel size that "
            "does not divide this tensor)"
        )
    out = torch.empty(shape, dtype=dtype)
    sep = meta.get("dimension_separator", ".")
    itemsize = torch.empty(0, dtype=dtype).element_size()
    grid = [s // c for s, c in zip(shape, chunks)]
    for index in _grid(grid):
        name = sep.join(str(i) for i in index) or "0"
        chunk_file = array_dir / name
        if not chunk_file.is_file():
            raise UserError(f"{chunk_file}: missing chunk (tensor-parallel shard) of {shape}")
        raw = bytearray(chunk_file.read_bytes())
        if len(raw) != math.prod(chunks) * itemsize:
            raise UserError(
                f"{chunk_file}: {len(raw)} bytes, expected {math.prod(chunks) * itemsize} "
                f"(chunk {chunks} of {meta['dtype']})"
            )
        piece = torch.frombuffer(raw, dtype=dtype).reshape(chunks)
        region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))
        out[region] = piece
    return out


def _grid(counts: list[int]):
    if not counts:
        yield ()
        return
    for i in range(counts[0]):
        for rest in _grid(counts[1:]):
            yield (i, *rest)


# ---------------------------------------------------------------------------------------------
# To savanna


def to_savanna(weights: Mapping[str, Tensor], cfg: ModelConfig, where: str) -> dict[str, Tensor]:
    """The savanna (MP=1) state dict of Megatron-named weights, at the stored hcm filter width."""
    from evo2_hydra.checkpoint.adapters.nemo import nemo_to_savanna
    from evo2_hydra.checkpoint.adapters.vortex import block_index

    adapters = [k for k in weights if ".adapter." in k or "linear_in" in k or "linear_out" in k]
    if adapters:
        raise UserError(
            f"{where}: a LoRA checkpoint ({adapters[0]}, ...): it holds adapter tensors only; "
            "import its base checkpoint (checkpoint.pretrained_checkpoint in run_config.yaml)"
        )
    try:
        state = nemo_to_savanna({NEMO_PREFIX + k: v for k, v in weights.items()}, cfg)
    except UserError as err:
        raise UserError(f"{where}: {err}") from err
    # hcl `t` is rebuilt by nemo_to_savanna at NeMo's 128 taps; MBridge keeps the full hcm width.
    hcm = [i for i, kind in enumerate(cfg.layer_types()) if kind == "hcm"]
    width = state[f"sequential.{block_index(hcm[0])}.mixer.mixer.filter.h"].shape[1] if hcm else 128
    for layer, kind in enumerate(cfg.layer_types()):
        if kind == "hcl":
            key = f"sequential.{block_index(layer)}.mixer.mixer.filter.t"
            state[key] = torch.arange(width, dtype=torch.float32).view(1, 1, -1)
    return state


def import_megatron(
    ck: MegatronCheckpoint, chosen: ModelConfig | None = None, chosen_on_cli: bool = False
) -> tuple[dict[str, Tensor], ModelConfig]:
    """(savanna state dict, model) of a NeMo2 / MBridge checkpoint."""
    model = model_for(ck, chosen, chosen_on_cli)
    log.info("%s: model %s (shape from %s)", ck.describe(), model.name, ck.arch_source)
    return to_savanna(read_weights(ck), model, ck.describe()), model


def megatron_top_level(path: Path) -> dict[str, Any]:
    """A model-state top-level dict (checkpoint/loader.py) for a NeMo2 / MBridge folder.

    The model is the preset the checkpoint's metadata matches; the caller checks it against the
    run's model like any checkpoint's shapes.
    """
    from evo2_hydra.checkpoint.adapters import IMPORTED_FROM

    ck = detect_megatron(path)
    if ck is None:
        raise UserError(f"{path}: not a NeMo2 or Megatron-Bridge checkpoint")
    module, _ = import_megatron(ck)
    return {"module": module, "iteration": ck.iteration or 1, IMPORTED_FROM: ck.kind}
