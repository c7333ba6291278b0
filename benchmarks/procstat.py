"""Measure a child process the way the issues' memory targets are judged.

Peak memory is anonymous memory (`RssAnon`, polled from /proc, children included), not clean
pages of memory-mapped inputs, which the kernel may drop at any time; `max_rss` (wait4) is
reported beside it because it is what `/usr/bin/time` shows.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [
                    int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()
                ]
        except OSError:
            pass
    return out


def rss_anon_kb(pid: int) -> int:
    """RssAnon of `pid` and its descendants, in KiB."""
    total = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def measure(
    cmd: list[str], cwd: str | Path | None = None, stdout: list[str] | None = None
) -> dict[str, float]:
    """Run `cmd`; return wall and CPU seconds, peak RssAnon and max RSS in MiB.

    `stdout`: a list to append the child's standard output to (else it is discarded).
    Raises SystemExit with the child's stderr tail when it fails.
    """
    start = time.perf_counter()
    out_file = tempfile.TemporaryFile() if stdout is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=out_file, stderr=subprocess.PIPE)
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_kb(proc.pid))
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if stdout is not None:
        out_file.seek(0)
        stdout.append(out_file.read().decode(errors="replace"))
        out_file.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{stderr.decode()[-3000:]}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_anon_mb": peak[0] / 1024,
        "max_rss_mb": usage.ru_maxrss / 1024,
    }


def warm(path: Path) -> None:
    """Read a file once so both methods start from the page cache."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
