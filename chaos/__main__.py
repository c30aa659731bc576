"""
`python -m chaos`: one seeded chaos run against real daphne processes; exit status 1 on any
violation of the delivery guarantees.
"""

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from chaos.history import summary_lines
from chaos.run import BREAKS, FAULTS, ChaosRun, Options


def parse(argv: list[str]) -> Options:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m chaos",
        description=(
            "Run simulated tabs against real daphne processes while injecting faults, then "
            "check that every confirmed message reached every target tab exactly once, in "
            "order, with no gap, one order per room, nothing stored twice and no queue entry "
            "left behind. More than one process needs DATABASE_URL (PostgreSQL)."
        ),
    )
    p.add_argument("--tabs", type=int, default=d.tabs, help="simulated tabs (default %(default)s)")
    p.add_argument("--users", type=int, default=d.users, help="users (default %(default)s)")
    p.add_argument("--rooms", type=int, default=d.rooms, help="rooms (default %(default)s)")
    p.add_argument("--room-size", type=int, default=d.room_size, help="members per room")
    p.add_argument("--dm-share", type=float, default=d.dm_share, help="share of direct messages")
    p.add_argument("--messages", type=int, default=d.messages, help="sends (default %(default)s)")
    p.add_argument("--processes", type=int, default=d.processes, help="daphne processes")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random choice")
    p.add_argument(
        "--faults",
        default=",".join(d.faults),
        help=f"comma-separated, from {', '.join(FAULTS)}; empty for none (default: all)",
    )
    p.add_argument("--fault-every", type=int, default=d.fault_every, help="sends between faults")
    p.add_argument("--rate", type=float, default=d.rate, help="sends per second at most")
    p.add_argument("--settle", type=float, default=d.settle, help="seconds to wait to settle")
    p.add_argument(
        "--quiet-for",
        type=float,
        default=d.quiet,
        help="settled once no delivery arrived for this many seconds",
    )
    p.add_argument(
        "--break", dest="break_", choices=BREAKS, help="serve a deliberately broken build"
    )
    p.add_argument("--database-url", help="PostgreSQL server URL (default: $DATABASE_URL)")
    p.add_argument("--workdir", type=Path, help="where logs and the SQLite file go")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    a = p.parse_args(argv)
    faults = tuple(f for f in a.faults.split(",") if f)
    unknown = set(faults) - set(FAULTS)
    if unknown:
        p.error(f"unknown fault(s): {', '.join(sorted(unknown))}")
    if a.database_url:
        os.environ["DATABASE_URL"] = a.database_url
    return Options(
        tabs=a.tabs,
        dm_share=a.dm_share,
        users=a.users,
        rooms=a.rooms,
        room_size=a.room_size,
        messages=a.messages,
        processes=a.processes,
        seed=a.seed,
        faults=faults,
        fault_every=a.fault_every,
        rate=a.rate,
        settle=a.settle,
        quiet=a.quiet_for,
        break_=a.break_,
        workdir=a.workdir,
        progress=not a.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse(sys.argv[1:] if argv is None else argv)
    # A stopped run (SIGTERM, Ctrl-C) still stops its servers and drops its database.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    report = asyncio.run(ChaosRun(options).run())
    print(f"chaos run: seed {options.seed}, {report.seconds:.1f}s")
    print("  operations: " + ", ".join(f"{k} {v}" for k, v in report.operations.items()))
    print("  faults: " + (", ".join(f"{k} {v}" for k, v in report.faults.items()) or "none"))
    print(f"  tracebacks in server logs: {report.server_errors}")
    if report.ok:
        print("violations: none")
    else:
        print("VIOLATIONS:")
        print("\n".join(summary_lines(report.violations)))
    print("CHAOS " + report.as_json())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
