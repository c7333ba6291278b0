"""Parameter-efficient finetuning (LoRA through the `peft` library) and LoRA checkpoints.

lora.py   inject adapters into the model, freeze the base, adapter-only state dicts
merge.py  what a LoRA checkpoint records, checking its base, `merge_lora` (lazy, per tensor)
"""

from evo2_hydra.peft.merge import LORA_RECORD, merge_lora

__all__ = ["LORA_RECORD", "merge_lora"]
