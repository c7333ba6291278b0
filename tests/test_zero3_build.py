"""ZeRO-3 builds the model straight into partitions and loads the base one parameter at a time.

Two local ranks (gloo on CPU) against one, on a deep model of evo2_tiny-like widths: per-rank peak
anonymous memory (RssAnon) during build+load, the loaded weights bit-equal to the source, losses
equal to a ZeRO-0 run's, and a ZeRO-3 checkpoint of another world size refused in one line.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from evo2_hydra.config import Dtype, ModelConfig, TrainConfig
from evo2_hydra.errors import UserError
from evo2_hydra.train.run import run_finetune
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.test_train_run import compose_run

CONTEXT = 64
DEEP = ModelConfig(
    name="deep_tiny",
    hidden_size=256,
    num_layers=48,
    operator_pattern="SDH*" * 12,
    num_attention_heads=4,
    hcs_groups=16,
    hcm_groups=16,
    hcl_groups=256,
    mlp_inner_size=768,
)


def rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """Highest RssAnon seen: a thread samples every millisecond, callers sample at will."""

    def __init__(self) -> None:
        self.peak = rss_anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, *_args) -> None:
        self.peak = max(self.peak, rss_anon_bytes())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


@dataclass
class BuildJob:
    checkpoint: str
    ranks: int


def measure_build(job: BuildJob) -> dict:
    """One rank: init the process group, build+load under ZeRO-3, measure, check bit-equality."""
    import deepspeed
    import torch.distributed as dist

    from evo2_hydra.checkpoint.loader import load_module_state_dict
    from evo2_hydra.config import ClusterConfig
    from evo2_hydra.distributed import setup_distributed
    from evo2_hydra.train.engine import batch_plan, build_zero3_model, deepspeed_config

    info = setup_distributed(ClusterConfig(tasks=job.ranks))
    train = TrainConfig(zero_stage=3, precision=Dtype.bfloat16)
    ds_config = deepspeed_config(train, batch_plan(info.world_size, 1, 1))
    state, _ = load_module_state_dict(job.checkpoint)  # memory-mapped: file pages, not anon
    before = rss_anon_bytes()
    with PeakSampler() as sampler:
        model = build_zero3_model(
            DEEP,
            CONTEXT,
            ds_config,
            checkpoint_activations=False,
            state=state,
            rank=info.rank,
            on_param_loaded=sampler.sample,
        )
    peak = sampler.peak - before
    local = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    mismatched = []
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            if not torch.equal(param.data, state[name].to(param.dtype)):
                mismatched.append(name)
    result = torch.tensor([float(peak), float(local), float(len(mismatched))])
    gathered = [torch.zeros(3) for _ in range(info.world_size)]
    dist.all_gather(gathered, result)
    return {
        "peak": [int(t[0]) for t in gathered],
        "local_bytes": [int(t[1]) for t in gathered],
        "mismatched": [int(t[2]) for t in gathered],
        "params": sum(p.ds_numel for p in model.parameters()),
    }


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    return make_random_savanna_checkpoint(root, DEEP, CONTEXT, layout="latest")


def test_zero3_build_holds_a_partition_per_rank(deep_checkpoint):
    from evo2_hydra.train.local_launch import spawn_local_ranks

    one = spawn_local_ranks(1, measure_build, BuildJob(str(deep_checkpoint), 1))
    two = spawn_local_ranks(2, measure_build, BuildJob(str(deep_checkpoint), 2))
    assert one["mismatched"] == [0] and two["mismatched"] == [0, 0]  # bit-equal to the source
    full_bf16 = 2 * two["params"]
    assert one["local_bytes"][0] == full_bf16
    assert all(abs(b - full_bf16 / 2) <= 4096 for b in two["local_bytes"])  # half each (+padding)
    ratios = [p / one["peak"][0] for p in two["peak"]]
    print(
        f"RssAnon growth during build+load: 1 rank {one['peak'][0] / 2**20:.1f} MiB, "
        f"2 ranks {[round(p / 2**20, 1) for p in two['peak']]} MiB (ratios {ratios}); "
        f"model {full_bf16 / 2**20:.1f} MiB in bf16"
    )
    assert max(ratios) <= 0.6, ratios


def test_zero3_two_ranks_match_zero0_and_refuse_another_world_size(tmp_path):
    model_cfg = compose_run(tmp_path / "x").model
    base = make_random_savanna_checkpoint(tmp_path / "base", model_cfg, CONTEXT, layout="latest")

    common = (
        f"ckpt.context={CONTEXT}",
        f"ckpt.path={base}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.truncate=true",
        "train.micro_batch_size=2",
        "train.eval_steps=1",
        "train.lr=1e-3",
        "train.warmup=0.2",
        "train.precision=float32",
        "train.eval_every=3",
    )

    def run(name, *overrides):
        return compose_run(tmp_path / name, *common, "train.steps=3", "cluster.tasks=2", *overrides)

    zero0 = run_finetune(run("zero0", "train.zero_stage=0"))
    zero3_run = run("zero3", "train.zero_stage=3")
    zero3 = run_finetune(zero3_run)
    for step, loss in zero0["losses"].items():
        assert zero3["losses"][step] == pytest.approx(loss, rel=1e-5, abs=1e-5)
    # the ZeRO-3 save still reads as a savanna checkpoint (gathered from the shards)
    from evo2_hydra.checkpoint.loader import load_module_state_dict

    state, meta = load_module_state_dict(Path(zero3_run.output_dir))
    assert meta["iteration"] == 3 and state["sequential.3.mixer.mixer.filter.h"].shape[1] == CONTEXT
    # resuming it on one process is refused in one line that says what to do
    one = compose_run(Path(zero3_run.output_dir), *common, "train.steps=4", "train.zero_stage=3")
    with pytest.raises(
        UserError,
        match=r"a ZeRO-3 checkpoint of 2 ranks, but this run has 1.*convert.py target=savanna",
    ) as err:
        run_finetune(one)
    assert "\n" not in str(err.value)
