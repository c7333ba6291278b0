"""Training throughput, MFU and peak memory: full vs LoRA, with and without activation checkpointing.

    python benchmarks/bench_train.py                  # GPU: evo2_1b at 8K and a 7B-width slice, bf16
    python benchmarks/bench_train.py --tiny           # CPU: evo2_tiny at 256 tokens (what the test runs)

Each configuration runs the training step task=finetune runs (forward, loss, backward, AdamW step on
the trainable parameters; LoRA through `peft` as in `peft=lora`), `--warmup` untimed steps, then
`--steps` timed ones, and reports tokens/s per GPU, MFU and peak memory.

FLOPs: every operator of one training step is counted by torch's FlopCounterMode (matmuls,
linear layers, convolutions, attention, in forward and backward, recomputation included when
checkpointing), plus the FFT convolutions of the Hyena operators, which FlopCounterMode does not
count: per FFT of n points 2.5 n log2 n real FLOPs (half a complex FFT's 5 n log2 n), three per
channel and layer (signal, filter, inverse) at n = 2L, forward once and backward twice. MFU =
counted FLOPs / step time / peak (H100 SXM bf16 dense 989 TFLOP/s; `--peak-tflops` to change;
on CPU MFU is not meaningful and not printed). Peak memory: torch.cuda.max_memory_allocated on
GPU, the process's VmHWM on CPU.

Anchor: BioNeMo's Megatron-Bridge Evo 2 1B, 26,859 tokens/s/GPU in bf16 on H100.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evo2_hydra.config import ModelConfig, PeftConfig, PeftMethod  # noqa: E402
from evo2_hydra.model import build_model  # noqa: E402

ANCHOR_TOKENS_PER_S = 26_859  # BioNeMo Megatron-Bridge Evo 2 1B, bf16, H100, per GPU
H100_BF16_TFLOPS = 989.0


def model_config(name: str) -> ModelConfig:
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "model" / f"{name}.yaml"
    data = OmegaConf.to_container(OmegaConf.load(conf))
    data.pop("defaults", None)
    return ModelConfig(**data)


def fft_flops(cfg: ModelConfig, tokens: int, micro_batch: int) -> float:
    """FLOPs of the Hyena FFT convolutions in one training step (forward + 2x backward)."""
    n = 2 * tokens
    per_fft = 2.5 * n * math.log2(n)
    hyena_layers = sum(1 for k in cfg.layer_types() if k in ("hcm", "hcl"))
    return 3 * per_fft * cfg.hidden_size * hyena_layers * micro_batch * 3


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_config(cfg, context, micro_batch, *, lora, checkpointing, device, dtype, steps, warmup):
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(
        cfg, context, device=device, dtype=dtype, checkpoint_activations=checkpointing
    )
    if lora:
        from evo2_hydra.peft.lora import add_lora

        add_lora(model, PeftConfig(method=PeftMethod.lora))
        model.to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    tokens = torch.randint(1, 255, (micro_batch, context + 1), device=device)

    def step():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops() + fft_flops(cfg, context, micro_batch)
    for _ in range(max(warmup - 1, 0)):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {
        "tokens_per_s": micro_batch * context / seconds,
        "tflops": flops / seconds / 1e12,
        "flops_per_step": flops,
        "peak_gb": peak_memory_gb(device),
        "trainable": sum(p.numel() for p in params),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="evo2_tiny on CPU (the suite runs it)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS)
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        dtype = torch.bfloat16
        one_b = model_config("evo2_1b")
        seven = model_config("evo2_7b")
        # a 7B-width slice: the 7B's widths, 4 layers (one of each operator), fits one GPU
        slice_7b = replace(seven, name="evo2_7b_slice", num_layers=4, operator_pattern="SDH*")
        setups = [(one_b, 8192), (slice_7b, 8192)]
    else:
        dtype = torch.float32  # CPU bf16 matmuls are emulated; the tiny run checks the harness
        setups = [(model_config("evo2_tiny"), 256)]
    results = []
    print(f"device {device}, dtype {dtype}, micro batch {args.micro_batch}")
    print(f"{'model':<14} {'ctx':>6} {'method':<5} {'ckpt':<4} {'tokens/s':>10} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak GiB':>8} {'trainable':>13}")  # fmt: skip
    for cfg, context in setups:
        for lora in (False, True):
            for ckpt in (False, True):
                r = run_config(
                    cfg, context, args.micro_batch, lora=lora, checkpointing=ckpt, device=device,
                    dtype=dtype, steps=args.steps, warmup=args.warmup,
                )  # fmt: skip
                r.update(model=cfg.name, context=context, lora=lora, checkpointing=ckpt)
                mfu = f"{100 * r['tflops'] / args.peak_tflops:5.1f}%" if gpu else "   n/a"
                print(
                    f"{cfg.name:<14} {context:>6} {'LoRA' if lora else 'full':<5} "
                    f"{'on' if ckpt else 'off':<4} {r['tokens_per_s']:>10,.0f} "
                    f"{r['tflops']:>8.3f} {mfu:>6} {r['peak_gb']:>8.2f} {r['trainable']:>13,}"
                )
                results.append(r)
    if gpu:
        print(
            f"anchor: BioNeMo Megatron-Bridge Evo 2 1B {ANCHOR_TOKENS_PER_S:,} tokens/s/GPU (H100)"
        )
    return results


if __name__ == "__main__":
    main()
