"""Forward+backward timing of the model on CPU: evo2_tiny, and one 1B-shaped block of each type.

    python benchmarks/bench_model.py                       # contexts 1k, 4k, 16k (minutes on 2 cores)
    python benchmarks/bench_model.py --contexts 512 1024 2048 --reps 1

evo2_tiny is timed as a whole model. A 1B block is timed in its two halves, whose sum is the block:
its mixer (norm, projections, featurizer, operator, out-projection; one per block type) and its MLP
(norm + the bilinear GLU, the same in all four types, so it is measured once per context). The
sequence operator alone (hcs conv, hcm/hcl FFT conv, causal attention core) is timed too, because
the linear layers hide how the operators grow. For each series it prints tokens/s, the ratio to the
first context (measured in this run, so machine load largely cancels out) and the exponent k of a
least-squares fit time ~ L^k: Hyena operators should show k ~ 1 (L log L), attention k -> 2 (L^2)
once the quadratic part dominates. One untimed warm-up runs at the smallest context only.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from evo2_hydra.config import ModelConfig  # noqa: E402
from evo2_hydra.model import build_model  # noqa: E402
from evo2_hydra.model.model import Block  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def load_model_config(name: str) -> ModelConfig:
    values = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    values.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), values))


def time_fwd_bwd(step: Callable[[], torch.Tensor], reps: int, warmup: bool) -> float:
    """Median seconds of forward + backward over `reps` runs."""
    if warmup:
        step().sum().backward()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step().sum().backward()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def single_block(cfg: ModelConfig, kind: str, context: int) -> Block:
    """Layer 1 of a model whose layer 0 is hcs, so the MLP is the bilinear (non-GELU) one."""
    symbol = {"hcs": "S", "hcm": "D", "hcl": "H", "attention": "*"}[kind]
    one = dataclasses.replace(cfg, num_layers=2, operator_pattern="S" + symbol)
    torch.manual_seed(0)
    return build_model(one, context, device="cpu").blocks[1]


def operator_step(block: Block, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The sequence-mixing core only (no projections, no MLP)."""
    mixer = block.mixer
    if block.kind == "attention":
        heads, head_dim = mixer.heads, mixer.head_dim
        q = x.view(1, -1, heads, head_dim).transpose(1, 2)
        return lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)
    return lambda: mixer.mixer(x)


def fit_exponent(contexts: list[int], seconds: list[float]) -> float:
    xs = [math.log(c) for c in contexts]
    ys = [math.log(s) for s in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def report(name: str, contexts: list[int], series: dict[str, list[float]]) -> None:
    """One row per context; per series: seconds, tokens/s, ratio to the first context."""
    print(f"\n{name}")
    header = f"  {'context':>8}"
    for label in series:
        header += f" | {label + ' s':>14} {'tok/s':>7} {'ratio':>6}"
    print(header)
    for i, c in enumerate(contexts):
        line = f"  {c:>8}"
        for secs in series.values():
            line += f" | {secs[i]:>14.4f} {c / secs[i]:>7.0f} {secs[i] / secs[0]:>6.1f}"
        print(line)
    fits = ", ".join(
        f"{label} k = {fit_exponent(contexts, secs):.2f}" for label, secs in series.items()
    )
    print(f"  time ~ L^k: {fits}   (contexts span {contexts[-1] // contexts[0]}x)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--reps", type=int, default=1, help="timed runs per point (median)")
    parser.add_argument(
        "--op-reps",
        type=int,
        default=3,
        help="timed runs of the operators (1 at the largest context)",
    )
    parser.add_argument("--kinds", nargs="+", default=["hcs", "hcm", "hcl", "attention"])
    args = parser.parse_args()
    contexts = sorted(args.contexts)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch 1, CPU")
    print(f"load average at start {os.getloadavg()[0]:.1f} (other processes skew absolute times)")
    wall = time.perf_counter()

    tiny = load_model_config("evo2_tiny")
    torch.manual_seed(0)
    model = build_model(tiny, contexts[-1], device="cpu")
    tiny_s = []
    for c in contexts:
        ids = torch.randint(0, 512, (1, c))
        tiny_s.append(time_fwd_bwd(lambda ids=ids: model(ids), args.op_reps, warmup=True))
    params = sum(p.numel() for p in model.parameters())
    report(f"evo2_tiny full model ({params:,} parameters)", contexts, {"model": tiny_s})

    big = load_model_config("evo2_1b")
    mlp_s = []
    for i, c in enumerate(contexts):
        block = single_block(big, "hcs", c)
        x = torch.randn(1, c, big.hidden_size, requires_grad=True)
        step = lambda block=block, x=x: block.mlp(block.pre_mlp_layernorm(x))  # noqa: E731
        mlp_s.append(time_fwd_bwd(step, args.reps, warmup=i == 0))
    report(
        f"evo2_1b MLP half of a block (F={big.mlp_inner_size}, all types)", contexts, {"mlp": mlp_s}
    )

    for kind in args.kinds:
        mixer_s, op_s = [], []
        for i, c in enumerate(contexts):
            block = single_block(big, kind, c)
            x = torch.randn(1, c, big.hidden_size, requires_grad=True)
            step = lambda block=block, x=x: block.mixer(block.input_layernorm(x))  # noqa: E731
            mixer_s.append(time_fwd_bwd(step, args.reps, warmup=i == 0))
            reps = args.op_reps if c < contexts[-1] else 1  # the largest attention core is slow
            op_s.append(time_fwd_bwd(operator_step(block, x), reps, warmup=i == 0))
            del block
        block_s = [m + p for m, p in zip(mixer_s, mlp_s)]
        report(
            f"evo2_1b single {kind} block (D={big.hidden_size})",
            contexts,
            {"block": block_s, "mixer": mixer_s, "operator": op_s},
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS {peak:.1f} GiB, wall {time.perf_counter() - wall:.0f} s")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
