"""Make the demo's base checkpoint: evo2_tiny briefly pretrained on generic synthetic DNA.

    python scripts/make_demo_checkpoint.py            # writes examples/evo2_tiny_base/ (~1 MB)

The pretraining data is "generic" DNA from a random order-2 Markov chain over ACGT (balanced
composition, strong local context rules), nothing like the shipped example data (two clades
with skewed composition and conditioning tokens). `python launch.py` then finetunes from this
checkpoint, so the demo is a real finetune: the base model starts with DNA statistics of its own
and adapts to the new data.

Output: the real savanna layout, written by the checkpoint package: `latest` ->
`global_step{N}/mp_rank_00_model_states.pt` (bf16 weights, `filter.t` float32) plus
`configs/config.yaml` and `manifest.json`. Deterministic for a given seed on one machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evo2_hydra.checkpoint.writer import save_module_checkpoint  # noqa: E402
from evo2_hydra.config import ModelConfig  # noqa: E402
from evo2_hydra.model import build_model  # noqa: E402

ALPHABET = np.frombuffer(b"ACGT", dtype=np.uint8)


def markov_chain(seed: int) -> np.ndarray:
    """Transition probabilities [16 contexts (two previous bases), 4 next bases]."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(4, 0.4), size=16)


def sample_dna(chain: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Token ids (ASCII of A/C/G/T) [batch, length] drawn from the chain."""
    out = np.empty((batch, length), dtype=np.int64)
    state = rng.integers(0, 16, size=batch)
    cumulative = chain.cumsum(axis=1)
    for t in range(length):
        u = rng.random(batch)[:, None]
        base = (u > cumulative[state]).sum(axis=1).clip(max=3)
        out[:, t] = ALPHABET[base]
        state = (state % 4) * 4 + base
    return out


def tiny_config() -> ModelConfig:
    """The evo2_tiny model config, read from conf/model/evo2_tiny.yaml."""
    raw = OmegaConf.load(REPO / "conf/model/evo2_tiny.yaml")
    raw.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


def main() -> None:
    """Pretrain evo2_tiny on synthetic DNA and write the demo's base checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "examples/evo2_tiny_base")
    parser.add_argument("--context", type=int, default=512, help="width of the context filters")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256, help="training sequence length")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    chain = markov_chain(args.seed)
    cfg = tiny_config()
    model = build_model(cfg, args.context, device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    start = time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 10)  # short warmup
        for group in opt.param_groups:
            group["lr"] = lr
        ids = torch.from_numpy(sample_dna(chain, args.batch, args.length + 1, rng))
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)

    state = {
        k: (v if k.endswith("filter.t") else v.to(torch.bfloat16))  # savanna keeps t in fp32
        for k, v in model.state_dict().items()
    }
    args_meta = {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": args.context,
        "padded_vocab_size": cfg.vocab_size,
        "tokenizer_type": "CharLevelTokenizer",
        "model_parallel_size": 1,
    }
    note = f"evo2_tiny pretrained {args.steps} steps on order-2 Markov DNA (seed {args.seed})"
    step_dir = save_module_checkpoint(
        args.out,
        args.steps,
        [state],
        extra={"args": args_meta},
        run_config_yaml=f"# {note}\n# made by scripts/make_demo_checkpoint.py\n",
    )
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {step_dir} ({size / 1e6:.2f} MB): {note}")


if __name__ == "__main__":
    main()
