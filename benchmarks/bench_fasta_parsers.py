"""FASTA parsers compared: MB/s of (id, sequence) pairs from a wrapped FASTA, plain and gzip.

    python benchmarks/bench_fasta_parsers.py [--size-mb 100] [--dir /tmp]

Two shapes: many records of 1-10 kb (gene sets, reads assembled into contigs) and a few records of
10-30 Mb (chromosomes). Parsers that are not installed are skipped; pyfastx is a dependency, the
others are for the comparison only (`pip install dnaio biopython needletail`). Each parser's best
of two rounds counts. The choice in evo2_hydra/data/fasta.py rests on these numbers.
"""

from __future__ import annotations

import argparse
import gzip
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def make(path: Path, size_mb: float, min_len: int, max_len: int, width: int = 80) -> None:
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"ACGT", dtype=np.uint8)
    target, written, n = int(size_mb * 1e6), 0, 0
    with open(path, "wb") as f:
        while written < target:
            length = int(rng.integers(min_len, max_len + 1))
            seq = alphabet[rng.integers(0, 4, size=length)].tobytes()
            lines = [b">seq%d some description" % n]
            lines += [seq[i : i + width] for i in range(0, length, width)]
            block = b"\n".join(lines) + b"\n"
            f.write(block)
            written += len(block)
            n += 1


def pyfastx_fastx(path: str):
    import pyfastx

    yield from pyfastx.Fastx(path, format="fasta", uppercase=False)


def needletail_parser(path: str):
    from needletail import parse_fastx_file

    for record in parse_fastx_file(path):
        yield record.id, record.seq


def dnaio_reader(path: str):
    import dnaio

    with dnaio.open(path, fileformat="fasta") as reader:
        for record in reader:
            yield record.id, record.sequence


def biopython_simple(path: str):
    from Bio.SeqIO.FastaIO import SimpleFastaParser

    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        yield from SimpleFastaParser(f)


def plain_python(path: str):
    """A line loop in Python: what a hand-written reader costs."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        name, parts = None, []
        for line in f:
            if line.startswith(b">"):
                if name is not None:
                    yield name, b"".join(parts).decode()
                name, parts = line[1:].split(None, 1)[0].decode(), []
            else:
                parts.append(line.rstrip())
        if name is not None:
            yield name, b"".join(parts).decode()


PARSERS = [pyfastx_fastx, needletail_parser, dnaio_reader, biopython_simple, plain_python]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=100.0)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    print(f"load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}, cpus={os.cpu_count()}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for shape, (lo, hi) in {"1-10 kb": (1000, 10000), "10-30 Mb": (10**7, 3 * 10**7)}.items():
            plain = Path(tmp) / "x.fa"
            make(plain, args.size_mb, lo, hi)
            packed = Path(tmp) / "x.fa.gz"
            with open(plain, "rb") as fin, gzip.open(packed, "wb", compresslevel=1) as fout:
                fout.write(fin.read())
            size = plain.stat().st_size / 1e6
            for parser in PARSERS:
                for path in (plain, packed):
                    best = float("inf")
                    try:
                        for _ in range(2):
                            start = time.perf_counter()
                            total = sum(len(seq) for _, seq in parser(str(path)))
                            best = min(best, time.perf_counter() - start)
                    except ImportError:
                        print(f"{shape:9s} {parser.__name__:18s} not installed")
                        break
                    print(
                        f"{shape:9s} {parser.__name__:18s} {path.name:8s} "
                        f"{size / best:8.1f} MB/s (uncompressed)  {total} bases"
                    )


if __name__ == "__main__":
    main()
