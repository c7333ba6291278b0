"""LoRA checkpoints: what they record, how their base is found and checked, and `merge_lora`.

A LoRA run's checkpoint (train/saving.py, unchanged layout: `global_stepN/mp_rank_00_model_states.pt`
or ZeRO-3 shards) holds the adapter tensors only, and its client state carries `LORA_RECORD`:

    {"method": "lora", "rank": 16, "alpha": 32.0, "dropout": 0.1, "scaling": 2.0,
     "targets": ["sequential.2.mixer.dense_projection", ...],
     "base": {"path": <prepared base folder>, "source": <ckpt.path>, "sha256": <content hash>}}

The content hash is the SHA-256 of the base's manifest (every tensor's name, shape, dtype and
CRC32; checkpoint/writer.py writes it with every checkpoint we produce), so a base rebuilt with
other contents is refused, while the same contents in another folder are accepted.

Everything that reads weights goes through `checkpoint.loader.load_shards`, which calls
`lora_module` for such a checkpoint: the base is memory-mapped and each adapted weight is merged
(`W + alpha/r * B @ A`, in float32) only when that tensor is read, one at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from evo2_hydra.errors import UserError

LORA_RECORD = "evo2_hydra_lora"  # key in the checkpoint's client state
MANIFEST = "manifest.json"


def base_content_hash(base_dir: str | Path) -> str:
    """SHA-256 over the manifest of the checkpoint `base_dir` resolves to (names, shapes, CRC32s)."""
    from evo2_hydra.checkpoint.layout import locate_checkpoint

    location = locate_checkpoint(base_dir)
    manifest = (location.step_dir or location.source.parent) / MANIFEST
    if not manifest.is_file():
        raise UserError(
            f"{manifest}: missing; a LoRA base must be a checkpoint with a manifest (prepared by "
            "task=finetune or written by convert.py target=savanna)"
        )
    entries = json.loads(manifest.read_text()).get("model_states")
    if not isinstance(entries, dict):
        raise UserError(f"{manifest}: no 'model_states' entry; not a manifest of ours")
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def lora_record(
    peft, targets: list[str], base_dir: Path, source: str | None, sha256: str
) -> dict[str, Any]:
    """The client-state entry a LoRA run saves with every checkpoint (plain types only)."""
    return {
        "method": "lora",
        "rank": int(peft.rank),
        "alpha": float(peft.alpha),
        "dropout": float(peft.dropout),
        "scaling": float(peft.alpha) / int(peft.rank),
        "targets": list(targets),
        "base": {"path": str(base_dir), "source": source, "sha256": sha256},
    }


def check_base(record: Mapping[str, Any], where: str) -> Path:
    """The base folder a LoRA checkpoint names, after checking it exists and its hash matches."""
    base = record.get("base") or {}
    path = Path(str(base.get("path")))
    if not path.exists():
        raise UserError(
            f"{where}: LoRA adapters for the base {path} (from {base.get('source')}), which no "
            "longer exists; prepare it again (task=finetune with the run's ckpt.path) or convert "
            "the adapters while the base is there"
        )
    found = base_content_hash(path)
    if found != base.get("sha256"):
        raise UserError(
            f"{where}: LoRA adapters for a base with content hash {str(base.get('sha256'))[:12]}, "
            f"but {path} now has {found[:12]}; the base changed, these adapters do not apply to it"
        )
    return path


def adapter_pairs(adapters: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """`<module>.weight` -> (lora_A [r, in], lora_B [out, r]) from peft's key names."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in adapters.items():
        for which in ("lora_A", "lora_B"):
            marker = f".{which}."
            if marker in key:
                module = key.split(marker)[0]
                pairs.setdefault(module + ".weight", {})[which] = value
    out = {}
    for weight, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise UserError(f"LoRA adapter of {weight} is incomplete (has only {sorted(ab)})")
        out[weight] = (ab["lora_A"], ab["lora_B"])
    return out


class MergedModule(Mapping):
    """A savanna state dict with LoRA adapters merged into it, lazily: reading an adapted weight
    computes `W + scaling * B @ A` in float32 (kept float32, so merged logits equal the
    unmerged model's); every other tensor is the base's own (memory-mapped) tensor.
    """

    def __init__(
        self, base: Mapping[str, Any], adapters: Mapping[str, Tensor], scaling: float
    ) -> None:
        self.base = base
        self.pairs = adapter_pairs(adapters)
        self.scaling = scaling
        missing = [k for k in self.pairs if k not in base]
        if missing:
            raise UserError(f"LoRA adapters for {missing[0]}, which the base does not have")
        for key, (a, b) in self.pairs.items():
            shape = tuple(base[key].shape)
            if (b.shape[0], a.shape[1]) != shape or a.shape[0] != b.shape[1]:
                raise UserError(
                    f"LoRA adapter of {key}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                    f"the base weight {shape}"
                )

    def __getitem__(self, key: str) -> Any:
        value = self.base[key]
        pair = self.pairs.get(key)
        if pair is None:
            return value
        a, b = pair
        return value.float() + self.scaling * (b.float() @ a.float())

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def merge_lora(
    base: Mapping[str, Any], adapters: Mapping[str, Tensor], scaling: float
) -> MergedModule:
    """The base state dict with the adapters merged (lazily, one tensor per read)."""
    return MergedModule(base, adapters, scaling)


def read_lora_record(location) -> dict[str, Any] | None:
    """The LoRA record of a located checkpoint (first model-state file), or None."""
    from evo2_hydra.checkpoint.safe_load import safe_load

    files = location.model_files or [fs[0] for _, fs in sorted(location.zero3_files.items())]
    if not files:
        return None
    top = safe_load(files[0])
    record = top.get(LORA_RECORD) if isinstance(top, dict) else None
    return record if isinstance(record, dict) else None
