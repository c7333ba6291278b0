"""evo2_hydra: finetune Evo 2 (StripedHyena 2) models and move their checkpoints between formats."""

__version__ = "0.1.0"
