"""Shared helpers of the benchmarks: child processes, /proc readings, the machine, percentiles.

Nothing here imports cti_bridge, so a helper process started from it stays light.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port that was free a moment ago (the daemon's admin API needs a fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_mb": mem_kb // 1024,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
    }


@dataclass(frozen=True)
class ProcSample:
    """One reading of a process: CPU seconds (user+system) and memory (MB)."""

    cpu_seconds: float
    rss_mb: float
    hwm_mb: float  # peak resident set size so far (VmHWM)


def proc_sample(pid: int) -> ProcSample:
    with open(f"/proc/{pid}/stat") as fh:
        # The command name may hold spaces: fields start after the last ')'.
        rest = fh.read().rsplit(")", 1)[1].split()
    cpu = (int(rest[11]) + int(rest[12])) / CLK_TCK  # utime, stime (fields 14 and 15)
    rss = hwm = 0.0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return ProcSample(cpu, rss, hwm)


def cpu_busy_seconds() -> float:
    """Core-seconds the whole machine spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as fh:
        parts = fh.readline().split()[1:]
    ticks = [int(p) for p in parts[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def process_cpu_seconds(pid: int) -> float:
    try:
        return proc_sample(pid).cpu_seconds
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0


def command_cpu_seconds(comm: str, title_contains: str = "") -> float:
    """CPU seconds of the live processes named ``comm`` whose title (cmdline) contains the text:
    the PostgreSQL backends serving one database show its name there."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as fh:
                if fh.read().strip() != comm:
                    continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                if title_contains.encode() not in fh.read():
                    continue
        except OSError:
            continue
        total += process_cpu_seconds(int(entry.name))
    return total


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


class Child:
    """A helper process that prints one JSON line when it is ready, then serves until terminated."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        ready_json: bool = True,
    ) -> None:
        self.name = name
        self._log: TextIO | None = open(log_path, "w") if log_path is not None else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if ready_json else (self._log or subprocess.DEVNULL),
            stderr=self._log or subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=ROOT,
        )
        self.info: dict[str, Any] = {}
        if ready_json:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if not line:
                self.stop()
                raise RuntimeError(f"{name} did not start (see {log_path})")
            self.info = json.loads(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sample(self) -> ProcSample:
        return proc_sample(self.proc.pid)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


def python_argv(script: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCH / script), *args]


def wall() -> float:
    return time.time()
