"""convert.py on a random checkpoint in the evo2_1b layout: every target vs `cp` of the same bytes.

    python benchmarks/bench_convert.py [--context 8192] [--repeat 3] [--workdir DIR] [--keep]

Writes a random evo2_1b checkpoint (25 layers `SDH*SDHSDH*...`, hidden 1920, MLP 5120, 128 hcm/hcs
groups, bf16, savanna top-level keys; hcm/hcl filters `--context` columns wide, default 8192, the
released width) as a single `.pt`, then runs, each in a fresh process, with the input read once
before each run (warm page cache for all), `--repeat` rounds of all of them interleaved (the
host's slow phases, measured here to make the same cp take 0.6 s or 6 s, then hit every run
alike), reporting medians:
- `cp` of the checkpoint file (the baseline);
- `convert.py target=vortex`, `target=nemo` (torch_dist and zarr), `target=savanna target.mp=1`
  and `target=savanna target.dtype=float32`, all with `verify=false`;
- `cp` of a file as large as the float32 output (twice the source: its fair baseline, since
  past the kernel's dirty-page limit both are throttled to the disk).
Wall time is the whole process (Python, torch and Hydra start-up included); "startup" is the same
interpreter importing the conversion package and exiting, so "wall - startup" is the conversion;
nemo torch_dist also imports torch.distributed.checkpoint (~0.5 s here, most of it DTensor and
sympy), measured as "startup+dcp" and subtracted from that target instead.
"convert" is the time the converter logs for the conversion itself (source opened, every file
written and renamed into place), without interpreter, import and Hydra start-up.
Memory: the process's RssAnon polled from /proc every 10 ms (children included: what it owns, not
clean pages of the memory-mapped input) and its maximum RSS from wait4 (which counts mapped file
pages too). Targets (issue #8): wall within 2x of cp, peak RssAnon < 1.5 x largest tensor + 500 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from procstat import measure, warm

REPO = Path(__file__).resolve().parents[1]

MAKE = r"""
import sys, torch
sys.path.insert(0, sys.argv[3])
from omegaconf import OmegaConf
from evo2_hydra.config import ModelConfig
from evo2_hydra.checkpoint.stream import TorchSaveStream
from evo2_hydra.model import expected_state_dict_shapes
path, context = sys.argv[1], int(sys.argv[2])
yaml = OmegaConf.load(sys.argv[3] + "/conf/model/evo2_1b.yaml"); yaml.pop("defaults")
cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), yaml))
gen = torch.Generator().manual_seed(0)
largest = 0
with TorchSaveStream(path) as out:  # tensor by tensor: the maker itself needs no 2 GB of RAM
    module, shapes = {}, {}
    for key, shape in expected_state_dict_shapes(cfg, context).items():
        if key.endswith("filter.t"):
            value = torch.arange(context, dtype=torch.float32).view(1, 1, context)
        elif key.endswith("filter.p"):
            value = torch.full(shape, -1.0).to(torch.bfloat16)
        else:
            value = (torch.empty(shape).normal_(generator=gen) * 0.02).to(torch.bfloat16)
        largest = max(largest, value.numel() * value.element_size())
        module[key] = out.add(value)
        shapes[key] = torch.Size(shape)
    out.finish({"module": module, "param_shapes": shapes, "dp_world_size": 1, "iteration": 1,
                "args": {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size}})
print(largest)
"""

STARTUP = "import torch, evo2_hydra.convert.targets, evo2_hydra.convert.run, hydra"
CONVERTED = re.compile(r"converted in ([0-9.]+) s")
BASELINES = ("cp", "startup", "startup+dcp", "cp f32-size")


def make_file_of_size(path: Path, pattern: Path, size: int) -> None:
    """`path` of exactly `size` bytes: `pattern`'s bytes repeated (cp does not care what)."""
    with open(path, "wb") as out:
        while out.tell() < size:
            with open(pattern, "rb") as f:
                while (left := size - out.tell()) > 0 and (chunk := f.read(min(1 << 24, left))):
                    out.write(chunk)


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    """Medians of every measure over the rounds, plus the fastest wall time."""
    out = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    out["min_wall_s"] = min(r["wall_s"] for r in runs)
    out["peak_rss_anon_mb"] = max(r["peak_rss_anon_mb"] for r in runs)  # memory: the worst
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--context", type=int, default=8192, help="width of hcm/hcl filters (columns)"
    )
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch folder (and reuse its source)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of every run (medians are reported)"
    )
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    source, largest_file = work / "savanna_evo2_1b.pt", work / f"largest_{args.context}.txt"
    if not (source.is_file() and largest_file.is_file()):  # reuse a --keep'd source of this width
        made = subprocess.run(
            [sys.executable, "-c", MAKE, str(source), str(args.context), str(REPO)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        largest_file.write_text(made.stdout.split()[-1])
    largest_mb = int(largest_file.read_text()) / 2**20
    size_mb = source.stat().st_size / 2**20
    base = [
        sys.executable,
        str(REPO / "convert.py"),
        f"source={source}",
        "model=evo2_1b",
        "ckpt=evo2_1b",
    ]
    base += [
        f"ckpt.context={args.context}",
        "verify=false",
        f"paths.output_root={work / 'outputs'}",
    ]
    runs = {
        "cp": ["cp", str(source), str(work / "copy.pt")],
        "startup": [sys.executable, "-c", STARTUP],
        "startup+dcp": [sys.executable, "-c", STARTUP + ", torch.distributed.checkpoint"],
        "vortex": [*base, "target=vortex"],
        "nemo torch_dist": [*base, "target=nemo", "target.format=torch_dist"],
        "nemo zarr": [*base, "target=nemo", "target.format=zarr"],
        "savanna mp=1": [*base, "target=savanna", "target.mp=1"],
        "savanna float32": [*base, "target=savanna", "target.dtype=float32"],
    }
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    rounds["cp f32-size"] = []
    big = work / "output_sized.bin"
    for _ in range(args.repeat):  # every run once per round: slow phases of the host hit all
        for name, cmd in runs.items():
            out = work / f"out_{name.replace(' ', '_').replace('=', '')}"
            if name not in BASELINES:
                cmd = [*cmd, f"output={out}"]
            warm(source)
            os.sync()  # every run starts with no dirty pages of an earlier run being written back
            printed: list[str] = []
            result = measure(cmd, cwd=REPO, stdout=printed)
            if (found := CONVERTED.search(printed[0])) is not None:
                result["convert_s"] = float(found.group(1))  # the converter's own clock
            if out.is_dir():
                result["output_mib"] = sum(f.stat().st_size for f in out.rglob("*")) / 2**20
            rounds[name].append(result)
            shutil.rmtree(out, ignore_errors=True)
            (work / "copy.pt").unlink(missing_ok=True)
        # target.dtype=float32 writes twice the bytes it reads: past the kernel's dirty-page
        # limits the writer is throttled to the disk, so its fair baseline is cp of a file that
        # large too.
        f32_bytes = int(rounds["savanna float32"][-1]["output_mib"] * 2**20)
        make_file_of_size(big, source, f32_bytes)
        warm(big)
        os.sync()
        rounds["cp f32-size"].append(measure(["cp", str(big), str(work / "copy.pt")], cwd=REPO))
        big.unlink()
        (work / "copy.pt").unlink(missing_ok=True)
    results = {name: summarize(runs_of) for name, runs_of in rounds.items()}
    cp_s, startup_s = results["cp"]["wall_s"], results["startup"]["wall_s"]
    budget_mb = 1.5 * largest_mb + 500
    print(
        f"source: evo2_1b layout, context {args.context}, {size_mb:.0f} MiB; largest tensor {largest_mb:.1f} MiB"
    )
    print(f"load average: {os.getloadavg()[0]:.1f}; RssAnon target < {budget_mb:.0f} MiB")
    print(
        f"median of {args.repeat} interleaved rounds (min in brackets); ratios of medians against "
        f"cp ({cp_s:.2f} s); -startup: minus the start-up run ({startup_s:.2f} s; "
        f"torch_dist: startup+dcp); convert: the converter's own clock around the conversion "
        f"(after Hydra composed the config, until the output folder is in place)"
    )
    header = (
        f"{'run':<17}{'wall s':>14}{'x cp':>7}{'-startup':>9}{'x cp':>6}{'convert':>8}{'x cp':>6}"
    )
    print(header + f"{'cpu s':>7}{'RssAnon MiB':>12}{'maxRSS MiB':>11}")
    for name, r in results.items():
        start = results["startup+dcp" if "torch_dist" in name else "startup"]["wall_s"]
        net = r["wall_s"] if name in BASELINES else r["wall_s"] - start
        wall = f"{r['wall_s']:.2f} [{r['min_wall_s']:.2f}]"
        inner = (
            f"{r['convert_s']:>8.2f}{r['convert_s'] / cp_s:>6.2f}" if "convert_s" in r else " " * 14
        )
        print(
            f"{name:<17}{wall:>14}{r['wall_s'] / cp_s:>7.2f}{net:>9.2f}{net / cp_s:>6.2f}{inner}"
            f"{r['cpu_s']:>7.2f}{r['peak_rss_anon_mb']:>12.0f}{r['max_rss_mb']:>11.0f}"
        )
    f32 = results["savanna float32"]
    big_cp = results["cp f32-size"]["wall_s"]
    print(
        f"savanna float32 ({f32_bytes / 2**20:.0f} MiB written) vs cp of a file that size "
        f"({big_cp:.2f} s): {(f32['wall_s'] - startup_s) / big_cp:.2f}x net of startup, "
        f"{f32['convert_s'] / big_cp:.2f}x by the converter's clock"
    )
    summary = {
        "context": args.context,
        "source_mib": size_mb,
        "largest_tensor_mib": largest_mb,
        "runs": results,
        "rounds": rounds,
    }
    (work / "bench_convert.json").write_text(json.dumps(summary, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
