"""Peak memory and time of scoring one long sequence, chunked vs unchunked, as length grows.

    python benchmarks/bench_long.py                           # 1B width, blocks SDH*, 4K..16K
    python benchmarks/bench_long.py --lengths 8192 16384 32768 --chunk 2048 --pattern SDH*SDH*
    python benchmarks/bench_long.py --lengths 8192 16384 32768 65536 131072 --chunk 4096 --unchunked-max 65536

Each point runs in a fresh process (procstat.measure): a model of evo2_1b's width (hidden 1920,
MLP 5120, 15 heads) with `--pattern` blocks (one of each kind by default) and random weights,
float32, computes the per-position log-probabilities of a random sequence (what task=score does)
either in one forward or in exact chunks (evo2_hydra/model/chunked.py). Reported: the forward's
wall time, the process's peak anonymous memory (RssAnon, polled) and that peak minus the memory
held before the forward (weights, input), next to infer/memory.py's estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def model_cfg(pattern: str):
    from omegaconf import OmegaConf

    from evo2_hydra.config import ModelConfig

    values = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "evo2_1b.yaml"))
    values.pop("defaults", None)
    values.update(name="evo2_1b_slice", num_layers=len(pattern), operator_pattern=pattern)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), values))


def rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(length: int, chunk: int, pattern: str, threads: int) -> None:
    import torch

    from evo2_hydra.infer.common import resolve_chunk, sequence_log_probs
    from evo2_hydra.model import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = model_cfg(pattern)
    model = build_model(cfg, 8192, device="cpu").eval()
    ids = torch.randint(65, 90, (1, length))
    before = rss_anon_mib()
    started = time.perf_counter()
    chunk = resolve_chunk(chunk, model, cfg, 1, length)  # as task=score resolves it
    with torch.no_grad():
        lp = sequence_log_probs(model, ids, chunk)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "before_mib": before, "mean_lp": lp.mean().item()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--pattern", default="SDH*")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--unchunked-max",
        type=int,
        default=0,
        help="skip the unchunked forward above this many tokens (0: never skip); "
        "on a 24 GiB host the 1B-width unchunked forward of 128K tokens does not fit",
    )
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.pattern, args.threads)
        return

    import torch
    from procstat import measure

    from evo2_hydra.infer.memory import forward_bytes

    cfg = model_cfg(args.pattern)
    print(f"load average: {os.getloadavg()}")
    header = "| tokens | mode | forward s | peak RssAnon MiB | forward's own MiB | estimate MiB | mean log-prob |"
    print(header + "\n|---|---|---|---|---|---|---|")
    for length in args.lengths:
        for chunk in (0, args.chunk):
            if not chunk and args.unchunked_max and length > args.unchunked_max:
                estimate = forward_bytes(cfg, 1, length, 0, torch.float32) / 2**30
                print(
                    f"| {length} | unchunked | skipped: estimate {estimate:.1f} GiB, over --unchunked-max |"
                )
                continue
            out: list[str] = []
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(length),
                str(chunk),
                "--pattern",
                args.pattern,
                "--threads",
                str(args.threads),
            ]
            try:
                stats = measure(cmd, cwd=REPO, stdout=out)
            except SystemExit as err:
                print(f"| {length} | {chunk} | failed: {str(err).splitlines()[-1]} |")
                continue
            result = json.loads(out[-1].strip().splitlines()[-1])
            estimate = forward_bytes(cfg, 1, length, chunk, torch.float32) / 2**20
            mode = f"chunks of {chunk}" if chunk else "unchunked"
            print(
                f"| {length} | {mode} | {result['seconds']:.1f} | {stats['peak_rss_anon_mb']:.0f} | "
                f"{stats['peak_rss_anon_mb'] - result['before_mib']:.0f} | {estimate:.0f} | "
                f"{result['mean_lp']:.6f} |",
                flush=True,
            )
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
