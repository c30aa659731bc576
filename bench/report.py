"""
The table (ours vs the peer, with the ratio and the issue's targets) and its notes.
"""

from typing import Any


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}f}" if abs(value) >= 10 else f"{value:.{digits + 1}f}"
    return str(value)


def _cores(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(ours: Any, peer: Any) -> float | None:
    if not isinstance(ours, (int, float)) or not isinstance(peer, (int, float)) or not peer:
        return None
    return ours / peer


def _level(result: dict | None, tabs: int) -> dict | None:
    for level in _get(result, "levels") or []:
        if level["tabs"] == tabs:
            return level
    return None


def rows(results: dict, opts: dict) -> list[dict]:
    """
    Table rows: workload, metric, better (higher/lower), ours, peer, ratio, target.
    """
    out: list[dict] = []

    def add(workload, metric, better, ours, peer, target=None, met=None):
        ratio = _ratio(ours, peer)
        out.append(
            {
                "workload": workload,
                "metric": metric,
                "better": better,
                "ours": ours,
                "peer": peer,
                "ratio": None if ratio is None else round(ratio, 3),
                "target": target,
                "met": met,
            }
        )

    tp = results.get("throughput")
    if tp:
        o, p = tp.get("ours"), tp.get("peer")
        name = f"1 throughput ({_get(o, 'tabs') or _get(p, 'tabs')} tabs)"
        so, sp = _get(o, "stored_per_s"), _get(p, "stored_per_s")
        ratio = _ratio(so, sp)
        add(
            name,
            "messages stored/s",
            "higher",
            so,
            sp,
            ">= 1.0x peer",
            None if ratio is None else ratio >= 1.0,
        )
        add(
            name,
            "deliveries acked/s (peer: received/s)",
            "higher",
            _get(o, "deliveries_per_s"),
            _get(p, "deliveries_per_s"),
        )
        add(
            name,
            "latency p50 send->all tabs, ms",
            "lower",
            _get(o, "latency_ms", "p50"),
            _get(p, "latency_ms", "p50"),
        )
        add(
            name,
            "latency p99 send->all tabs, ms",
            "lower",
            _get(o, "latency_ms", "p99"),
            _get(p, "latency_ms", "p99"),
        )
    fo = results.get("fanout")
    if fo:
        o, p = fo.get("ours"), fo.get("peer")
        name = f"2 fan-out ({_get(o, 'tabs') or _get(p, 'tabs')} tabs)"
        add(
            name,
            "p50 until the last tab has it, ms",
            "lower",
            _get(o, "latency_ms", "p50"),
            _get(p, "latency_ms", "p50"),
        )
        p99 = _get(o, "latency_ms", "p99")
        add(
            name,
            "p99 until the last tab has it, ms",
            "lower",
            p99,
            _get(p, "latency_ms", "p99"),
            "ours < 100 ms",
            None if p99 is None else p99 < 100,
        )
    cu = results.get("catchup")
    if cu:
        o, p = cu.get("ours"), cu.get("peer")
        n = _get(o, "planned") or _get(p, "planned")
        name = f"3 catch-up ({n:,} missed)" if n else "3 catch-up"
        no, np_ = _get(o, "messages"), _get(p, "messages")
        if no and np_ and no != np_:
            # A fill cut by its time bound: compare the time per message, shown per 10,000.
            def per(r, key, count):
                s = _get(r, key, "seconds")
                return None if s is None else round(s * (n or count) / count, 3)

            ro, rp = per(o, "reconnect", no), per(p, "reconnect", np_)
            bo, bp = per(o, "replay", no), per(p, "replay", np_)
            suffix = f" (scaled to {n:,})"
        else:
            ro, rp = _get(o, "reconnect", "seconds"), _get(p, "reconnect", "seconds")
            bo, bp = _get(o, "replay", "seconds"), _get(p, "replay", "seconds")
            suffix = ""
        add(
            name,
            "reconnect: s until all (peer: state recovery)" + suffix,
            "lower",
            ro,
            rp,
            "<= peer",
            None if ro is None or rp is None else ro <= rp,
        )
        add(name, "reopen from the DB: s until all (peer: SQLite)" + suffix, "lower", bo, bp)
    me = results.get("memory")
    if me:
        o, p = me.get("ours"), me.get("peer")
        levels = sorted({lv["tabs"] for r in (o, p) for lv in (_get(r, "levels") or [])})
        for i, tabs in enumerate(levels):
            lo, lp = _level(o, tabs), _level(p, tabs)
            vo, vp = _get(lo, "per_tab_kib"), _get(lp, "per_tab_kib")
            last = i == len(levels) - 1
            add(
                "4 idle memory",
                f"RSS per idle tab at {tabs:,} tabs, KiB",
                "lower",
                vo,
                vp,
                "ours < 100 KiB" if last else None,
                (None if vo is None else vo < 100 and _get(lo, "alive") == tabs) if last else None,
            )
    return out


def scale_rows(results: dict) -> list[dict]:
    sc = results.get("scale")
    if not sc or "runs" not in sc:
        return []
    out = []
    base = None
    for run in sc["runs"]:
        n = run["processes"]
        rate = _get(run, "stored_per_s")
        if n == 1:
            base = rate
        ratio = _ratio(rate, base) if base else None
        out.append(
            {
                "processes": n,
                "stored_per_s": rate,
                "deliveries_per_s": _get(run, "deliveries_per_s"),
                "p99_ms": _get(run, "latency_ms", "p99"),
                "vs_1p": None if ratio is None else round(ratio, 2),
                "server_cpu": _get(run, "server", "server_cpu_util"),
                "client_cpu": _get(run, "client", "cpu_util"),
                "error": run.get("error"),
            }
        )
    return out


def render(results: dict, opts: dict, machine: dict) -> list[str]:
    """
    The printed table and its notes.
    """
    lines = [
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['mem_gib']} GiB, "
        f"Linux {machine['kernel']}, Python {machine['python']}, node {machine['node'] or '-'}; "
        f"load average at start {' '.join(machine['loadavg_start'])} "
        "(shared machine: other jobs ran meanwhile, numbers are noisy)",
        "",
    ]
    table = rows(results, opts)
    if table:
        head = ["workload", "metric", "ours", "peer", "ours/peer", "better", "target"]
        body = []
        for r in table:
            target = ""
            if r["target"]:
                verdict = "-" if r["met"] is None else ("met" if r["met"] else "NOT met")
                target = f"{r['target']}: {verdict}"
            body.append(
                [
                    r["workload"],
                    r["metric"],
                    _fmt(r["ours"]),
                    _fmt(r["peer"]),
                    "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                    r["better"],
                    target,
                ]
            )
        widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
        right = {2, 3, 4}

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                for i, c in enumerate(cells)
            ).rstrip()

        lines.append(line(head))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend(line(b) for b in body)
    scale = scale_rows(results)
    if scale:
        lines.append("")
        lines.append(
            "5 scale (ours only, PostgreSQL + channels-redis, throughput workload, "
            f"{_get(results, 'scale', 'tabs')} tabs spread over the processes):"
        )
        lines.append(
            f"  {'processes':>9}  {'stored/s':>9}  {'deliv/s':>9}  {'p99 ms':>8}  "
            f"{'vs 1p':>6}  {'server cpu':>10}  {'client cpu':>10}"
        )
        for s in scale:
            if s["error"]:
                lines.append(f"  {s['processes']:>9}  error: {s['error']}")
                continue
            lines.append(
                f"  {s['processes']:>9}  {_fmt(s['stored_per_s']):>9}  "
                f"{_fmt(s['deliveries_per_s']):>9}  {_fmt(s['p99_ms']):>8}  "
                f"{_cores(s['vs_1p']):>6}  {_cores(s['server_cpu']):>10}  "
                f"{_cores(s['client_cpu']):>10}"
            )
        ratios = _get(results, "scale", "ratios") or {}
        if ratios:
            verdict = ratios.get("2p/1p")
            lines.append(
                "  "
                + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items() if v is not None)
                + (
                    f"   (target 2p/1p >= 1.6: {'met' if verdict >= 1.6 else 'NOT met'})"
                    if verdict is not None
                    else ""
                )
            )
    elif results.get("scale"):
        lines.append("")
        lines.append(f"5 scale: {results['scale'].get('skipped') or results['scale']}")
    lines.append("")
    lines.extend(notes(results))
    return lines


def notes(results: dict) -> list[str]:
    """
    What limited each measurement: client and server CPU, time bounds, incomplete runs.
    """
    out = ["notes:"]

    def cpu(r: dict) -> str:
        c, s = r.get("client") or {}, r.get("server") or {}
        busy = s.get("machine_busy")
        text = (
            f"server {_cores(s.get('server_cpu_util'))} cores, client {c.get('workers')} "
            f"process(es) {_cores(c.get('cpu_util'))} cores "
            f"(per process {', '.join(_cores(u) for u in c.get('worker_util') or [])}), "
            f"machine {'-' if busy is None else round(100 * busy)}% busy"
        )
        if s.get("aux_cpu_util") is not None:
            text += f", Redis + PostgreSQL backends {_cores(s['aux_cpu_util'])} cores"
        if c.get("bound"):
            text += "; CLIENT-BOUND: a load-generator process used >= 85% of a core"
        if busy is not None and busy >= 0.95:
            text += "; MACHINE SATURATED: every core was busy (server, clients and other jobs)"
        return text

    for workload in ("throughput", "fanout"):
        for side in ("ours", "peer"):
            r = _get(results, workload, side)
            if not r:
                continue
            if "error" in r:
                out.append(f"- {workload} {side}: FAILED: {r['error']}")
                continue
            extra = []
            if workload == "throughput":
                extra.append(
                    f"{r['messages_stored']:,}/{r['messages_planned']:,} messages stored in "
                    f"{r['send_seconds']}s from {r['senders']} senders"
                )
                if r["cut_by_time"]:
                    extra.append(f"{r['cut_by_time']:,} not sent (time bound)")
                extra.append(
                    f"{r['deliveries']:,}/{r['deliveries_expected']:,} deliveries in "
                    f"{r['deliver_seconds']}s"
                )
                if r["messages_not_at_every_tab"]:
                    extra.append(f"{r['messages_not_at_every_tab']:,} messages not at every tab")
                if r.get("unacked_left") is not None:
                    extra.append(f"server queues left unacked: {r['unacked_left']}")
                if r["send_errors"]:
                    extra.append(f"{r['send_errors']} send errors")
                if r.get("reconnects"):
                    extra.append(f"{r['reconnects']} tab reconnects")
            else:
                extra.append(
                    f"{r['latency_ms']['n']} messages measured, {r['timed_out']} timed out, "
                    f"max {_fmt(r['latency_ms']['max'])} ms"
                )
                first = r.get("first_tab_ms") or {}
                if first.get("p50") is not None:
                    extra.append(
                        f"until the first tab has it: p50 {_fmt(first['p50'])} ms, "
                        f"p99 {_fmt(first['p99'])} ms"
                    )
                if r.get("cut_by_time"):
                    extra.append(f"{r['cut_by_time']} not sent (time bound)")
                if r.get("reconnects"):
                    extra.append(f"{r['reconnects']} tab reconnects")
            if r.get("server_tracebacks"):
                extra.append(f"{r['server_tracebacks']} server tracebacks logged")
            out.append(f"- {workload} {side}: {'; '.join(extra)}; {cpu(r)}")
    for side in ("ours", "peer"):
        r = _get(results, "catchup", side)
        if not r:
            continue
        if "error" in r:
            out.append(f"- catch-up {side}: FAILED: {r['error']}")
            continue
        parts = []
        for key in ("reconnect", "replay"):
            m = r.get(key) or {}
            parts.append(
                f"{key}: {m.get('path')}, {m.get('received'):,} received, first after "
                f"{_cores(m.get('first_after_s'))}s, client CPU {_cores(m.get('client_cpu_s'))}s,"
                f" server CPU {_cores(m.get('server_cpu_s'))}s"
            )
        cut = ""
        if r.get("planned") and r.get("messages") != r.get("planned"):
            cut = f" (fill cut by its time bound: {r['messages']:,} of {r['planned']:,} missed)"
        out.append(
            f"- catch-up {side}: filled at {_fmt(r.get('fill_msgs_per_s'))} msgs/s{cut}; "
            + "; ".join(parts)
        )
    for side in ("ours", "peer"):
        r = _get(results, "memory", side)
        if not r:
            continue
        if "error" in r:
            out.append(f"- idle memory {side}: FAILED: {r['error']}")
            continue
        levels = ", ".join(
            f"{lv['alive']:,}/{lv['tabs']:,} connected -> {lv['rss_mib']} MiB" for lv in r["levels"]
        )
        out.append(
            f"- idle memory {side}: RSS {r['rss_before_mib']} MiB before; {levels} "
            "(raw WebSocket idle clients, one process)"
        )
    everything = [
        (f"{w} {side}", r)
        for w, sides in results.items()
        if isinstance(sides, dict) and w != "scale"
        for side, r in sides.items()
        if isinstance(r, dict)
    ] + [(f"scale {r.get('processes')}p", r) for r in (results.get("scale") or {}).get("runs", [])]
    for name, r in everything:
        if r.get("server_health_at_end"):
            out.append(f"- {name}: server not healthy at the end: {r['server_health_at_end']}")
    hung = [name for name, r in everything if r.get("servers_hung_on_sigterm")]
    if hung:
        out.append(
            f"- daphne did not exit within 3 s of SIGTERM after {', '.join(hung)} (shutdown hang "
            "while detaching the closed sockets); killed, after the measurements"
        )
    sc = results.get("scale") or {}
    for run in sc.get("runs", []):
        if "error" in run:
            out.append(f"- scale {run['processes']}p: FAILED: {run['error']}")
        else:
            extra = f", {run['reconnects']} tab reconnects" if run.get("reconnects") else ""
            out.append(
                f"- scale {run['processes']}p: {run['messages_stored']:,} messages stored in "
                f"{run['send_seconds']}s, {run['deliveries']:,}/{run['deliveries_expected']:,} "
                f"deliveries{extra}; {cpu(run)}"
            )
    return out
