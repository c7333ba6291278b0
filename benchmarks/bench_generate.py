"""Generation speed of evo2_tiny on CPU: cached (prefill + one decode step per token) vs uncached
(the whole prefix re-run for every token), in new tokens per second, measured in the same run.

    python benchmarks/bench_generate.py                       # prompts of 64 and 1024, 256 new tokens
    python benchmarks/bench_generate.py --prompts 16 --new 128 --threads 2

Random weights (the speed does not depend on their values); greedy decoding over printable ASCII,
so both paths produce the same tokens (checked). The machine may be shared: compare the ratio, and
read the load average printed at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evo2_hydra.generate import allowed_tokens, generate_tokens  # noqa: E402
from evo2_hydra.model import build_model  # noqa: E402
from tests.vtx_reference import model_config  # noqa: E402


def tokens_per_second(model, prompt: list[int], n: int, new: int, cached: bool, repeats: int):
    allowed = allowed_tokens(model.embedding.weight.shape[0], stop_at_eod=False)

    def greedy(logits):
        return logits.masked_fill(~allowed, float("-inf")).argmax(dim=-1)

    best, tokens = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate_tokens(model, prompt, n, new, greedy, cached=cached)
        best = min(best, time.perf_counter() - start)
        tokens = [g.tokens for g in out]
    return n * new / best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--new", type=int, default=256, help="new tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences generated together")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = model_config("evo2_tiny")
    context = max(args.prompts) + args.new
    model = build_model(cfg, context, device="cpu").eval()

    print(f"evo2_tiny, CPU, {args.threads} thread(s), batch {args.batch}, {args.new} new tokens")
    print(f"{'prompt':>7} {'cached tok/s':>13} {'uncached tok/s':>15} {'speed-up':>9}")
    for length in args.prompts:
        prompt = torch.randint(65, 90, (length,), generator=torch.Generator().manual_seed(1))
        cached, a = tokens_per_second(
            model, prompt.tolist(), args.batch, args.new, True, args.repeats
        )
        uncached, b = tokens_per_second(
            model, prompt.tolist(), args.batch, args.new, False, args.repeats
        )
        same = "" if a == b else "  (tokens differ!)"
        print(f"{length:>7} {cached:>13.1f} {uncached:>15.1f} {cached / uncached:>8.1f}x{same}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
