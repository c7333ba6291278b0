"""Process-group setup for every way a training process can be started.

Three launchers, one code path afterwards:

- torchrun (or anything else that already exported RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT);
- submitit, locally or on Slurm: `TorchDistributedEnvironment().export(...)` turns the job
  environment into those variables (without touching CUDA_VISIBLE_DEVICES: every rank sees all GPUs
  of its node and picks one by local rank);
- a plain `python launch.py`: a single process; we set the variables ourselves with a free port,
  because without them `deepspeed.init_distributed()` falls back to MPI discovery and dies.

Then `deepspeed.init_distributed` with gloo on CPU and nccl on GPU.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch

from evo2_hydra.config import ClusterConfig, Device
from evo2_hydra.errors import UserError

log = logging.getLogger(__name__)

_DIST_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Set when we exported the variables ourselves for a single process, so a later call in the same
# process (tests, notebooks) can tell them from a real launcher's.
SINGLE_MARKER = "EVO2_HYDRA_SINGLE_PROCESS"


def launched_externally() -> bool:
    """True inside torchrun / submitit / one of our local rank processes."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        return True
    return "RANK" in os.environ and not os.environ.get(SINGLE_MARKER)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ranks, world size, device and backend."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str  # "gloo" or "nccl"
    launcher: str  # "torchrun", "submitit" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_device_kind(device: Device) -> str:
    """'cuda' or 'cpu' for the configured device; a GPU asked for where none exists is a UserError."""
    has_cuda = torch.cuda.is_available()
    if device == Device.cuda and not has_cuda:
        raise UserError(
            "cluster.device=cuda but no CUDA GPU is visible to this process "
            "(torch.cuda.is_available() is False); use cluster.device=cpu or auto"
        )
    if device == Device.auto:
        return "cuda" if has_cuda else "cpu"
    return device.value


def export_launcher_env() -> str:
    """Make sure the env:// variables exist; return which launcher provided them."""
    if all(var in os.environ for var in _DIST_VARS) and not os.environ.get(SINGLE_MARKER):
        os.environ.setdefault("LOCAL_RANK", "0")
        return "torchrun"
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        # submitit draws MASTER_PORT from 20000-60000, which overlaps the kernel's ephemeral range
        # (32768-60999): a gloo connection of a concurrent job can hold it (seen: EADDRINUSE).
        # A port below that range, distinct for consecutive job ids, avoids both collisions.
        job_id = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
        os.environ["MASTER_PORT"] = str(20000 + job_id % 12000)
        # overwrite=True: a requeued or nested job may carry stale values from its parent.
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        return "submitit"
    # A single process (or a child that inherited our single-process values): fresh values, so a
    # subprocess never reuses its parent's MASTER_PORT.
    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    os.environ[SINGLE_MARKER] = "1"
    return "single"


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory op (~28 s on a fresh machine).

    On the CPU accelerator `init_distributed` builds `deepspeed_shm_comm`, which only serves
    `inference_all_reduce` (tensor-parallel inference); training all-reduces go through
    torch.distributed/gloo. Marking the op incompatible makes DeepSpeed skip it (it checks this
    table before building).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def setup_distributed(cluster: ClusterConfig) -> DistInfo:
    """Export the launcher's env, check the world size, init the process group, pick the device.

    Raises UserError (before anything is initialised) when a GPU is requested but absent or when
    the number of processes differs from what the cluster config says.
    """
    kind = resolve_device_kind(cluster.device)
    if kind == "cpu":
        # DeepSpeed picks its accelerator at import; on a GPU machine asked to run on CPU it must
        # be told before the first `import deepspeed`.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    launcher = export_launcher_env()
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size != cluster.world_size:
        raise UserError(
            f"{world_size} processes were started ({launcher}: WORLD_SIZE={world_size}) but the "
            f"cluster config expects cluster.world_size={cluster.world_size} "
            f"(cluster.kind={cluster.kind.value}, tasks={cluster.tasks}, nodes={cluster.nodes}, "
            f"gpus_per_node={cluster.gpus_per_node}); make them agree"
        )
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible "
                "(check cluster.gpus_per_node and CUDA_VISIBLE_DEVICES)"
            )
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"

    # DeepSpeed's import probes for libaio by compiling a test program; setuptools logs each gcc
    # command at INFO. Keep the console for our own messages.
    logging.getLogger("compilers").setLevel(logging.WARNING)
    import deepspeed

    if kind == "cpu":
        _skip_shm_comm_build()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    info = DistInfo(rank, local_rank, world_size, device, backend, launcher)
    log.debug("distributed: %s", info)
    return info
