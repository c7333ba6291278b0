"""Context resize: ours (memory-mapped, tensor by tensor) vs plain torch.load + edit + torch.save.

    python benchmarks/bench_resize.py [--width 262144] [--target 4096] [--hidden 1024] [--repeats 2]

Builds a random checkpoint in the 7B-1M layout (32 layers `SDH*SDHSDH*...`, 9 hcm layers with 256
groups, 9 hcl layers, bf16, savanna top-level keys) at a reduced filter width (`--width`, default
262,144 columns instead of 1,048,576) and, to stay within disk and RAM on a 24 GiB machine, a
reduced hidden size (`--hidden`, default 1024 instead of 4096: MLP 2816, hcl groups = hidden;
`--hidden 4096` gives the real 7B dims, a ~15.6 GB file). Then resizes it to `--target` columns:
- ours: `evo2_hydra.checkpoint.prepare_base_checkpoint`, the path a finetune takes (checked against
  the model, written by the one savanna writer: savanna layout plus manifest);
- plain: `torch.load(whole file)`, replace each filter as extend_filter.py does, `torch.save`.
Each run is a fresh subprocess, alternating plain/ours, the input read once before each (warm page
cache for both). Memory is the child's RssAnon polled from /proc every 10 ms (children included:
what the process owns, not clean pages of the mapped input) and its maximum RSS (wait4 rusage,
which also counts mapped file pages). Target (issue #5): ours' peak RssAnon <= 1/3 of plain's,
wall time no worse.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procstat import measure, warm

REPO = Path(__file__).resolve().parents[1]

# The 7B-1M layout at `hidden` (sys.argv[5] in OURS, sys.argv[3] in MAKE).
MODEL = r"""
from evo2_hydra.config import ModelConfig
hidden = int(sys.argv[5] if len(sys.argv) > 5 else sys.argv[3])
mlp = 128 * -(-int(2 * hidden * 4 / 3) // 128)
cfg = ModelConfig(name="evo2_7b_bench", hidden_size=hidden, num_layers=32,
    operator_pattern="SDH*SDHSDH*SDHSDH*SDHSDH*SDHSDH*", num_attention_heads=hidden // 128,
    hcs_groups=256, hcm_groups=256, hcl_groups=hidden, mlp_inner_size=mlp, max_context=1 << 20)
"""

MAKE = (
    r"""
import sys, torch
sys.path.insert(0, sys.argv[4])
from collections import OrderedDict
from evo2_hydra.model import expected_state_dict_shapes
path, width = sys.argv[1], int(sys.argv[2])
"""
    + MODEL
    + r"""
gen = torch.Generator().manual_seed(0)
module = OrderedDict()
for key, shape in expected_state_dict_shapes(cfg, width).items():
    if key.endswith("filter.t"):
        module[key] = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    else:
        module[key] = torch.empty(shape).normal_(generator=gen).to(torch.bfloat16)
shapes = OrderedDict((k, v.shape) for k, v in module.items())
torch.save({"module": module, "param_shapes": shapes, "dp_world_size": 1, "iteration": 1,
            "args": {"num_layers": 32, "hidden_size": hidden}}, path)
"""
)

PLAIN = r"""
import sys, torch
src, dst, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
ckpt = torch.load(src, map_location="cpu", weights_only=False)
for key, value in list(ckpt["module"].items()):
    if key.endswith(("mixer.mixer.filter.h", "mixer.mixer.filter.decay")):
        new = torch.zeros(value.shape[0], target, dtype=value.dtype)
        keep = min(value.shape[1], 128, target)
        new[:, :keep] = value[:, :keep]
        ckpt["module"][key] = new
        ckpt["param_shapes"][key] = new.shape
    elif key.endswith("mixer.mixer.filter.t"):
        ckpt["module"][key] = torch.arange(target, dtype=torch.float32).view(1, 1, target)
        ckpt["param_shapes"][key] = torch.Size([1, 1, target])
torch.save(ckpt, dst)
"""

OURS = (
    r"""
import sys
sys.path.insert(0, sys.argv[4])
from evo2_hydra.checkpoint import prepare_base_checkpoint
from evo2_hydra.config import CkptConfig
"""
    + MODEL
    + r"""
ckpt = CkptConfig(name="bench", path=sys.argv[1], context=int(sys.argv[3]))
prepare_base_checkpoint(ckpt, cfg, sys.argv[2])
"""
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=262144, help="source filter width (columns)")
    parser.add_argument("--target", type=int, default=4096, help="target context (columns)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (4096 = real 7B)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_resize_", dir=args.workdir))
    try:
        src = work / "savanna_7b_layout.pt"
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", MAKE, str(src), str(args.width), str(args.hidden), str(REPO)],
            check=True,
        )
        size_gb = src.stat().st_size / 1e9
        print(f"source: {src.stat().st_size / 1e9:.2f} GB ({args.width} columns, hidden {args.hidden}), "
              f"made in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        results: dict[str, list[dict[str, float]]] = {"plain": [], "ours": []}
        for rep in range(args.repeats):
            for name in ("plain", "ours"):
                out = work / f"out_{name}_{rep}"
                warm(src)
                if name == "plain":
                    res = measure(
                        [
                            sys.executable,
                            "-c",
                            PLAIN,
                            str(src),
                            str(out.with_suffix(".pt")),
                            str(args.target),
                        ]
                    )
                else:
                    res = measure(
                        [
                            sys.executable,
                            "-c",
                            OURS,
                            str(src),
                            str(out),
                            str(args.target),
                            str(REPO),
                            str(args.hidden),
                        ]
                    )
                results[name].append(res)
                print(f"{name:5s} rep {rep}: {res['wall_s']:.2f} s, peak RssAnon {res['peak_rss_anon_mb'] / 1024:.3f} GiB, "
                      f"max RSS {res['max_rss_mb'] / 1024:.3f} GiB")  # fmt: skip
                shutil.rmtree(out, ignore_errors=True)
                out.with_suffix(".pt").unlink(missing_ok=True)
        best = {n: {k: min(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
        summary = {
            "source_gb": round(size_gb, 3),
            "width": args.width,
            "target": args.target,
            "hidden": args.hidden,
            "best": best,
            "rss_anon_ratio_ours_over_plain": best["ours"]["peak_rss_anon_mb"]
            / best["plain"]["peak_rss_anon_mb"],
            "time_ratio_ours_over_plain": best["ours"]["wall_s"] / best["plain"]["wall_s"],
        }
        print(json.dumps(summary, indent=1))
        ok = (
            summary["rss_anon_ratio_ours_over_plain"] <= 1 / 3
            and summary["time_ratio_ours_over_plain"] <= 1.0
        )
        print("target met" if ok else "target NOT met")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
