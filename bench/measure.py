"""Helpers shared by the benchmarks: the machine and its load, clocks, percentiles, a child's peak memory.

The cores are shared, so every measurement carries the 1-minute load average beside it: a number taken at
load 6 on 2 cores says more about the neighbours than about the code. The run also records the share of CPU
time the hypervisor stole (`steal_share`), which the load average inside the machine does not show.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


def load_average() -> float:
    """The 1-minute load average, rounded."""
    return round(os.getloadavg()[0], 2)


def cpu_jiffies() -> tuple[int, int]:
    """(steal, total) CPU time of the machine so far, in jiffies (/proc/stat; (0, 0) where there is none).

    Steal is time the hypervisor gave our virtual CPUs to other guests: at 50% steal every wall time here is
    about twice what the same work takes on the cores alone, whatever the load average says."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return 0, 0
    fields = [int(value) for value in stat.read_text().splitlines()[0].split()[1:]]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(start: tuple[int, int], end: tuple[int, int]) -> float | None:
    """The share of CPU time stolen by the hypervisor between two `cpu_jiffies` readings."""
    total = end[1] - start[1]
    return round((end[0] - start[0]) / total, 3) if total > 0 else None


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    total_kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), 0)
    return {
        "cpu": models[0] if models else platform.processor(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(total_kib / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


@dataclass
class Clock:
    wall: float = 0.0  # seconds
    cpu: float = 0.0  # this process's CPU seconds, all threads
    load_before: float = 0.0
    load_after: float = 0.0

    def to_dict(self) -> dict:
        return {
            "seconds": round(self.wall, 3),
            "cpu_seconds": round(self.cpu, 3),
            "load_before": self.load_before,
            "load_after": self.load_after,
        }


@contextmanager
def clock() -> Iterator[Clock]:
    """Wall and CPU time of a block, with the load average before and after it."""
    result = Clock(load_before=load_average())
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield result
    finally:
        result.wall, result.cpu = time.perf_counter() - wall, time.process_time() - cpu
        result.load_after = load_average()


def percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """Latencies in seconds -> p50/p95/p99/mean in ms (nearest-rank percentiles)."""
    if not seconds:
        return {"n": 0}
    ms = sorted(1000 * s for s in seconds)

    def rank(q: float) -> float:
        return round(ms[min(len(ms) - 1, round(q * (len(ms) - 1)))], 2)

    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": rank(0.95),
        "p99_ms": rank(0.99),
        "mean_ms": round(statistics.fmean(ms), 2),
        "n": len(ms),
    }


def wait_measured(process: subprocess.Popen, kill_after: float | None = None) -> dict:
    """Wait for a child (killing it after `kill_after` seconds) -> its exit code and CPU seconds.

    Not its peak memory: Linux counts the pre-exec high-water mark of the process a child was forked from,
    so a child of this (large) interpreter reports at least our own peak. See `run_measured` and `peak_rss_mib`.
    """
    deadline = None if kill_after is None else time.monotonic() + kill_after
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG if deadline else 0)
        if pid:
            break
        if time.monotonic() > deadline:
            process.kill()
            deadline = None  # then wait for it without a limit
        time.sleep(0.1)
    process.returncode = os.waitstatus_to_exitcode(status)  # tell Popen: it must not wait again
    return {"returncode": process.returncode, "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2)}


def peak_rss_mib(pid: int) -> float | None:
    """A running process's peak resident memory so far (VmHWM; Linux only)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return None if kib is None else round(kib / 1024, 1)


# Runs a command from a small interpreter and writes its usage as JSON: forked from there, the command's
# ru_maxrss is its own peak (or that of its largest descendant, e.g. a zoo worker), not ours.
LEAN_PARENT = """
import json, os, subprocess, sys
process = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(process.pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "cpu_seconds": usage.ru_utime + usage.ru_stime,
               "peak_rss_kib": usage.ru_maxrss}, out)
"""


def run_measured(command: Sequence[str], log: Path, **popen) -> dict:
    """Run a command to its end -> wall and CPU seconds, peak RSS, load before/after; output goes to `log`."""
    usage_file = log.with_suffix(".usage.json")
    load_before, start = load_average(), time.perf_counter()
    with open(log, "wb") as out:
        parent = [sys.executable, "-S", "-c", LEAN_PARENT, str(usage_file), *command]
        returncode = subprocess.run(parent, stdout=out, stderr=subprocess.STDOUT, **popen).returncode
    seconds = time.perf_counter() - start
    usage = json.loads(usage_file.read_text()) if returncode == 0 else {"returncode": returncode}
    if usage["returncode"] != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(command)} exited with {usage['returncode']}:\n{tail}")
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(usage["cpu_seconds"], 2),
        "peak_rss_mib": round(usage["peak_rss_kib"] / 1024, 1),  # Linux reports KiB
        "load_before": load_before,
        "load_after": load_average(),
    }


def self_peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
