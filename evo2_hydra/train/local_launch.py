"""`cluster=local cluster.tasks=N`: start N rank processes on this machine, torchrun-style.

Each child gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT and the already-composed
RunConfig (pickled by multiprocessing's spawn), then runs the same per-rank code a torchrun or Slurm
task runs. The children run in their own process group, so a Ctrl-C in the terminal reaches only
the parent, which forwards SIGTERM/SIGINT once to every child (each saves a checkpoint and exits);
a second Ctrl-C stops them at once (unsaved; SIGKILL after a few seconds). A child whose parent dies gets SIGTERM (Linux). The
parent turns a child's UserError back into a UserError.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from evo2_hydra.distributed import SINGLE_MARKER, free_port
from evo2_hydra.errors import Interrupted, UserError

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0  # after a second Ctrl-C, how long ranks get to stop before SIGKILL


def _detach_from_terminal_signals() -> None:
    """Own process group (a terminal's Ctrl-C goes to the parent only, which forwards it once)
    and SIGTERM when the parent dies (so a killed launcher never leaves ranks training on).
    """
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _child(
    rank: int, world: int, port: int, target: Callable[[Any], Any], arg: Any, results
) -> None:
    _detach_from_terminal_signals()
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # this process is a plain local rank, whatever the parent process was
    os.environ.pop("SUBMITIT_EXECUTOR", None)
    os.environ.pop(SINGLE_MARKER, None)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s",
    )
    if rank != 0:
        os.environ["EVO2_NO_PROGRESS"] = "1"
    try:
        results.put((rank, "ok", target(arg)))
    except UserError as err:
        results.put((rank, "user_error", str(err)))
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:  # the value: the step its first Ctrl-C saved, or None
        results.put((rank, "interrupted", getattr(err, "saved_step", None)))
        raise SystemExit(130) from None
    except OSError as err:  # a file-system error: the CLI prints it as "<path>: <cause>"
        results.put((rank, "os_error", (err.errno, err.strerror, err.filename)))
        raise SystemExit(2) from None
    except BaseException as err:
        results.put((rank, "error", f"{type(err).__name__}: {err}"))
        raise


def spawn_local_ranks(world: int, target: Callable[[Any], Any], arg: Any) -> Any:
    """Run `target(arg)` in `world` processes; return rank 0's result."""
    # The processes and their queue live only inside _run_ranks: an exception raised here keeps
    # no reference to them, so the queue's semaphores are released before the process exits.
    outcome, exit_codes, stopped_now = _run_ranks(world, target, arg)
    if stopped_now:
        raise Interrupted(_saved_by_first_stop(outcome))
    failures = {r: v for r, (s, v) in outcome.items() if s != "ok"}
    user_errors = [v for r, (s, v) in sorted(outcome.items()) if s == "user_error"]
    if user_errors:
        raise UserError(user_errors[0])
    if any(s == "interrupted" for s, _ in outcome.values()):
        raise Interrupted(_saved_by_first_stop(outcome))
    os_errors = [v for r, (s, v) in sorted(outcome.items()) if s == "os_error"]
    if os_errors:
        raise OSError(*os_errors[0])
    if failures or 0 not in outcome:
        raise RuntimeError(f"local ranks failed: {failures or exit_codes}")
    return outcome[0][1]


def _saved_by_first_stop(outcome: dict[int, tuple[str, Any]]) -> int | None:
    """The step a Ctrl-C's checkpoint completed at, as rank 0 saw it (rank 0 writes `latest`
    last, after every rank's files), or None when the ranks stopped without saving.
    """
    status, value = outcome.get(0, ("missing", None))
    if status == "interrupted":
        return value
    if status == "ok" and isinstance(value, dict) and value.get("stopped_by"):
        return value.get("last_saved_step")
    return None


def _run_ranks(
    world: int, target: Callable[[Any], Any], arg: Any
) -> tuple[dict[int, tuple[str, Any]], dict[str, int | None], bool]:
    """Start the ranks, forward signals, collect (rank -> (status, value)), exit codes, and
    whether a second Ctrl-C stopped them at once.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world, port, target, arg, results), name=f"rank{r}")
        for r in range(world)
    ]
    forwarded = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    received: list[int] = []
    outcome: dict[int, tuple[str, Any]] = {}

    def forward(signum, _frame):
        again = signum == signal.SIGINT and signal.SIGINT in received
        received.append(signum)
        if again:  # the second Ctrl-C: stop now, nothing is saved
            raise KeyboardInterrupt("SIGINT")
        log.warning("%s: forwarding to %d local ranks", signal.Signals(signum).name, world)
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    for sig in forwarded:
        signal.signal(sig, forward)
    stopped_now = False
    try:
        for p in procs:
            p.start()
        while len(outcome) < world:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
            try:
                rank, status, value = results.get(timeout=1.0)
            except Exception:  # queue.Empty: poll liveness again
                continue
            outcome[rank] = (status, value)
            if status != "ok":
                break  # one rank failed: the others cannot finish their collectives
        for p in procs:
            p.join(timeout=None if all(s == "ok" for s, _ in outcome.values()) else 20)
    except KeyboardInterrupt:
        # the second Ctrl-C: the ranks stop at their next Python instruction (their own second
        # SIGINT), unsaved; a rank stuck in a collective is killed after a short grace
        stopped_now = True
        for rank, p in enumerate(procs):  # a rank that already reported is only exiting
            if rank not in outcome and p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        _drain(results, outcome)  # what the ranks reported while stopping
    finally:
        for p in procs:
            if p.pid is not None and p.is_alive():
                p.kill()
                p.join()
        for sig, old in forwarded.items():
            signal.signal(sig, old)
    results.close()
    results.join_thread()
    return outcome, {p.name: p.exitcode for p in procs}, stopped_now


def _drain(results, outcome: dict[int, tuple[str, Any]]) -> None:
    """Add every report still in the queue to `outcome` (without waiting for more)."""
    while True:
        try:
            rank, status, value = results.get(timeout=0.1)
        except Exception:  # queue.Empty
            return
        outcome.setdefault(rank, (status, value))
