"""Smoke test of the Socket.IO tutorial peer and its Python driver.

Run with the project's venv after ``bench/peers/socketio/setup``:

    .venv/bin/python bench/peers/socketio/smoke.py

Starts server.js on a free 127.0.0.1 port with a fresh SQLite file, connects 3
tabs, sends 100 messages from one tab and checks that every tab got all of them
exactly once and in order; cuts one tab's connection, sends 20 more, reconnects
it and checks that it caught up exactly once (connection state recovery); cuts
the sending tab with sends in flight (they are retried after its own
reconnection); freezes the server past a tab's ack timeout (retries with the
same client offset are stored once); then restarts the server (the recovery
state is lost, so the tabs catch up from SQLite by serverOffset), sends 10 more,
checks all tabs, checks that a replayed client offset is stored once, opens a
late tab that must get the whole history, and stops. Exit 0 when every check
passed. Bounded: about 7 s, 120 s at most.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import socketio
from client import SocketIOTab, rss_bytes, start_server

DEADLINE_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    def __init__(self, name: str):
        self.name = name
        self.got: list[tuple[int, str]] = []

    def __call__(self, offset: int, content: str) -> None:
        self.got.append((offset, content))

    @property
    def contents(self) -> list[str]:
        return [c for _, c in self.got]


async def wait_until(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def check_exact(rec: Recorder, expected: list[str]) -> None:
    offsets = [o for o, _ in rec.got]
    first_diff = next(
        (i for i, (a, b) in enumerate(zip(rec.contents, expected, strict=False)) if a != b), None
    )
    assert rec.contents == expected, (
        f"{rec.name}: got {len(rec.got)} messages, expected {len(expected)}; "
        f"first difference at {first_diff}"
    )
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets), (
        f"{rec.name}: offsets out of order or repeated"
    )


def line(msg: str) -> None:
    print(msg, flush=True)


async def main() -> int:
    t_start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="socketio-peer-smoke-"))
    port = free_port()
    server = await start_server(workdir, port)
    tabs: list[SocketIOTab] = []
    try:
        line(
            f"server: pid {server.pid} on {server.url}, db {server.db_path}, "
            f"rss {rss_bytes(server) / 2**20:.1f} MiB"
        )
        recs = [Recorder(n) for n in ("A", "B", "C")]
        tabs = [SocketIOTab(server.url, on_message=r) for r in recs]
        await asyncio.gather(*(t.start() for t in tabs))
        a, b, c = tabs
        line(f"3 tabs connected: {[t.socket_id for t in tabs]}")

        # 1. 100 messages from tab A, all tabs get each exactly once, in order
        expected = [f"msg {i:03d}" for i in range(100)]
        t0 = time.monotonic()
        await asyncio.gather(*(a.send(m) for m in expected))  # queued in order, one in flight
        t_acked = time.monotonic() - t0
        await wait_until(
            lambda: all(len(r.got) >= 100 for r in recs), 20, "100 messages on every tab"
        )
        await asyncio.sleep(0.2)  # let any duplicate show up
        for r in recs:
            check_exact(r, expected)
        line(
            f"phase 1: 100 sent from A, acked in {t_acked:.2f}s; "
            "every tab got 100 exactly once in order "
            f"(last_offset {[t.last_offset for t in tabs]})"
        )

        # 2. cut C's connection, 20 more, C reconnects and catches up exactly once
        await c.kill_connection(hold=True)
        assert not c.connected
        more = [f"more {i:02d}" for i in range(20)]
        await asyncio.gather(*(a.send(m) for m in more))
        await wait_until(
            lambda: len(recs[0].got) >= 120 and len(recs[1].got) >= 120, 20, "120 on A and B"
        )
        assert len(recs[2].got) == 100, f"C got {len(recs[2].got)} while offline"
        c.resume()
        await c.wait_connected(20)
        await wait_until(lambda: len(recs[2].got) >= 120, 20, "C to catch up")
        await asyncio.sleep(0.3)
        expected += more
        for r in recs:
            check_exact(r, expected)
        line(
            f"phase 2: C cut, 20 sent, C reconnected (recovered={c.recovered}) and caught up: "
            f"every tab has 120 exactly once in order (C duplicates dropped: {c.stats.duplicates})"
        )
        assert c.recovered, "expected connection state recovery on C's reconnection"

        # 2b. cut A's connection while its sends are queued / in flight: they are
        #     tried again after A reconnects by itself (back-off ~1 s), stored once
        burst = [f"burst {i:02d}" for i in range(20)]
        sends = [asyncio.ensure_future(a.send(m)) for m in burst]
        await wait_until(lambda: a.stats.sends_acked >= 125, 10, "a few burst messages acked")
        unacked = len(burst) - (a.stats.sends_acked - 120)
        await a.kill_connection(hold=False)
        t0 = time.monotonic()
        await asyncio.gather(*sends)
        t_reconnect = time.monotonic() - t0
        await wait_until(lambda: all(len(r.got) >= 140 for r in recs), 20, "140 on every tab")
        await asyncio.sleep(0.3)
        expected += burst
        for r in recs:
            check_exact(r, expected)
        line(
            f"phase 2b: A cut with {unacked} of 20 sends unacked, reconnected by itself "
            f"(recovered={a.recovered}) and sent them in {t_reconnect:.2f}s: "
            "every tab has 140 exactly once in order "
            f"(A tries {a.stats.tries} for {a.stats.sends_acked} messages)"
        )

        # 2c. server frozen (SIGSTOP) longer than E's ack timeout: E retries with the
        #     same client offset, the UNIQUE column keeps one row, one broadcast
        rec_e = Recorder("E")
        e = SocketIOTab(server.url, on_message=rec_e, ack_timeout=0.3, retries=10)
        tabs.append(e)
        recs.append(rec_e)
        await e.start()
        await wait_until(lambda: len(rec_e.got) >= 140, 10, "E's history")
        server.process.send_signal(signal.SIGSTOP)
        frozen = [f"frozen {i}" for i in range(3)]
        sends = [asyncio.ensure_future(e.send(m)) for m in frozen]
        await asyncio.sleep(1.0)
        server.process.send_signal(signal.SIGCONT)
        await asyncio.gather(*sends)
        await wait_until(lambda: all(len(r.got) >= 143 for r in recs), 20, "143 on every tab")
        await asyncio.sleep(0.3)
        expected += frozen
        for r in recs:
            check_exact(r, expected)
        with sqlite3.connect(server.db_path) as db:
            n_rows = db.execute("SELECT count(*) FROM messages").fetchone()[0]
        assert n_rows == 143, n_rows
        assert e.stats.ack_timeouts >= 2, e.stats
        line(
            f"phase 2c: server frozen 1s: E's 3 messages took {e.stats.tries} tries "
            f"({e.stats.ack_timeouts} ack timeouts), stored once each ({n_rows} rows), "
            "every tab has 143 exactly once"
        )

        # 3. restart the server: no recovery state, catch-up from SQLite by serverOffset
        await server.stop()
        line(
            f"phase 3: server stopped (exit {server.process.returncode}); tabs disconnected: "
            f"{[not t.connected for t in tabs]}"
        )
        server = await start_server(workdir, port)
        await asyncio.gather(*(t.wait_connected(20) for t in tabs))
        last = [f"after restart {i}" for i in range(10)]
        await asyncio.gather(*(b.send(m) for m in last))
        expected += last
        await wait_until(
            lambda: all(len(r.got) >= len(expected) for r in recs),
            20,
            "every tab after the restart",
        )
        await asyncio.sleep(0.3)
        for r in recs:
            check_exact(r, expected)
        assert not any(t.recovered for t in tabs), "no session can be recovered after a restart"
        line(
            f"phase 3: server restarted (pid {server.pid}), tabs reconnected from serverOffset, "
            "10 sent from B: "
            f"every tab has {len(expected)} exactly once in order"
        )

        # 4. the same client offset twice is stored once and acked twice
        raw = socketio.AsyncClient(reconnection=False, handle_sigint=False)
        acks: list[tuple] = []
        got_raw: list[tuple] = []
        raw.on("chat message", lambda *args: got_raw.append(args))
        await raw.connect(server.url, auth={"serverOffset": len(expected)}, wait_timeout=10)
        for _ in range(2):
            acks.append(await raw.call("chat message", ("dup", "smoke-fixed-offset-1"), timeout=10))
        await raw.disconnect()
        assert [args[0] for args in got_raw] == ["dup"], got_raw
        expected.append("dup")
        await wait_until(
            lambda: all(len(r.got) >= len(expected) for r in recs), 10, "the dup message"
        )
        await asyncio.sleep(0.3)
        for r in recs:
            check_exact(r, expected)
        with sqlite3.connect(server.db_path) as db:
            n_rows = db.execute("SELECT count(*) FROM messages").fetchone()[0]
            n_dup = db.execute(
                "SELECT count(*) FROM messages WHERE client_offset = 'smoke-fixed-offset-1'"
            ).fetchone()[0]
        assert n_rows == len(expected) and n_dup == 1, (n_rows, n_dup)
        line(
            f"phase 4: one client offset sent twice: acked {len(acks)} times, "
            f"stored once ({n_rows} rows), "
            f"broadcast once"
        )

        # 5. a late tab (a page load, serverOffset 0) gets the whole history once
        rec_d = Recorder("D")
        d = SocketIOTab(server.url, on_message=rec_d)
        tabs.append(d)
        await d.start()
        await wait_until(lambda: len(rec_d.got) >= len(expected), 20, "D's history")
        await asyncio.sleep(0.2)
        check_exact(rec_d, expected)
        line(f"phase 5: late tab D got the whole history ({len(expected)}) exactly once in order")

        rss = rss_bytes(server)
        for t in tabs:
            assert t.stats.sends_failed == 0 and t.pending == 0
        line(
            "tab stats: "
            + "; ".join(
                f"{n}: connects {t.stats.connects} (recovered {t.stats.recovered_connects}), "
                f"received {t.stats.received}, dup dropped {t.stats.duplicates}, "
                f"sends {t.stats.sends_acked}, tries {t.stats.tries}"
                for n, t in zip("ABCED", tabs, strict=True)
            )
        )
        line(f"server rss {rss / 2**20:.1f} MiB; total {time.monotonic() - t_start:.1f}s")
    finally:
        for t in tabs:
            await t.stop()
        code = await server.stop()
        line(f"stopped: tabs closed, server exit {code}")
        shutil.rmtree(workdir, ignore_errors=True)
    line("smoke OK")
    return 0


if __name__ == "__main__":
    try:
        rc = asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    except AssertionError as e:
        print(f"smoke FAILED: {e}", file=sys.stderr, flush=True)
        rc = 1
    except TimeoutError:
        print(f"smoke FAILED: did not finish in {DEADLINE_S}s", file=sys.stderr, flush=True)
        rc = 1
    sys.exit(rc)
