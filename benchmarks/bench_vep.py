"""Variants per second of task=vep's shared path vs two full forwards per variant.

    python benchmarks/bench_vep.py [--window 2048] [--repeat 3]

Same model (the demo's base checkpoint, examples/evo2_tiny_base), same process, same variants
(examples/vep/variants.vcf: 10 variants at 8 sites, SNVs, an insertion, a deletion), float32 on
the CPU with 1 thread (a tiny model's ops are too small to split). On a shared machine CPU time is the fairer
measure of the work (1 thread); both are printed. Shared: each site's reference
window is scored once and every alternative continues from the reference's state at the variant;
naive: each variant's reference and alternative windows are scored from scratch. Both give the
same deltas (checked here and in tests/test_vep.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import torch

    from evo2_hydra.config import OnError
    from evo2_hydra.infer.variants import open_reference, read_variants
    from evo2_hydra.infer.vep import alt_window, build_sites, score_from_scratch, score_site
    from evo2_hydra.score import load_scoring_model
    from tests.vtx_reference import model_config

    torch.set_num_threads(1)
    cfg = model_config("evo2_tiny")
    ckpt = type("Ckpt", (), {})()
    ckpt.path, ckpt.trust_pickle, ckpt.interleave_legacy, ckpt.source_context = (
        str(REPO / "examples" / "evo2_tiny_base"),
        False,
        False,
        None,
    )
    ckpt.context = 8192
    model = load_scoring_model(cfg, ckpt, torch.float32, torch.device("cpu"))
    example = REPO / "examples" / "vep"
    variants = read_variants(str(example / "variants.vcf"))
    fasta = open_reference(str(example / "reference.fa"), Path("/tmp/evo2_bench_vep_fai"))
    sites, _ = build_sites(variants, fasta, args.window, 8192, OnError.fail)
    n = sum(len(s.variants) for s in sites)
    print(
        f"load average {os.getloadavg()}; {n} variants at {len(sites)} sites, window {args.window}"
    )

    def shared():
        return [r["delta"] for s in sites for r in score_site(model, s, 0, True, False)]

    def naive():  # two full forwards per variant
        out = []
        for s in sites:
            for v in s.variants:
                ref, alt = score_from_scratch(model, [s.window, alt_window(s, v)], 0)
                out.append(alt - ref)
        return out

    results = {}
    for name, fn in (("naive (2 forwards/variant)", naive), ("shared prefix", shared)):
        fn()  # warm-up
        best, best_cpu = float("inf"), float("inf")
        for _ in range(args.repeat):
            started, cpu = time.perf_counter(), time.process_time()
            deltas = fn()
            best = min(best, time.perf_counter() - started)
            best_cpu = min(best_cpu, time.process_time() - cpu)
        results[name] = deltas
        print(
            f"| {name} | {best:.3f} s wall, {best_cpu:.3f} s CPU | {n / best:.1f} variants/s wall, "
            f"{n / best_cpu:.1f} per CPU second |"
        )
    a, b = results.values()
    print(f"max |delta difference| = {max(abs(x - y) for x, y in zip(a, b)):.2e}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
