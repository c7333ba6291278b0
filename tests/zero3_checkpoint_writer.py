"""Write a REAL DeepSpeed ZeRO-3 checkpoint of evo2_tiny (run under torchrun; used by the tests).

    torchrun --nproc_per_node 2 tests/zero3_checkpoint_writer.py OUT_DIR [--bf16]

Builds evo2_tiny at context 256 (seeded), wraps it in a DeepSpeed ZeRO-3 engine (gloo, CPU), takes
two optimizer steps on random tokens so the fp32 master weights differ from the init, and saves
`OUT_DIR/global_step2/`. Parameters get two optimizer groups (filters without weight decay, the
rest with), so the gather is tested across group boundaries.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import deepspeed
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evo2_hydra.model import build_model  # noqa: E402
from tests.vtx_reference import model_config  # noqa: E402

CONTEXT = 256


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    deepspeed.init_distributed()
    torch.manual_seed(0)
    cfg = model_config("evo2_tiny")
    model = build_model(cfg, CONTEXT, device="cpu")
    filters = [p for n, p in model.named_parameters() if ".filter." in n or "short_conv" in n]
    others = [p for n, p in model.named_parameters() if not (".filter." in n or "short_conv" in n)]
    groups = [{"params": others, "weight_decay": 0.1}, {"params": filters, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": args.bf16},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    g = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))
    for _ in range(2):
        ids = torch.randint(0, 512, (1, 32), generator=g)
        logits = engine(ids)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, 512), ids.view(-1))
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(args.out_dir, tag="global_step2")


if __name__ == "__main__":
    main()
