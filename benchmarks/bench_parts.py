"""Multi-part checkpoints: our read-only view over the parts vs the alternatives.

    python benchmarks/bench_parts.py [--gib 2] [--parts 3] [--repeats 2]

Builds a random savanna-style file (`{"module": {...bf16 tensors of 32 MiB...}}`, `--gib` GiB), cuts
it into `--parts` parts at offsets that are neither page- nor tensor-aligned (as `split -b` cuts the
40B releases), and times, each in a fresh subprocess after warming the page cache, loading it and
reading every tensor once (a CRC32 over all bytes: what a conversion does):
- single: `safe_load` of the joined file (torch.load mmap=True) — the reference;
- parts: `safe_load` of part0 (our view: per-part mmaps under torch's loader);
- join: concatenate the parts into a new file, then as `single` (what evo2 / BioNeMo do);
- filelike: `torch.load` of a file object over the parts without mmap (reads everything into RAM).
Memory: peak RssAnon (anonymous memory; mapped file pages excluded), as procstat.py measures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from procstat import measure, warm

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time, zlib, torch
sys.path.insert(0, {repo!r})
from evo2_hydra.checkpoint.safe_load import safe_load
from evo2_hydra.checkpoint.parts import ConcatReader, part_set
mode, path = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if mode == "join":
    ps = part_set(path)
    joined = ps.base.with_name("joined.pt")
    with open(joined, "wb") as out:
        for p in ps.parts:
            with open(p, "rb") as f:
                while chunk := f.read(8 << 20):
                    out.write(chunk)
    path, mode = str(joined), "single"
if mode == "filelike":
    obj = torch.load(ConcatReader(part_set(path)), map_location="cpu", weights_only=True)
else:
    obj = safe_load(path)
t1 = time.perf_counter()
crc = 0
for v in obj["module"].values():
    crc = zlib.crc32(v.view(torch.uint8).numpy(), crc)
print(f"{{t1 - t0:.3f}} {{time.perf_counter() - t1:.3f}} {{crc}}")
"""


def make_source(folder: Path, gib: float, n_parts: int) -> tuple[Path, Path]:
    import torch

    n = max(1, int(gib * 32))  # 32 MiB tensors
    module = {f"sequential.{i}.w": torch.randn(4096, 4096).to(torch.bfloat16) for i in range(n)}
    single = folder / "single.pt"
    torch.save({"module": module, "iteration": 1}, single)
    data_size = single.stat().st_size
    cuts = [data_size * (i + 1) // n_parts + 4093 for i in range(n_parts - 1)]
    bounds = [0, *cuts, data_size]
    with open(single, "rb") as f:
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            f.seek(a)
            with open(folder / f"big.pt.part{i}", "wb") as out:
                left = b - a
                while left:
                    chunk = f.read(min(left, 64 << 20))
                    out.write(chunk)
                    left -= len(chunk)
    return single, folder / "big.pt.part0"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--parts", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_parts_"))
    try:
        single, part0 = make_source(folder, args.gib, args.parts)
        child = folder / "child.py"
        child.write_text(CHILD.format(repo=str(REPO)))
        results: dict[str, list[dict]] = {}
        crcs = set()
        for _ in range(args.repeats):
            for mode in ("single", "parts", "join", "filelike"):
                path = single if mode == "single" else part0
                for p in [single, *sorted(folder.glob("big.pt.part*"))]:
                    warm(p)
                (folder / "joined.pt").unlink(missing_ok=True)
                out: list[str] = []
                stats = measure([sys.executable, str(child), mode, str(path)], stdout=out)
                load_s, read_s, crc = out[0].split()
                crcs.add(crc)
                stats.update(load_s=float(load_s), read_s=float(read_s))
                results.setdefault(mode, []).append(stats)
        assert len(crcs) == 1, "the modes read different bytes"
        best = {
            mode: {k: min(r[k] for r in runs) for k in runs[0]} for mode, runs in results.items()
        }
        print(
            json.dumps(
                {"file_bytes": single.stat().st_size, "parts": args.parts, "best": best}, indent=1
            )
        )
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t:.1f} s", file=sys.stderr)
