"""What a measurement cost: the load generator's CPU and reads, the server's CPU.

A figure says something about a server only if the load generator had CPU to
spare while it was taken: a generator whose core is full delivers its own
queueing delay as the server's latency, and its own ceiling as the server's
throughput. So every measurement is metered, and the report flags a figure
taken with the generator's core (nearly) full as bound by the load generator.

"Busy" is the time a process ran plus the time it was ready to run but
waited for a core (the run queue, ``/proc/PID/task/*/schedstat``): on a
shared machine another process on the same core shows up as waiting, not as
spare capacity.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Protocol

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# At or above this share of one core a process is taken as its core's prisoner.
BOUND_PCT = 90.0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it: nginx's master and its worker, uvicorn
    and any child it forks."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads, dead ones included)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    return total / CLOCK_TICKS


def wait_seconds(pids: list[int]) -> float:
    """Time the threads of these processes waited in a run queue for a core."""
    total = 0
    for pid in pids:
        for schedstat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            try:
                total += int(schedstat.read_text().split()[1])
            except (OSError, IndexError):
                continue
    return total / 1e9


def rss_kib(pids: list[int]) -> int:
    """Resident memory of these processes, summed (nginx: master and worker)."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Server(Protocol):
    def pids(self) -> list[int]: ...


class Counts(Protocol):
    """What the streams received (``bench.loadgen.Totals``)."""

    events: int
    reads: int
    bytes: int


class Meter:
    """CPU of the load generator (this process) and of the server, and what the
    streams read, from construction until ``read()``."""

    def __init__(self, server: Server, counts: Counts | None = None) -> None:
        self.server_pids = server.pids()
        self.counts = counts
        self.wall = time.monotonic()
        self.own_cpu = _own_cpu()
        self.own_wait = wait_seconds([os.getpid()])
        self.server_cpu = cpu_seconds(self.server_pids)
        self.server_wait = wait_seconds(self.server_pids)
        self.events, self.reads, self.bytes = self._counted()

    def _counted(self) -> tuple[int, int, int]:
        if self.counts is None:
            return 0, 0, 0
        return self.counts.events, self.counts.reads, self.counts.bytes

    def read(self) -> dict[str, float]:
        """Shares of one core (%) since construction, and events per read."""
        wall = max(1e-6, time.monotonic() - self.wall)
        events, reads, received = (
            now - then
            for now, then in zip(
                self._counted(), (self.events, self.reads, self.bytes), strict=True
            )
        )
        pct = 100 / wall
        return {
            "loadgen_cpu_pct": (_own_cpu() - self.own_cpu) * pct,
            "loadgen_wait_pct": (wait_seconds([os.getpid()]) - self.own_wait) * pct,
            "server_cpu_pct": (cpu_seconds(self.server_pids) - self.server_cpu) * pct,
            "server_wait_pct": (wait_seconds(self.server_pids) - self.server_wait) * pct,
            "reads": reads,
            "events_per_read": events / reads if reads else float("nan"),
            "bytes_per_event": received / events if events else float("nan"),
        }


def loadgen_busy(row: dict[str, float]) -> float:
    return row.get("loadgen_cpu_pct", float("nan")) + row.get("loadgen_wait_pct", 0.0)


def server_busy(row: dict[str, float]) -> float:
    return row.get("server_cpu_pct", float("nan")) + row.get("server_wait_pct", 0.0)
