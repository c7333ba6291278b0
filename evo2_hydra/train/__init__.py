"""Finetuning with a real DeepSpeed engine (task=finetune): `run.run_finetune` is the entry."""
