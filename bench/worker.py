"""
Load-generator processes. The orchestrator starts a few worker processes (multiprocessing,
spawn) so that the client side is not limited to one core; each worker runs its own asyncio loop
with its share of the tabs and answers commands sent over a pipe. Timestamps are
time.monotonic(), which on Linux is one clock for every process of the machine, so send times
from one worker and receive times from another can be compared.

Main side: `WorkerHandle` (`await handle.request(cmd, args)`). Worker side: `worker_main`.
"""

import asyncio
import collections
import contextlib
import gc
import logging
import multiprocessing
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import proc_cpu_seconds, raise_nofile, wait_until


class WorkerHandle:
    """
    The orchestrator's end of one worker process.
    """

    def __init__(self, wid: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.wid = wid
        self.proc = ctx.Process(target=worker_main, args=(child, wid), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        self.replies: asyncio.Queue = asyncio.Queue()
        self.haves: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(parent.fileno(), self._readable)
        self._reading = True

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                (self.haves if msg[0] == "have" else self.replies).put_nowait(msg)
        except (EOFError, OSError):
            self._stop_reading()
            self.replies.put_nowait(("dead", "", f"worker {self.wid} exited"))

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.conn.fileno())

    async def request(self, cmd: str, args: dict | None = None, timeout: float = 600.0) -> Any:
        """
        Send one command and wait for its answer (RuntimeError if the worker failed).
        """
        self.conn.send((cmd, args or {}))
        kind, name, payload = await asyncio.wait_for(self.replies.get(), timeout)
        if kind == "error":
            raise RuntimeError(f"worker {self.wid}, command {name}:\n{payload}")
        if kind == "dead":
            raise RuntimeError(payload)
        return payload

    async def close(self) -> None:
        """
        Stop the worker's tabs and the process (terminated if it does not exit).
        """
        if self.proc.is_alive():
            with contextlib.suppress(Exception):
                await self.request("close", timeout=60)
        self._stop_reading()
        await asyncio.to_thread(self.proc.join, 10)
        if self.proc.is_alive():
            self.proc.terminate()
            await asyncio.to_thread(self.proc.join, 5)
        with contextlib.suppress(Exception):
            self.conn.close()


async def start_workers(count: int) -> list[WorkerHandle]:
    """
    `count` worker processes, each ready (imported and answering).
    """
    handles = [WorkerHandle(w) for w in range(count)]
    await asyncio.gather(*(h.request("ping", timeout=120) for h in handles))
    return handles


async def close_workers(handles: list[WorkerHandle]) -> None:
    await asyncio.gather(*(h.close() for h in handles), return_exceptions=True)


def worker_main(conn: Any, wid: int) -> None:
    """
    Entry point of a worker process.
    """
    logging.basicConfig(level=logging.ERROR, format="worker %(process)d %(name)s: %(message)s")
    raise_nofile()
    # Hundreds of clients per process: Python's default collector paused a worker for up to
    # 250 ms at a time (as it did the server; see SERVER_GC_THRESHOLDS), which showed up as
    # latency of whichever server was measured. The same for ours and the peer.
    gc.freeze()
    gc.set_threshold(10000, 50, 100)
    asyncio.run(Worker(conn, wid).serve())


class Worker:
    """
    The tabs of one worker process and the commands it understands (`cmd_*`).
    """

    def __init__(self, conn: Any, wid: int) -> None:
        self.conn = conn
        self.wid = wid
        self.tabs: list = []
        self.sender: Any = None
        self.pool: Any = None
        self.idle_targets: list[tuple[str, dict]] = []
        self._reset()

    def _reset(self) -> None:
        self.counts = [0] * len(self.tabs)
        self.recv: dict[str, list] = {}
        self.sent_at: dict[str, float] = {}
        self.stored_at: dict[str, float] = {}
        self.deliveries = 0
        self.first_recv: float | None = None
        self.last_recv: float | None = None
        self.watch = 0
        self.errors: list[str] = []
        self.send_failures = 0

    # -- plumbing -------------------------------------------------------------------------------

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def readable() -> None:
            try:
                while self.conn.poll():
                    inbox.put_nowait(self.conn.recv())
            except (EOFError, OSError):
                loop.remove_reader(self.conn.fileno())
                inbox.put_nowait(None)

        loop.add_reader(self.conn.fileno(), readable)
        while True:
            msg = await inbox.get()
            if msg is None:
                await self._stop_all()
                return
            cmd, args = msg
            try:
                payload = await getattr(self, f"cmd_{cmd}")(args)
                self.conn.send(("reply", cmd, payload))
            except Exception:
                self.conn.send(("error", cmd, traceback.format_exc()))
            if cmd == "close":
                return

    def on_token(self, index: int, token: str) -> None:
        t = time.monotonic()
        if index < 0:
            return  # the fan-out sender's own copy
        self.counts[index] += 1
        self.deliveries += 1
        if self.first_recv is None:
            self.first_recv = t
        self.last_recv = t
        rec = self.recv.get(token)
        if rec is None:
            rec = self.recv[token] = [1, t, t]
        else:
            rec[0] += 1
            rec[1] = t
        if self.watch and rec[0] == self.watch:
            self.conn.send(("have", token, t, rec[2]))

    async def _stop_all(self) -> None:
        tabs = [*self.tabs, *([self.sender] if self.sender else [])]
        await asyncio.gather(
            *(asyncio.wait_for(tab.stop(), 10) for tab in tabs), return_exceptions=True
        )
        self.tabs, self.sender = [], None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    def _error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)

    # -- commands -------------------------------------------------------------------------------

    async def cmd_ping(self, a: dict) -> dict:
        return {"wid": self.wid}

    async def cmd_close(self, a: dict) -> dict:
        await self._stop_all()
        return {}

    async def cmd_cpu(self, a: dict) -> dict:
        return {"cpu": time.process_time(), "t": time.monotonic()}

    async def cmd_open(self, a: dict) -> dict:
        """
        Open tabs (a list of specs) in batches, and optionally a sender tab; bounded in time.
        """
        from bench.tabs import make_tab

        t0 = time.monotonic()
        self.tabs = [make_tab(spec, i, self.on_token) for i, spec in enumerate(a["tabs"])]
        if a.get("sender"):
            self.sender = make_tab(a["sender"], -1, self.on_token)
        self._reset()
        batch = int(a.get("batch", 20))
        everything = [*self.tabs, *([self.sender] if self.sender else [])]
        for start in range(0, len(everything), batch):
            await asyncio.wait_for(
                asyncio.gather(*(tab.start() for tab in everything[start : start + batch])),
                a.get("timeout", 120),
            )
        return {"opened": len(everything), "seconds": round(time.monotonic() - t0, 2)}

    async def cmd_throughput(self, a: dict) -> dict:
        """
        Every tab with a count sends that many messages one after the other, each waiting for
        the server's acknowledgement (ours: `sent`; peer: the emit callback), from `start_at`
        until done or `time_limit` seconds have passed.
        """
        self._reset()
        plan: list[int] = a["plan"]
        pad = a["pad"]
        await asyncio.sleep(max(0.0, a["start_at"] - time.monotonic()))
        self.cpu0, self.t0 = time.process_time(), time.monotonic()
        deadline = a["start_at"] + a["time_limit"]
        cut = 0

        async def run(i: int, n: int) -> None:
            nonlocal cut
            tab = self.tabs[i]
            for k in range(n):
                if time.monotonic() >= deadline:
                    cut += n - k
                    return
                token = f"{self.wid}.{i}.{k}"
                self.sent_at[token] = time.monotonic()
                try:
                    await tab.send(token, pad)
                except Exception as exc:
                    self.send_failures += 1
                    self._error(f"send {token}: {exc!r}")
                    continue
                self.stored_at[token] = time.monotonic()

        await asyncio.gather(*(run(i, n) for i, n in enumerate(plan) if n))
        return {
            "stored": len(self.stored_at),
            "attempted": len(self.sent_at),
            "cut_by_time": cut,
            "errors": self.send_failures,
        }

    async def cmd_drain(self, a: dict) -> dict:
        """
        Wait until every tab has `expect` messages (bounded); then everything measured.
        """
        expect = a["expect"]
        await wait_until(lambda: not self.counts or min(self.counts) >= expect, a["timeout"])
        cpu = time.process_time() - self.cpu0
        wall = time.monotonic() - self.t0
        unacked = None
        if a.get("check_acks") and self.tabs and self.tabs[0].kind == "ours":
            await asyncio.sleep(0.5)  # > ack_delay: the last cumulative acks are out
            left = await asyncio.gather(
                *(tab.unacked() for tab in self.tabs), return_exceptions=True
            )
            unacked = sum(n for n in left if isinstance(n, int))
            for exc in left:
                if isinstance(exc, BaseException):
                    self._error(f"queue check: {exc!r}")
        return {
            "sent_at": self.sent_at,
            "stored_at": self.stored_at,
            "recv": self.recv,
            "deliveries": self.deliveries,
            "tabs_complete": sum(1 for c in self.counts if c >= expect),
            "tabs": len(self.tabs),
            "first_recv": self.first_recv,
            "last_recv": self.last_recv,
            "cpu_s": cpu,
            "wall_s": wall,
            "unacked": unacked,
            "reconnects": sum(tab.reconnects() for tab in self.tabs),
            "resyncs": sum(tab.resyncs() for tab in self.tabs),
            "send_failures": self.send_failures,
            "errors": self.errors,
        }

    async def cmd_watch(self, a: dict) -> dict:
        """
        From now on, report ("have", token, t, first) when every tab of this worker has a token
        (t: when the last one had it; first: when the first one had it).
        """
        self._reset()
        self.watch = len(self.tabs)
        self.cpu0, self.t0 = time.process_time(), time.monotonic()
        return {"tabs": len(self.tabs)}

    async def cmd_fanout_send(self, a: dict) -> dict:
        t0 = time.monotonic()
        await self.sender.send(a["token"], a["pad"], wait=False)
        return {"t0": t0}

    async def cmd_fanout_end(self, a: dict) -> dict:
        return {
            "cpu_s": time.process_time() - self.cpu0,
            "wall_s": time.monotonic() - self.t0,
            "reconnects": sum(tab.reconnects() for tab in self.tabs),
            "errors": self.errors,
        }

    async def cmd_catchup(self, a: dict) -> dict:
        """
        Two catcher tabs go offline, a sender stores `messages` messages, then each catcher
        comes back in turn: the time until it has all of them.
          ours: both catchers are stopped and restarted with their state (client id, last seq),
                as a reloaded tab does; both read their queue from the database.
          peer: catcher A loses its connection and reconnects (connection state recovery if
                within its window), catcher B is closed and a new page opens with its
                serverOffset (the replay from SQLite).
        """
        from bench.tabs import OursTab, PeerTab, make_tab

        spec_s, spec_c = a["sender"], a["catcher"]
        n, pad, timeout = a["messages"], a["pad"], a["timeout"]
        server_pids: list[int] = a.get("server_pids", [])
        kind = spec_s["kind"]
        counts: collections.Counter = collections.Counter()
        firsts: dict[int, float] = {}
        lasts: dict[int, float] = {}

        def on_token(index: int, token: str) -> None:
            t = time.monotonic()
            if token.startswith("c"):
                counts[index] += 1
                firsts.setdefault(index, t)
                lasts[index] = t
            else:
                counts[1000 + index] += 1  # warm-up

        def until(pred, limit: float):
            return wait_until(pred, limit, step=0.005)

        fillers = 1 if kind == "ours" else max(1, int(a["fill_concurrency"]))
        senders = [make_tab(spec_s, 100 + j, on_token) for j in range(fillers)]
        catchers = [make_tab(spec_c, 0, on_token), make_tab(spec_c, 1, on_token)]
        self.tabs = [*senders, *catchers]  # stopped by close
        for tab in self.tabs:
            await tab.start()
        await senders[0].send("warm", pad)
        if not await until(lambda: counts[1000] >= 1 and counts[1001] >= 1, 30):
            raise RuntimeError("the warm-up message did not reach the catchers")
        await asyncio.sleep(0.3)  # their acks are out

        # Offline.
        offset_b = 0
        if kind == "ours":
            state_a, state_b = catchers[0].state, catchers[1].state
            await catchers[0].stop()
            await catchers[1].stop()
        else:
            await catchers[0].tab.kill_connection(hold=True)
            offset_b = catchers[1].tab.last_offset
            await catchers[1].stop()

        # The fill (timed for information only), bounded by fill_seconds: if that cuts it,
        # the catchers are measured on what was stored.
        t0 = time.monotonic()
        if kind == "ours":
            gate = asyncio.Semaphore(int(a["fill_concurrency"]))

            async def one(k: int) -> None:
                async with gate:
                    await senders[0].send(f"c{k}", pad)

            jobs = [asyncio.create_task(one(k)) for k in range(n)]
        else:

            async def fill(j: int) -> None:
                for k in range(j, n, fillers):
                    await senders[j].send(f"c{k}", pad)

            jobs = [asyncio.create_task(fill(j)) for j in range(fillers)]
        _, pending = await asyncio.wait(jobs, timeout=a["fill_seconds"])
        for job in pending:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        fill_s = time.monotonic() - t0
        # Let the live copies to the senders finish so the server is idle again; what the
        # first sender got is what was stored (it is in the room too).
        if pending:
            last_seen = -1
            while counts[100] != last_seen:
                last_seen = counts[100]
                await asyncio.sleep(2.0)
        else:
            await until(lambda: all(counts[100 + j] >= n for j in range(fillers)), timeout)
        n = counts[100]
        await asyncio.sleep(1.0)

        async def measure(index: int, come_back) -> dict:
            cpu0, srv0 = time.process_time(), sum(proc_cpu_seconds(p) for p in server_pids)
            start = time.monotonic()
            await come_back()
            done = await until(lambda: counts[index] >= n, timeout)
            end = lasts.get(index, time.monotonic()) if done else time.monotonic()
            wall = end - start
            return {
                "seconds": round(wall, 3) if done else None,
                "received": counts[index],
                "first_after_s": round(firsts[index] - start, 3) if index in firsts else None,
                "client_cpu_s": round(time.process_time() - cpu0, 2),
                "server_cpu_s": round(sum(proc_cpu_seconds(p) for p in server_pids) - srv0, 2),
            }

        out: dict = {
            "messages": n,
            "planned": a["messages"],
            "fill_s": round(fill_s, 2),
            "fill_msgs_per_s": round(n / fill_s, 1),
        }
        if kind == "ours":
            back_a = OursTab(spec_c, 10, on_token, state=state_a)
            back_b = OursTab(spec_c, 11, on_token, state=state_b)
            self.tabs += [back_a, back_b]
            out["reconnect"] = await measure(10, back_a.start)
            await asyncio.sleep(0.5)
            out["replay"] = await measure(11, back_b.start)
            out["reconnect"]["path"] = out["replay"]["path"] = "queue in the database"
        else:

            async def resume() -> None:
                catchers[0].tab.resume()

            out["reconnect"] = await measure(0, resume)
            out["reconnect"]["recovered"] = catchers[0].tab.recovered
            out["reconnect"]["path"] = (
                "connection state recovery (server memory)"
                if catchers[0].tab.recovered
                else "not recovered: SQLite replay"
            )
            await asyncio.sleep(0.5)
            back_b = PeerTab(spec_c, 11, on_token, initial_offset=offset_b)
            self.tabs.append(back_b)
            out["replay"] = await measure(11, back_b.start)
            out["replay"]["path"] = "new socket with serverOffset: SQLite replay"
        return out

    # -- idle connections (memory) --------------------------------------------------------------

    async def cmd_idle_prepare(self, a: dict) -> dict:
        """
        What each idle connection will connect with. Ours: register `count` clients over HTTP
        (spread over the given users' sessions); peer: the Engine.IO websocket URL.
        """
        from bench.rawws import IdlePool

        host, port = a["host"], a["port"]
        self.pool = IdlePool(a["kind"], host, port)
        count = a["count"]
        t0 = time.monotonic()
        if a["kind"] == "peer":
            self.idle_targets = [("/socket.io/?EIO=4&transport=websocket", {})] * count
        else:
            from relayclient.http import HttpSession

            origin = f"http://{host}:{port}"
            sessions = []
            for user in a["users"]:
                session = HttpSession(origin)
                for cookie in user["cookies"]:
                    session.jar.set_cookie(cookie)
                sessions.append(session)

            def register(i: int) -> tuple[str, dict]:
                session = sessions[i % len(sessions)]
                status, body = session.request_sync("POST", "/api/clients/")
                if status != 201:
                    raise RuntimeError(f"register: {status} {body}")
                headers = {"Cookie": session.cookie_header(), "Origin": origin}
                return f"/ws/?client_id={body['client_id']}&after=0", headers

            with ThreadPoolExecutor(max_workers=8) as pool:
                self.idle_targets = list(pool.map(register, range(count)))
        return {"prepared": len(self.idle_targets), "seconds": round(time.monotonic() - t0, 2)}

    async def cmd_idle_open(self, a: dict) -> dict:
        take = self.idle_targets[: a["count"]]
        self.idle_targets = self.idle_targets[a["count"] :]
        result = await self.pool.open(take, concurrency=a.get("concurrency", 50))
        result["alive"] = self.pool.alive
        return result

    async def cmd_idle_status(self, a: dict) -> dict:
        return {"alive": self.pool.alive if self.pool else 0}

    async def cmd_idle_close(self, a: dict) -> dict:
        if self.pool is not None:
            await self.pool.close()
        return {}
