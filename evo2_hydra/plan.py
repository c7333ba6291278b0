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
from evo2_hydra.train.memory import run_memory_estimate


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
    """task=plan section: the estimate for this run's ZeRO stage, world size, batch and context."""
    est = run_memory_estimate(run)
    t = run.train
    verdict = "fits" if est.fits else "does NOT fit (launch.py refuses it unless plan.force=true)"
    lines = [
        f"ZeRO-{t.zero_stage}, {t.precision.value}, world size {run.cluster.world_size}, "
        f"micro batch {t.micro_batch_size} x context {run.ckpt.context}, activation "
        f"checkpointing {'on' if t.activation_checkpointing else 'off'}",
        f"weights      {est.weights_gb:8.2f} GiB",
        f"gradients    {est.grads_gb:8.2f} GiB",
        f"optimizer    {est.optimizer_gb:8.2f} GiB",
        f"buffers      {est.buffers_gb:8.2f} GiB",
        f"activations  {est.activations_gb:8.2f} GiB",
        f"overhead     {est.overhead_gb:8.2f} GiB",
        f"total        {est.total_gb:8.2f} GiB per GPU of {est.gpu_memory_gb:g} GiB "
        f"(cluster.gpu_memory_gb): {verdict}",
    ]
    return PlanSection(
        title="memory per GPU (estimate; formulas in evo2_hydra/train/memory.py)",
        lines=lines,
        data={"memory": est.as_dict()},
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
