"""
The workloads, each against one started target (ours or the peer), driven by worker processes.
Every loop is bounded in count and in time; everything runs on loopback.
"""

import asyncio
import time

from bench.common import CpuMeter, percentile, proc_rss_bytes, say
from bench.worker import WorkerHandle, close_workers, start_workers

CLIENT_BOUND = 0.85  # a worker using this share of one core or more is probably the limit


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _split(tabs: int, workers: int) -> list[list[int]]:
    return [list(range(w, tabs, workers)) for w in range(workers)]


def _client_summary(results: list[dict]) -> dict:
    utils = [r["cpu_s"] / r["wall_s"] for r in results if r.get("wall_s")]
    return {
        "workers": len(results),
        "cpu_s": round(sum(r["cpu_s"] for r in results), 2),
        "worker_util": [round(u, 2) for u in utils],
        "cpu_util": round(sum(utils), 2),
        "bound": bool(utils) and max(utils) >= CLIENT_BOUND,
    }


async def _open(handles: list[WorkerHandle], target, index: list[list[int]], sender=None) -> float:
    t0 = time.monotonic()
    await asyncio.gather(
        *(
            h.request(
                "open",
                {
                    "tabs": [target.tab_spec(i) for i in index[w]],
                    "sender": sender if w == 0 else None,
                    "timeout": 180,
                },
                timeout=1800,
            )
            for w, h in enumerate(handles)
        )
    )
    return round(time.monotonic() - t0, 2)


async def throughput(
    target,
    *,
    tabs: int,
    messages: int,
    senders: int | None,
    seconds: float,
    drain: float,
    workers: int,
    pad: str,
) -> dict:
    """
    `tabs` tabs in one room; `senders` of them (default: all) send `messages` in total, each
    waiting for the server's acknowledgement before its next send (closed loop), for at most
    `seconds`; then up to `drain` seconds for every tab to receive every stored message.
    """
    handles = await start_workers(max(1, min(workers, tabs)))
    try:
        index = _split(tabs, len(handles))
        open_s = await _open(handles, target, index)
        say(f"  {target.kind}: {tabs} tabs online in {open_s}s; sending")
        nsend = max(1, min(senders or tabs, tabs))
        plan = [
            (messages // nsend + (1 if i < messages % nsend else 0)) if i < nsend else 0
            for i in range(tabs)
        ]
        aux = target.aux_pids if getattr(target, "database_url", None) else None
        meter = CpuMeter(target.pids, aux)
        start_at = time.monotonic() + 0.5
        sent = await asyncio.gather(
            *(
                h.request(
                    "throughput",
                    {
                        "plan": [plan[i] for i in index[w]],
                        "start_at": start_at,
                        "time_limit": seconds,
                        "pad": pad,
                    },
                    timeout=seconds + 600,
                )
                for w, h in enumerate(handles)
            )
        )
        stored = sum(s["stored"] for s in sent)
        say(f"  {target.kind}: {stored} messages stored; draining")
        results = await asyncio.gather(
            *(
                h.request(
                    "drain",
                    {"expect": stored, "timeout": drain, "check_acks": True},
                    timeout=drain + 600,
                )
                for h in handles
            )
        )
        server = meter.stop()
    finally:
        await close_workers(handles)

    sent_at: dict[str, float] = {}
    stored_at: dict[str, float] = {}
    count: dict[str, int] = {}
    last: dict[str, float] = {}
    for r in results:
        sent_at.update(r["sent_at"])
        stored_at.update(r["stored_at"])
        for token, (c, t, _) in r["recv"].items():
            count[token] = count.get(token, 0) + c
            last[token] = max(last.get(token, 0.0), t)
    latencies = [last[tok] - sent_at[tok] for tok in stored_at if count.get(tok, 0) >= tabs]
    first_send = min(sent_at.values()) if sent_at else start_at
    last_stored = max(stored_at.values()) if stored_at else first_send
    deliveries = sum(r["deliveries"] for r in results)
    last_recv = max((r["last_recv"] for r in results if r["last_recv"]), default=first_send)
    unacked = [r["unacked"] for r in results if r["unacked"] is not None]
    errors = [e for r in results for e in r["errors"]]
    return {
        "tabs": tabs,
        "senders": nsend,
        "messages_planned": messages,
        "messages_stored": stored,
        "cut_by_time": sum(s["cut_by_time"] for s in sent),
        "send_errors": sum(r["send_failures"] for r in results),
        "errors_sample": errors[:3],
        "reconnects": sum(r["reconnects"] for r in results),
        "resyncs": sum(r["resyncs"] for r in results),
        "send_seconds": round(last_stored - first_send, 3),
        "stored_per_s": round(stored / max(1e-9, last_stored - first_send), 1),
        "deliveries": deliveries,
        "deliveries_expected": stored * tabs,
        "deliver_seconds": round(last_recv - first_send, 3),
        "deliveries_per_s": round(deliveries / max(1e-9, last_recv - first_send), 1),
        "tabs_complete": sum(r["tabs_complete"] for r in results),
        "latency_ms": {
            "p50": _ms(percentile(latencies, 50)),
            "p99": _ms(percentile(latencies, 99)),
            "max": _ms(max(latencies)) if latencies else None,
            "n": len(latencies),
        },
        "messages_not_at_every_tab": stored - len(latencies),
        "unacked_left": sum(unacked) if unacked else None,
        "open_s": open_s,
        "client": _client_summary(results),
        "server": server,
    }


async def _wait_have(
    handle: WorkerHandle, token: str, deadline: float
) -> tuple[float, float] | None:
    # (when the worker's last tab had the token, when its first one had it)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            _, got, t, first = await asyncio.wait_for(handle.haves.get(), left)
        except TimeoutError:
            return None
        if got == token:
            return t, first


async def fanout(
    target,
    *,
    tabs: int,
    messages: int,
    warmup: int,
    gap: float,
    timeout: float,
    seconds: float,
    workers: int,
    pad: str,
) -> dict:
    """
    `tabs` connected tabs in one room and one more tab that sends; one message at a time (the
    next after the last tab has the previous one, and `gap` seconds): the time from the send
    call until the last tab has processed it. No new message after `seconds`.
    """
    handles = await start_workers(max(1, min(workers, tabs)))
    try:
        index = _split(tabs, len(handles))
        open_s = await _open(handles, target, index, sender=target.tab_spec(tabs))
        say(f"  {target.kind}: {tabs} tabs + 1 sender online in {open_s}s; sending")
        await asyncio.gather(*(h.request("watch") for h in handles))
        meter = CpuMeter(target.pids)
        latencies: list[float] = []
        firsts: list[float] = []
        lost = 0
        cut = 0
        stop_at = time.monotonic() + seconds
        for k in range(warmup + messages):
            if time.monotonic() > stop_at:
                cut = warmup + messages - k
                break
            token = f"f{k}"
            t0 = (await handles[0].request("fanout_send", {"token": token, "pad": pad}))["t0"]
            deadline = time.monotonic() + timeout
            times = [await _wait_have(h, token, deadline) for h in handles]
            if any(t is None for t in times):
                lost += 1
            elif k >= warmup:
                latencies.append(max(t[0] for t in times if t is not None) - t0)
                firsts.append(min(t[1] for t in times if t is not None) - t0)
            await asyncio.sleep(gap)
        ends = await asyncio.gather(*(h.request("fanout_end") for h in handles))
        server = meter.stop()
    finally:
        await close_workers(handles)
    return {
        "tabs": tabs,
        "messages": messages,
        "warmup": warmup,
        "timed_out": lost,
        "reconnects": sum(e["reconnects"] for e in ends),
        "cut_by_time": cut,
        "latency_ms": {
            "p50": _ms(percentile(latencies, 50)),
            "p99": _ms(percentile(latencies, 99)),
            "max": _ms(max(latencies)) if latencies else None,
            "n": len(latencies),
        },
        # Until the first tab has it: the server's store-and-push time, before the spread
        # over the tabs' sockets (and over the load generator's processing of their frames).
        "first_tab_ms": {
            "p50": _ms(percentile(firsts, 50)),
            "p99": _ms(percentile(firsts, 99)),
        },
        # Every message's time in sending order (the outliers' pattern: periodic or not).
        "each_ms": [_ms(x) for x in latencies],
        "open_s": open_s,
        "client": _client_summary(ends),
        "server": server,
    }


async def catchup(
    target,
    *,
    messages: int,
    fill_concurrency: int,
    fill_seconds: float,
    timeout: float,
    pad: str,
) -> dict:
    """
    A tab misses `messages` messages while offline, then comes back: time until it has all.
    """
    handles = await start_workers(1)
    try:
        result = await handles[0].request(
            "catchup",
            {
                "sender": target.tab_spec(0),
                "catcher": target.tab_spec(1),
                "messages": messages,
                "pad": pad,
                "timeout": timeout,
                "fill_concurrency": fill_concurrency,
                "fill_seconds": fill_seconds,
                "server_pids": target.pids,
            },
            timeout=fill_seconds + timeout * 4 + 300,
        )
    finally:
        await close_workers(handles)
    return result


async def idle_memory(target, *, levels: list[int], settle: float, warmup: int = 20) -> dict:
    """
    RSS of the server process with idle connected tabs, minus its RSS before, per tab.
    """
    handles = await start_workers(1)
    h = handles[0]
    pid = target.pids[0]
    try:
        top = max(levels)
        prep = await h.request(
            "idle_prepare", {**target.idle_args(), "count": top + warmup}, timeout=1800
        )
        say(f"  {target.kind}: {prep['prepared']} idle tabs prepared in {prep['seconds']}s")
        # Warm-up: the first connections import and allocate what any connection needs.
        await h.request("idle_open", {"count": warmup}, timeout=300)
        await h.request("idle_close")
        await asyncio.sleep(settle)
        rss0 = proc_rss_bytes(pid)
        out: dict = {"rss_before_mib": round(rss0 / 2**20, 1), "levels": []}
        have = 0
        for level in sorted(levels):
            opened = await h.request("idle_open", {"count": level - have}, timeout=1800)
            have = level
            await asyncio.sleep(settle)
            samples = []
            for _ in range(3):
                samples.append(proc_rss_bytes(pid))
                await asyncio.sleep(0.5)
            rss = samples[-1]
            alive = (await h.request("idle_status"))["alive"]
            per = (rss - rss0) / max(1, alive) / 1024
            out["levels"].append(
                {
                    "tabs": level,
                    "alive": alive,
                    "rss_mib": round(rss / 2**20, 1),
                    "per_tab_kib": round(per, 1),
                    "open_s": opened["seconds"],
                    "failed": opened["failed"],
                    "errors": opened["errors"],
                }
            )
            say(
                f"  {target.kind}: {alive}/{level} idle tabs, RSS {rss / 2**20:.1f} MiB, "
                f"{per:.1f} KiB per tab (opened in {opened['seconds']}s)"
            )
        await h.request("idle_close")
    finally:
        await close_workers(handles)
    return out
