"""CPU use during a benchmark cell, from /proc: the server's, the load generator's and every
other process's, and a gate that waits for the other processes to go quiet."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BUSY_CORES = 0.2  # other processes using more than this during a cell: the cell is flagged


def _machine_busy_s() -> float:
    """CPU seconds all cores have spent busy (steal included), from /proc/stat; 0 elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return 0.0
    ticks = [int(v) for v in fields]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def _process_cpu_s(pid: int) -> float:
    """CPU seconds a process has used, all its threads, from /proc/<pid>/stat; 0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


class CpuMeter:
    """CPU used since the meter started, in cores: by the server, by this process (the load
    generator) and by every other process on the machine."""

    def __init__(self, server_pids: Sequence[int] = ()) -> None:
        self.server_pids = server_pids  # the server, and its Redis for the durable variant
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        server = sum(_process_cpu_s(pid) for pid in self.server_pids)
        return time.perf_counter(), _machine_busy_s(), server, _process_cpu_s(os.getpid())

    def cores(self) -> dict[str, float]:
        wall, busy, server, ours = (b - a for a, b in zip(self._start, self._read(), strict=True))
        return {
            "server_cpu_cores": server / wall,
            "loadgen_cpu_cores": ours / wall,
            "other_cpu_cores": max(0.0, busy - server - ours) / wall,
        }


@dataclass
class QuietGate:
    """Waits, in 1 s samples, until other processes use under half of BUSY_CORES; spends at
    most budget_s over the whole run, then lets every cell through."""

    budget_s: float

    def wait(self, server_pids: Sequence[int] = ()) -> None:
        while self.budget_s > 0:
            meter = CpuMeter(server_pids)
            time.sleep(1.0)
            self.budget_s -= 1.0
            if meter.cores()["other_cpu_cores"] < BUSY_CORES / 2:
                return
