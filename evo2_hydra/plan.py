"""`task=plan`: what a run would hold, computed on the meta device (no weights are allocated).

    python launch.py task=plan model=evo2_7b ckpt.context=8192
    python launch.py task=plan model=evo2_40b ckpt=savanna_evo2_40b plan.format=json

The report is a list of sections; each section contributes text lines and keys of the one JSON
object. New sections (e.g. a memory estimate) are added by appending a builder to
`SECTION_BUILDERS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from evo2_hydra.config import Dtype, ModelConfig, OutputFormat, RunConfig
from evo2_hydra.model import build_model
from evo2_hydra.train.memory import (
    _shape,
    candidates,
    recommend,
    run_memory_estimate,
    short_table,
)


@dataclass
class PlanSection:
    """One section of the plan: a title, its text lines and its JSON data."""

    title: str
    lines: list[str] = field(default_factory=list)  # the text rendering
    data: dict[str, Any] = field(default_factory=dict)  # merged into the JSON object


def weight_dtype(precision: Dtype) -> torch.dtype:
    """Dtype the run keeps its weights in (bf16 training keeps bf16 module weights)."""
    return torch.bfloat16 if precision == Dtype.bfloat16 else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")


def model_section(model_cfg: ModelConfig, context: int, dtype: torch.dtype) -> PlanSection:
    """Parameter table (name, shape, dtype), parameter count and bytes, from a meta build."""
    model = build_model(model_cfg, context, device="meta", dtype=dtype)
    params = [
        {"name": n, "shape": list(p.shape), "dtype": _dtype_name(p.dtype)}
        for n, p in model.named_parameters()
    ]
    buffers = [
        {"name": n, "shape": list(b.shape), "dtype": _dtype_name(b.dtype)}
        for n, b in model.named_buffers()
    ]
    param_count = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())

    width = max(len(p["name"]) for p in params + buffers)
    lines = [f"{'name':<{width}}  {'shape':<22} dtype"]
    for kind, rows in (("", params), (" (buffer)", buffers)):
        for row in rows:
            shape = "[" + ", ".join(map(str, row["shape"])) + "]"
            lines.append(f"{row['name']:<{width}}  {shape:<22} {row['dtype']}{kind}")
    lines += [
        "",
        f"parameters: {param_count:,} ({param_count / 1e9:.3f} B)",
        f"parameter bytes: {param_bytes:,} ({_human_bytes(param_bytes)})",
        f"buffer bytes (decay, t, inv_freq): {buffer_bytes:,} ({_human_bytes(buffer_bytes)})",
        f"weights in a checkpoint: {param_bytes + buffer_bytes:,} ({_human_bytes(param_bytes + buffer_bytes)})",
    ]
    data = {
        "model": model_cfg.name,
        "context": context,
        "dtype": _dtype_name(dtype),
        "parameters": params,
        "buffers": buffers,
        "parameter_count": param_count,
        "parameter_bytes": param_bytes,
        "buffer_bytes": buffer_bytes,
        "weight_bytes": param_bytes + buffer_bytes,
    }
    title = f"model {model_cfg.name} at context {context} ({_dtype_name(dtype)} weights)"
    return PlanSection(title=title, lines=lines, data=data)


def _model_builder(run: RunConfig) -> PlanSection:
    return model_section(run.model, run.ckpt.context, weight_dtype(run.train.precision))


def memory_section(run: RunConfig) -> PlanSection:
    """task=plan section: this run's estimate, the candidate table and the recommendation."""
    est = run_memory_estimate(run)
    t = run.train
    verdict = "fits" if est.fits else "does NOT fit (launch.py refuses it unless plan.force=true)"
    method = f"LoRA r={run.peft.rank}" if run.peft.enabled else "full finetune"
    lines = [
        f"{method}, ZeRO-{t.zero_stage}, {t.precision.value}, {_shape(run)} (world size "
        f"{run.cluster.world_size}), micro batch {t.micro_batch_size} x context "
        f"{run.ckpt.context}, activation checkpointing "
        f"{'on' if t.activation_checkpointing else 'off'}, offload {t.offload.value}",
        f"trainable    {est.trainable:,} of {est.params:,} parameters",
        f"weights      {est.weights_gb:8.2f} GiB",
        f"gradients    {est.grads_gb:8.2f} GiB",
        f"optimizer    {est.optimizer_gb:8.2f} GiB",
        f"gathered     {est.live_gb:8.2f} GiB (ZeRO-3 working set)",
        f"buffers      {est.buffers_gb:8.2f} GiB",
        f"activations  {est.activations_gb:8.2f} GiB",
        f"overhead     {est.overhead_gb:8.2f} GiB",
        f"total        {est.total_gb:8.2f} GiB per GPU of {est.gpu_memory_gb:g} GiB "
        f"(cluster.gpu_memory_gb): {verdict}",
    ]
    if est.host_gb:
        host = "unknown" if est.host_memory_gb is None else f"{est.host_memory_gb:.0f} GiB"
        lines.append(f"offloaded    {est.host_gb:8.2f} GiB CPU memory per node of {host}")
    cands = candidates(run)
    best = recommend(run, cands)
    table = short_table(run, cands)
    if best is not None and best not in table:
        table.append(best)
    lines += [
        "",
        "candidates (per GPU; relative cost: 1.0 = full finetune, ZeRO-1, no recomputation):",
        f"  {'method':<6} {'ZeRO':>4} {'act.ckpt':>8} {'offload':<20} {'micro':>5} "
        f"{'GiB/GPU':>8} {'host GiB':>8} {'cost':>5}  fits",
    ]
    for c in table:
        e = c.estimate
        mark = "  <- cheapest that fits" if c is best else ""
        lines.append(
            f"  {'LoRA' if c.lora else 'full':<6} {c.zero_stage:>4} "
            f"{'on' if c.checkpointing else 'off':>8} {c.offload.value:<20} {c.micro_batch:>5} "
            f"{e.total_gb:8.1f} {e.host_gb:8.1f} {c.cost:5.2f}  "
            f"{'yes' if e.fits else 'no'}{mark}"
        )
    if best is None:
        lines.append("nothing fits: use more or larger GPUs or a shorter ckpt.context")
    else:
        lines.append(f"recommended: {best.overrides(run)}")
    data = {
        "memory": est.as_dict(),
        "candidates": [
            {
                "peft": "lora" if c.lora else "none",
                "zero_stage": c.zero_stage,
                "activation_checkpointing": c.checkpointing,
                "offload": c.offload.value,
                "micro_batch_size": c.micro_batch,
                "gpu_gb": c.estimate.total_gb,
                "host_gb": c.estimate.host_gb,
                "cost": c.cost,
                "fits": c.estimate.fits,
            }
            for c in table
        ],
        "recommended": None
        if best is None
        else {
            "overrides": best.overrides(run),
            "label": best.label(),
            "gpu_gb": best.estimate.total_gb,
            "cost": best.cost,
        },
    }
    return PlanSection(
        title="memory per GPU (estimate; formulas in evo2_hydra/train/memory.py)",
        lines=lines,
        data=data,
    )


# Each builder takes the run config and returns one section, in report order.
SECTION_BUILDERS: list[Callable[[RunConfig], PlanSection]] = [_model_builder, memory_section]


def build_plan(run: RunConfig) -> list[PlanSection]:
    """Every plan section for this run, in report order."""
    return [builder(run) for builder in SECTION_BUILDERS]


def render_text(sections: list[PlanSection]) -> str:
    """The plan as text tables."""
    out: list[str] = []
    for section in sections:
        out += [f"== {section.title}", *section.lines, ""]
    return "\n".join(out)


def render_json(sections: list[PlanSection]) -> str:
    """The plan as one JSON object (sections may not define the same keys)."""
    merged: dict[str, Any] = {}
    for section in sections:
        clash = set(merged) & set(section.data)
        if clash:
            raise ValueError(f"plan sections define the same JSON keys: {sorted(clash)}")
        merged.update(section.data)
    return json.dumps(merged)


def run_plan(run: RunConfig) -> list[PlanSection]:
    """Print the plan (text table or one JSON object on stdout) and return its sections."""
    sections = build_plan(run)
    print(render_json(sections) if run.plan.format == OutputFormat.json else render_text(sections))
    return sections
