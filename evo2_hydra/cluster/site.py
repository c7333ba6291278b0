"""Pre-submit checks of the Slurm site: reachable, partition exists, the nodes have what we ask for.

Everything here runs on the submitting machine before `sbatch`, so a typo in a partition name or a
GPU count the nodes do not have is one clear line instead of a queued job that never starts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from evo2_hydra.config import ClusterConfig
from evo2_hydra.errors import UserError

# (argv) -> CompletedProcess; replaced in unit tests
Runner = Callable[[list[str]], subprocess.CompletedProcess]

SITE_HINT = "set cluster.{key} in conf/local/default.yaml or export EVO2_SLURM_{KEY}"


@dataclass(frozen=True)
class NodeInfo:
    """What `sinfo` says one node has."""

    name: str
    cpus: int
    gpus: int  # GPUs in the node's GRES (0 when it has none)
    memory_mb: int


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def parse_gpu_count(gres: str) -> int:
    """GPUs in a sinfo %G field: 'gpu:8', 'gpu:a100:4(S:0-1)', 'gpu:2,shard:8', '(null)'."""
    total = 0
    for item in gres.split(","):
        match = re.match(r"^gpu(?::[^:(]+)?:(\d+)", item.strip())
        if match:
            total += int(match.group(1))
    return total


def require_site_values(cluster: ClusterConfig) -> None:
    """Values only the site knows; the run config never guesses them."""
    if not cluster.partition:
        raise UserError(
            "cluster.partition is not set (cluster=slurm needs the site's partition): "
            + SITE_HINT.format(key="partition", KEY="PARTITION")
        )


def query_nodes(partition: str, run: Runner = _run) -> list[NodeInfo]:
    """The partition's nodes via sinfo; UserError when Slurm cannot be reached or no such partition."""
    if run is _run and shutil.which("sinfo") is None:
        raise UserError(
            "Slurm is not reachable: `sinfo` is not on PATH (submit from a login node of the "
            "cluster, or use cluster=local)"
        )
    proc = run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N|%c|%G|%m"])
    if proc.returncode != 0:
        first = (proc.stderr or proc.stdout or "").strip().splitlines()
        raise UserError(
            f"Slurm is not reachable: `sinfo` failed ({first[0] if first else f'exit {proc.returncode}'})"
        )
    nodes = []
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        name, cpus, gres, mem = line.split("|")
        nodes.append(NodeInfo(name, int(cpus), parse_gpu_count(gres), int(mem.rstrip("+"))))
    if not nodes:
        known = run(["sinfo", "-h", "-o", "%P"]).stdout.split()
        names = ", ".join(sorted(p.rstrip("*") for p in known)) or "none"
        raise UserError(
            f"cluster.partition={partition}: no such Slurm partition (partitions here: {names})"
        )
    return nodes


def check_site(cluster: ClusterConfig, run: Runner = _run) -> list[NodeInfo]:
    """All pre-submit checks; returns the partition's nodes. Raises UserError naming the key."""
    require_site_values(cluster)
    nodes = query_nodes(cluster.partition, run)
    where = f"partition {cluster.partition}"
    if cluster.nodes > len(nodes):
        raise UserError(f"cluster.nodes={cluster.nodes} but {where} has only {len(nodes)} node(s)")
    max_gpus = max(n.gpus for n in nodes)
    if cluster.gpus_per_node > max_gpus:
        have = f"at most {max_gpus} GPU(s) per node" if max_gpus else "no GPUs (no gpu GRES)"
        hint = (
            "; use cluster.gpus_per_node=0 with cluster.tasks_per_node for CPU nodes"
            if not max_gpus
            else ""
        )
        raise UserError(
            f"cluster.gpus_per_node={cluster.gpus_per_node} but the nodes of {where} have {have}{hint}"
        )
    tasks = tasks_per_node(cluster)
    max_cpus = max(n.cpus for n in nodes)
    if tasks * cluster.cpus_per_task > max_cpus:
        raise UserError(
            f"cluster.cpus_per_task={cluster.cpus_per_task} x {tasks} task(s) per node = "
            f"{tasks * cluster.cpus_per_task} CPUs, but the nodes of {where} have at most {max_cpus}"
        )
    if cluster.mem_gb is not None:
        max_mem_gb = max(n.memory_mb for n in nodes) / 1024
        if cluster.mem_gb > max_mem_gb:
            raise UserError(
                f"cluster.mem_gb={cluster.mem_gb} but the nodes of {where} have at most "
                f"{max_mem_gb:.0f} GB"
            )
    return nodes


def tasks_per_node(cluster: ClusterConfig) -> int:
    """One task per GPU; on CPU partitions (gpus_per_node=0) cluster.tasks_per_node."""
    return cluster.gpus_per_node if cluster.gpus_per_node > 0 else cluster.tasks_per_node
