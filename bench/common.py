"""
Small helpers shared by the benchmark's orchestrator and its worker processes: percentiles,
process CPU and RSS from /proc, the machine's CPU counters, the file-descriptor limit.
"""

import asyncio
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float | None:
    """
    The p-th percentile (0-100) by linear interpolation between closest ranks; None if empty.
    """
    if not values:
        return None
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    rank = (len(data) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


async def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """
    Poll `predicate` (plain counters, updated by callbacks) until it holds or `timeout` passes.
    """
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(step)
    return True


def raise_nofile() -> tuple[int, int]:
    """
    Raise this process's soft RLIMIT_NOFILE to its hard limit (children started afterwards, the
    servers included, inherit it); returns (soft, hard).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def proc_cpu_seconds(pid: int) -> float:
    """
    User + system CPU seconds used so far by process `pid` (all its threads); 0 if it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After "pid (comm)": state is fields[0]; utime and stime are fields 14 and 15 of the line.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_rss_bytes(pid: int) -> int:
    """
    VmRSS of process `pid` in bytes (from /proc/PID/status).
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine_cpu() -> tuple[int, int]:
    """
    (busy, total) jiffies of the whole machine so far, from /proc/stat.
    """
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return total - idle, total


def pids_matching(text: str) -> list[int]:
    """
    Processes whose command line contains `text` (e.g. the PostgreSQL backends of a database,
    which show "postgres: user dbname host(port) state").
    """
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            out.append(int(entry))
    return out


class CpuMeter:
    """
    CPU used between construction and `stop()`: by the server processes, by auxiliary
    processes found by `aux` at the start and at the end (Redis, PostgreSQL backends), and by
    the whole machine.
    """

    def __init__(self, pids: list[int], aux: Callable[[], list[int]] | None = None) -> None:
        self.pids = list(pids)
        self.aux = aux
        self.t0 = time.monotonic()
        self.server0 = sum(proc_cpu_seconds(pid) for pid in self.pids)
        self.aux0 = {pid: proc_cpu_seconds(pid) for pid in (aux() if aux else [])}
        self.machine0 = machine_cpu()

    def stop(self) -> dict:
        """
        {"wall_s", "server_cpu_s", "server_cpu_util" (cores), "machine_busy" (0..1)}, and
        "aux_cpu_s"/"aux_cpu_util" with `aux`.
        """
        wall = time.monotonic() - self.t0
        server = sum(proc_cpu_seconds(pid) for pid in self.pids) - self.server0
        busy1, total1 = machine_cpu()
        busy = (busy1 - self.machine0[0]) / max(1, total1 - self.machine0[1])
        out = {
            "wall_s": round(wall, 3),
            "server_cpu_s": round(server, 2),
            "server_cpu_util": round(server / wall, 2) if wall > 0 else None,
            "machine_busy": round(busy, 3),
        }
        if self.aux is not None:
            pids = set(self.aux()) | set(self.aux0)
            aux = sum(max(0.0, proc_cpu_seconds(p) - self.aux0.get(p, 0.0)) for p in pids)
            out["aux_cpu_s"] = round(aux, 2)
            out["aux_cpu_util"] = round(aux / wall, 2) if wall > 0 else None
        return out


def machine_info() -> dict:
    """
    What the numbers were measured on.
    """
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    node = None
    binary = os.environ.get("NODE") or shutil.which("node")
    if binary:
        try:
            node = subprocess.run(
                [binary, "-v"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            node = None
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "mem_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": node,
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "nofile": list(raise_nofile()),
        "argv": [re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", x) for x in sys.argv[1:]],
    }


def say(text: str) -> None:
    """
    A progress line on stderr (stdout carries only the table and the BENCH line).
    """
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)
