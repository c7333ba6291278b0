"""Split an inference task's input across processes and merge the outputs in input order.

`cluster=local cluster.tasks=N` starts N local processes; `cluster=slurm` runs one per Slurm task
(rank from RANK/WORLD_SIZE, else SLURM_PROCID/SLURM_NTASKS). Rank r takes the r-th contiguous block
of the input and writes it to `.<output name>.shards/<r>-of-<N>/` next to the output (atomically,
so a finished shard is a complete folder). Whichever rank finds every shard present merges them,
under a file lock, into the output folder (atomically) and removes the shards. A re-run with the
same output skips finished shards (resume after a failure or a time limit); one process writes the
output directly.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evo2_hydra.config import ClusterConfig, ClusterKind, RunConfig
from evo2_hydra.errors import UserError
from evo2_hydra.io_utils import atomic_dir, file_lock

log = logging.getLogger(__name__)

Work = Callable[[Sequence[Any], Path], None]  # (this rank's items, folder to fill)
Merge = Callable[[list[Path], Path], None]  # (shard folders in input order, output folder to fill)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: from torchrun/Slurm variables, else (0, 1)."""
    from evo2_hydra.distributed import SINGLE_MARKER

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not os.environ.get(SINGLE_MARKER):
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    return 0, 1


def share(items: Sequence[Any], rank: int, world: int) -> Sequence[Any]:
    """The rank-th of `world` contiguous, near-equal blocks (input order is block order)."""
    n = len(items)
    return items[rank * n // world : (rank + 1) * n // world]


def shards_folder(output: Path) -> Path:
    """The hidden folder next to `output` where ranks write their shards."""
    return output.parent / f".{output.name}.shards"


def shard_path(output: Path, rank: int, world: int) -> Path:
    """One rank's shard folder."""
    return shards_folder(output) / f"{rank:05d}-of-{world:05d}"


def needs_local_spawn(cluster: ClusterConfig) -> bool:
    """Whether cluster=local with several tasks must spawn its ranks here."""
    from evo2_hydra.distributed import launched_externally

    return cluster.kind == ClusterKind.local and cluster.tasks > 1 and not launched_externally()


def run_sharded(
    run: RunConfig,
    task: str,
    output: Path,
    items: Sequence[Any],
    work: Work,
    merge: Merge,
    this_rank: Callable[[RunConfig], Any],
) -> Path:
    """Run `work` on this process's share of `items` and merge when every share is done.

    `this_rank(run)` is the task entry point itself (re-entered in each spawned local process).
    """
    expected = run.cluster.world_size
    if expected > 1 and needs_local_spawn(run.cluster):
        from evo2_hydra.train.local_launch import spawn_local_ranks

        spawn_local_ranks(expected, this_rank, run)
        if not output.is_dir():
            raise UserError(f"task={task}: the ranks finished but {output} was not merged")
        return output
    rank, world = rank_and_world()
    if world != expected:
        raise UserError(
            f"{world} processes were started but cluster.world_size={expected} "
            f"(cluster.kind={run.cluster.kind.value}, tasks={run.cluster.tasks})"
        )
    if world == 1:
        if output.is_dir() and not any(output.iterdir()):
            output.rmdir()  # an empty folder (checked by the task) is replaced atomically
        with atomic_dir(output) as tmp:
            work(items, tmp)
        return output
    mine = shard_path(output, rank, world)
    if mine.is_dir():
        log.info("rank %d: shard %s is already complete (resumed run); skipping", rank, mine)
    else:
        with atomic_dir(mine) as tmp:
            work(share(items, rank, world), tmp)
    merge_when_complete(output, world, merge)
    return output


def merge_when_complete(output: Path, world: int, merge: Merge) -> bool:
    """Merge the shards into `output` if all `world` exist and nobody merged yet."""
    folder = shards_folder(output)
    with file_lock(folder / ".lock"):
        if output.exists():
            return False
        shards = [shard_path(output, r, world) for r in range(world)]
        if not all(s.is_dir() for s in shards):
            return False
        with atomic_dir(output) as tmp:
            merge(shards, tmp)
        log.info("merged %d shards into %s", world, output)
    shutil.rmtree(folder, ignore_errors=True)
    return True


def merge_jsonl(shards: list[Path], name: str, target: Path) -> None:
    """Concatenate one JSONL file of every shard, in rank order, into `target`."""
    with (target / name).open("w") as out:
        for shard in shards:
            out.write((shard / name).read_text())


def move_tree(shards: list[Path], subfolder: str, target: Path) -> None:
    """Move per-sequence files (named by global input index) from every shard into `target`."""
    for shard in shards:
        source = shard / subfolder
        if not source.is_dir():
            continue
        (target / subfolder).mkdir(parents=True, exist_ok=True)
        for f in sorted(source.iterdir()):
            os.replace(f, target / subfolder / f.name)
