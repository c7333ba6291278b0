"""Make the shipped example data: examples/data/{train,valid}.jsonl (fixed seed, reproducible).

Two classes with clearly different base composition, so a tiny model can learn to tell them apart
and generation can be steered by the conditioning token (conf/data/example.yaml maps A -> "1",
B -> "2"):
  clade A: GC-rich (P(G) = P(C) = 0.35), with a CCGG motif planted every ~40 bases
  clade B: AT-rich (P(A) = P(T) = 0.35), with a TTAA motif planted every ~40 bases
Lengths are uniform in 100..480 bases (the demo trains at context 512 with padded packing; the
conditioning token and EOD make each document at most 482 tokens).

    python scripts/make_example_data.py [--train 400] [--valid 60] [--seed 2024]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

BASES = np.array(list("ACGT"))
COMPOSITION = {  # P(A), P(C), P(G), P(T)
    "A": [0.15, 0.35, 0.35, 0.15],
    "B": [0.35, 0.15, 0.15, 0.35],
}
MOTIF = {"A": "CCGG", "B": "TTAA"}


def make_sequence(rng: np.random.Generator, clade: str) -> str:
    """One random sequence of a clade's composition."""
    length = int(rng.integers(100, 481))
    seq = list(rng.choice(BASES, size=length, p=COMPOSITION[clade]))
    for start in range(int(rng.integers(0, 40)), length - 4, 40):
        seq[start : start + 4] = MOTIF[clade]
    return "".join(seq)


def write_split(path: Path, n: int, rng: np.random.Generator) -> None:
    """Write `n` sequences, alternating clades, as JSONL."""
    with open(path, "w") as f:
        for i in range(n):
            clade = "A" if i % 2 == 0 else "B"
            record = {
                "id": f"{path.stem}_{i:04d}",
                "clade": clade,
                "text": make_sequence(rng, clade),
            }
            f.write(json.dumps(record) + "\n")


def main() -> None:
    """Regenerate examples/data/{train,valid}.jsonl."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--valid", type=int, default=60)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "examples" / "data"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    write_split(out / "train.jsonl", args.train, rng)
    write_split(out / "valid.jsonl", args.valid, rng)
    for name in ("train.jsonl", "valid.jsonl"):
        print(f"{out / name}: {(out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
