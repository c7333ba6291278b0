"""StripedHyena 2 (Evo 2) in plain PyTorch with savanna's exact state_dict layout.

model = build_model(run.model, run.ckpt.context)                  # meta: nothing allocated
load_into_model(model, state_dict, run.model, run.ckpt.context)   # strict, materializes
logits = model(input_ids)                                         # [B, L, 512]
"""

from evo2_hydra.model.model import Block, StripedHyena2, build_model, init_weights
from evo2_hydra.model.state import (
    IGNORED_SUFFIXES,
    OPTIONAL_SUFFIXES,
    check_state_dict,
    expected_state_dict_shapes,
    load_into_model,
)

__all__ = [
    "Block",
    "IGNORED_SUFFIXES",
    "OPTIONAL_SUFFIXES",
    "StripedHyena2",
    "build_model",
    "check_state_dict",
    "expected_state_dict_shapes",
    "init_weights",
    "load_into_model",
]
