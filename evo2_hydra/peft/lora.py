"""LoRA adapters on the StripedHyena 2 model through the `peft` library.

    targets = resolve_targets(model, run.peft)          # full module names, checked
    add_lora(model, run.peft)                           # peft injects; base frozen
    install_adapter_only_state(model)                   # checkpoints hold adapters only

`peft.inject_adapter_in_model` replaces each targeted `nn.Linear` in place by a LoRA layer
(`<name>.base_layer` = the original linear, `<name>.lora_A.default` / `lora_B.default` the
adapter), so the root module stays our `StripedHyena2` and everything that wraps it (DeepSpeed,
ZeRO-3 leaf modules, activation checkpointing) keeps working. Adapters are created after the base
weights are loaded (savanna key names are unchanged until then).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from evo2_hydra.config import PeftConfig
from evo2_hydra.errors import UserError

ADAPTER_NAME = "default"  # peft's adapter name; appears in the state-dict keys
ADAPTER_MARKERS = (".lora_A.", ".lora_B.")


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key names a LoRA adapter tensor (peft's lora_A / lora_B)."""
    return any(marker in key for marker in ADAPTER_MARKERS)


def _matches(name: str, pattern: str) -> bool:
    """A pattern matches a module name it ends with (dot-separated) or as an fnmatch pattern."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def _short_names(model: nn.Module) -> list[str]:
    """Module names without the layer index (`mixer.dense`, `mlp.w1`, ...), for error messages."""
    out: dict[str, None] = {}
    for name, _ in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] == "sequential" and parts[1].isdigit():
            out[".".join(parts[2:])] = None
        elif name:
            out[name] = None
    return list(out)


def resolve_targets(model: nn.Module, peft: PeftConfig) -> list[str]:
    """Full names of the linear modules `peft.targets` selects; bad patterns or ranks: UserError."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: dict[str, None] = {}
    for pattern in peft.targets:
        hits = [n for n in linears if _matches(n, pattern)]
        if not hits:
            others = [
                n
                for n, m in model.named_modules()
                if n and _matches(n, pattern) and not isinstance(m, nn.Linear)
            ]
            if others:
                raise UserError(
                    f"peft.targets: {pattern!r} matches {others[0]} ({type(dict(model.named_modules())[others[0]]).__name__}), "
                    f"not a linear layer; LoRA adapts nn.Linear modules only: "
                    f"{', '.join(sorted({n.split('.', 2)[-1] for n in linears}))}"
                )
            raise UserError(
                f"peft.targets: {pattern!r} matches no module (patterns {list(peft.targets)}); "
                f"module names are: {', '.join(_short_names(model))}"
            )
        chosen.update(dict.fromkeys(hits))
    for name in chosen:
        layer = linears[name]
        limit = min(layer.in_features, layer.out_features)
        if peft.rank > limit:
            raise UserError(
                f"peft.rank={peft.rank} is larger than {name} ({layer.in_features} -> "
                f"{layer.out_features} features); use peft.rank <= {limit}"
            )
    return list(chosen)


def lora_config(peft: PeftConfig, targets: list[str]):
    """peft's LoraConfig for our settings and the resolved target module names."""
    from peft import LoraConfig

    return LoraConfig(
        r=peft.rank,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=targets,  # full names: peft matches them exactly
        bias="none",
        init_lora_weights=True,  # A: kaiming-uniform, B: zeros (the adapted model starts as the base)
    )


def add_lora(model: nn.Module, peft: PeftConfig) -> list[str]:
    """Inject LoRA adapters in place, freeze everything else; returns the adapted module names.

    Seed torch first: lora_A is drawn from torch's generator, so every rank gets the same one.
    """
    from peft import inject_adapter_in_model

    targets = resolve_targets(model, peft)
    inject_adapter_in_model(lora_config(peft, targets), model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        param.requires_grad = is_adapter_key("." + name)
    embedding = getattr(model, "sequential", [None])[0]
    if embedding is not None:
        # The frozen embedding's output does not require grad, so neither do the first block's
        # inputs: activation checkpointing would then not recompute-with-grad that block, and
        # ZeRO-3's backward hooks (which ride on tensors that require grad) would not re-gather
        # the adapters' partitions. peft/transformers' `enable_input_require_grads` does the same.
        embedding.register_forward_hook(_output_requires_grad)
    return targets


def _output_requires_grad(module, inputs, output):
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)


def adapter_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Only the adapter tensors of a model state dict (what a LoRA checkpoint holds)."""
    return {k: v for k, v in state.items() if is_adapter_key("." + k)}


def install_adapter_only_state(model: nn.Module) -> None:
    """From now on `model.state_dict()` holds the adapters only, and loading such a state dict
    does not report the (frozen, separately loaded) base weights as missing.

    DeepSpeed saves and resumes the module through these two calls, so a LoRA run's checkpoints
    are adapter-only and `engine.load_checkpoint` accepts them at every ZeRO stage.
    """

    def keep_adapters(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if not is_adapter_key("." + k)]:
            del state_dict[key]

    def ignore_missing_base(module, incompatible):
        incompatible.missing_keys[:] = [
            k for k in incompatible.missing_keys if is_adapter_key("." + k)
        ]

    model.register_state_dict_post_hook(keep_adapters)
    model.register_load_state_dict_post_hook(ignore_missing_base)


def count_adapter_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable adapter parameters, all parameters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def lora_parameter_count(
    shapes: Mapping[str, tuple[int, ...]], peft: PeftConfig, targets: list[str]
) -> int:
    """Adapter parameters for `targets` given the base `<name>.weight` shapes: r x (in + out)."""
    return sum(peft.rank * (shapes[t + ".weight"][0] + shapes[t + ".weight"][1]) for t in targets)
