"""
`python -m bench`: start each server under test on 127.0.0.1, run the workloads against ours and
against the Socket.IO tutorial peer back to back, print a table and one `BENCH {json}` line.
"""

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import workloads
from bench.common import machine_info, raise_nofile, say
from bench.report import render
from bench.targets import Ours, Peer, new_workdir, peer_available

WORKLOADS = ("throughput", "fanout", "catchup", "memory", "scale")

# name: (type, full default, --quick default, help)
SIZES: dict[str, tuple[type, object, object, str]] = {
    "workers": (int, 2, 2, "load-generator processes for throughput, fan-out and scale"),
    "users": (int, 4, 2, "ours: users the tabs belong to (all in the room; tabs share logins)"),
    "body_bytes": (int, 64, 64, "padding characters in each message body"),
    "ack_delay": (float, 0.2, 0.2, "ours: RelayClient's ack batching delay, seconds"),
    "tp_tabs": (int, 200, 20, "throughput: tabs in the room"),
    "tp_messages": (int, 20000, 400, "throughput: messages in total"),
    "tp_senders": (int, 0, 0, "throughput: tabs that send (0: every tab)"),
    "tp_seconds": (float, 60.0, 10.0, "throughput: no new send after this many seconds"),
    "drain_seconds": (float, 60.0, 20.0, "throughput/scale: wait this long for deliveries"),
    "fanout_tabs": (int, 1000, 50, "fan-out: receiving tabs"),
    "fanout_messages": (int, 50, 10, "fan-out: messages measured (one at a time)"),
    "fanout_warmup": (int, 2, 1, "fan-out: messages sent first and not measured"),
    "fanout_gap": (
        float,
        0.3,
        0.3,
        "fan-out: pause after the last tab has a message, seconds; longer than --ack-delay, so"
        " ours' acks of one message are in before the next (with 0.1 they arrive during it)",
    ),
    "fanout_timeout": (float, 30.0, 10.0, "fan-out: give up on one message after, seconds"),
    "fanout_seconds": (float, 150.0, 20.0, "fan-out: no new message after this many seconds"),
    "catchup_messages": (int, 10000, 300, "catch-up: messages missed"),
    "catchup_fill": (int, 10, 5, "catch-up: sends in flight while filling"),
    "catchup_fill_seconds": (float, 300.0, 30.0, "catch-up: bound of the fill, seconds"),
    "catchup_timeout": (float, 120.0, 30.0, "catch-up: bound of each catch-up, seconds"),
    "memory_tabs": (str, "1000,5000", "100,300", "idle memory: tab counts measured"),
    "memory_settle": (float, 3.0, 1.0, "idle memory: seconds to wait before reading RSS"),
    "scale_processes": (str, "1,2,4", "1,2", "scale: daphne process counts"),
    "scale_tabs": (int, 200, 20, "scale: tabs"),
    "scale_messages": (int, 20000, 400, "scale: messages in total"),
    "scale_seconds": (float, 45.0, 10.0, "scale: no new send after this many seconds"),
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmarks of this server (daphne, driven by relayclient) side by side with the "
            "Socket.IO tutorial's chat server (node, driven by bench/peers/socketio/client.py), "
            "on 127.0.0.1: 1 throughput, 2 fan-out, 3 catch-up, 4 idle memory; and 5 scale "
            "(ours only: 1, 2, 4 daphne processes on PostgreSQL + channels-redis). Prints a "
            "table and one line 'BENCH {json}'. Progress goes to stderr."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes in all)")
    p.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        help=f"comma-separated workloads, from {', '.join(WORKLOADS)}",
    )
    p.add_argument("--targets", default="ours,peer", help="ours, peer or both")
    p.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="PostgreSQL server for the scale workload (a fresh database is created in it), "
        "e.g. postgres://postgres@127.0.0.1:5432/postgres; without it scale is skipped",
    )
    p.add_argument("--workdir", type=Path, help="keep every server's files and logs here")
    for name, (kind, full, quick, text) in SIZES.items():
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=None,
            help=f"{text} (default {full}; --quick: {quick})",
        )
    a = p.parse_args(argv)
    for name, (_, full, quick, _) in SIZES.items():
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    a.only = [w.strip() for w in a.only.split(",") if w.strip()]
    unknown = set(a.only) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if set(a.targets) - {"ours", "peer"} or not a.targets:
        p.error("--targets takes ours, peer or ours,peer")
    a.memory_levels = sorted({int(x) for x in a.memory_tabs.split(",") if x.strip()})
    a.scale_counts = sorted({int(x) for x in a.scale_processes.split(",") if x.strip()})
    return a


def _options(a: argparse.Namespace) -> dict:
    out = {name: getattr(a, name) for name in SIZES}
    out.update(quick=a.quick, only=a.only, targets=a.targets)
    out["database_url"] = bool(a.database_url)
    return out


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.keep = a.workdir is not None
        if a.workdir:
            a.workdir.mkdir(parents=True, exist_ok=True)
        self.base = a.workdir or Path(tempfile.mkdtemp(prefix="bench-"))
        self.pad = "x" * max(0, a.body_bytes)
        self.results: dict = {}
        self.failed = False

    def _ours(self, workload: str, **kw) -> Ours:
        settings = kw.pop("settings", {})
        workdir = new_workdir(self.base, f"ours-{workload}")
        return Ours(workdir, self.a.users, settings=settings, ack_delay=self.a.ack_delay, **kw)

    async def _one(self, workload: str, target, run) -> dict:
        label = f"{workload} / {target.kind}"
        say(f"{label}: starting the server ({target.backend})")
        t0 = time.monotonic()
        result: dict = {}
        try:
            await target.start()
            result = await run(target)
            result["server_tracebacks"] = target.server_errors()
            result["backend"] = target.backend
        except Exception as exc:
            say(f"{label}: FAILED\n{traceback.format_exc()}")
            lines = [x for x in str(exc).strip().splitlines() if x.strip()]
            short = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
            result = {"error": f"{type(exc).__name__}: {short}"[:400]}
            self.failed = True
        finally:
            health = getattr(target, "health", None)
            if health is not None:
                state = health()
                if not all(state["alive"]) or not all(state["accepting"]):
                    result["server_health_at_end"] = state
                    say(f"{label}: the server was not healthy at the end: {state}")
            with contextlib.suppress(Exception):
                await target.close()
        hung = getattr(target, "hung_on_sigterm", 0)
        if hung:
            result["servers_hung_on_sigterm"] = hung
            say(f"{label}: {hung} daphne process(es) did not exit on SIGTERM within 3 s: killed")
        say(f"{label}: done in {time.monotonic() - t0:.1f}s")
        return result

    def _targets(self, workload: str, settings: dict | None = None) -> list:
        out = []
        for name in self.a.targets:
            if name == "ours":
                out.append(self._ours(workload, settings=settings or {}))
            elif self.peer_missing is None:
                out.append(Peer(new_workdir(self.base, f"peer-{workload}")))
        return out

    async def run(self) -> dict:
        a = self.a
        self.peer_missing = peer_available() if "peer" in a.targets else None
        if self.peer_missing:
            say(f"the peer is skipped: {self.peer_missing}")
            self.results["peer_skipped"] = self.peer_missing
        if "throughput" in a.only:
            limit = {"MESSAGING_QUEUE_LIMIT": str(max(10_000, a.tp_messages + 1_000))}
            self.results["throughput"] = {}
            for target in self._targets("throughput", limit):
                self.results["throughput"][target.kind] = await self._one(
                    "throughput",
                    target,
                    lambda t: workloads.throughput(
                        t,
                        tabs=a.tp_tabs,
                        messages=a.tp_messages,
                        senders=a.tp_senders or None,
                        seconds=a.tp_seconds,
                        drain=a.drain_seconds,
                        workers=a.workers,
                        pad=self.pad,
                    ),
                )
        if "fanout" in a.only:
            self.results["fanout"] = {}
            for target in self._targets("fanout"):
                self.results["fanout"][target.kind] = await self._one(
                    "fanout",
                    target,
                    lambda t: workloads.fanout(
                        t,
                        tabs=a.fanout_tabs,
                        messages=a.fanout_messages,
                        warmup=a.fanout_warmup,
                        gap=a.fanout_gap,
                        timeout=a.fanout_timeout,
                        seconds=a.fanout_seconds,
                        workers=a.workers,
                        pad=self.pad,
                    ),
                )
        if "catchup" in a.only:
            limit = {"MESSAGING_QUEUE_LIMIT": str(max(10_000, a.catchup_messages + 1_000))}
            self.results["catchup"] = {}
            for target in self._targets("catchup", limit):
                self.results["catchup"][target.kind] = await self._one(
                    "catchup",
                    target,
                    lambda t: workloads.catchup(
                        t,
                        messages=a.catchup_messages,
                        fill_concurrency=a.catchup_fill,
                        fill_seconds=a.catchup_fill_seconds,
                        timeout=a.catchup_timeout,
                        pad=self.pad,
                    ),
                )
        if "memory" in a.only:
            self.results["memory"] = {}
            for target in self._targets("memory"):
                self.results["memory"][target.kind] = await self._one(
                    "memory",
                    target,
                    lambda t: workloads.idle_memory(
                        t, levels=a.memory_levels, settle=a.memory_settle
                    ),
                )
        if "scale" in a.only and "ours" in a.targets:
            self.results["scale"] = await self._scale()
        return self.results

    async def _scale(self) -> dict:
        a = self.a
        if not a.database_url:
            say("scale: skipped (no --database-url / DATABASE_URL)")
            return {"skipped": "needs PostgreSQL: --database-url or DATABASE_URL"}
        if not shutil.which("redis-server"):
            say("scale: skipped (redis-server is not installed)")
            return {"skipped": "needs the redis-server binary"}
        limit = {"MESSAGING_QUEUE_LIMIT": str(max(10_000, a.scale_messages + 1_000))}
        runs = []
        for n in a.scale_counts:
            target = self._ours(
                f"scale{n}", processes=n, database_url=a.database_url, settings=limit
            )
            result = await self._one(
                f"scale {n}p",
                target,
                lambda t: workloads.throughput(
                    t,
                    tabs=a.scale_tabs,
                    messages=a.scale_messages,
                    senders=None,
                    seconds=a.scale_seconds,
                    drain=a.drain_seconds,
                    workers=a.workers,
                    pad=self.pad,
                ),
            )
            result["processes"] = n
            runs.append(result)
        rates = {r["processes"]: r.get("stored_per_s") for r in runs}
        ratios = {}
        if rates.get(1):
            for n, rate in rates.items():
                if n != 1 and rate is not None:
                    ratios[f"{n}p/1p"] = round(rate / rates[1], 3)
        return {"tabs": a.scale_tabs, "runs": runs, "ratios": ratios}

    def cleanup(self) -> None:
        if self.failed and not self.keep:
            say(f"a workload failed: its servers' logs are kept in {self.base}")
        elif not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    raise_nofile()
    machine = machine_info()
    bench = Bench(a)
    t0 = time.monotonic()
    try:
        results = asyncio.run(bench.run())
    finally:
        bench.cleanup()
    machine["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    machine["seconds"] = round(time.monotonic() - t0, 1)
    for line in render(results, _options(a), machine):
        print(line)
    print(
        "BENCH "
        + json.dumps(
            {"machine": machine, "options": _options(a), "results": results},
            sort_keys=True,
            default=str,
        ),
        flush=True,
    )
    failed = [
        f"{w}/{side}"
        for w, sides in results.items()
        if isinstance(sides, dict)
        for side, r in sides.items()
        if isinstance(r, dict) and "error" in r
    ]
    failed += [
        f"scale/{r['processes']}p"
        for r in (results.get("scale") or {}).get("runs", [])
        if "error" in r
    ]
    return 1 if failed else 0
