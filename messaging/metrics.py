"""
Prometheus metrics of this server process, and the `/metrics` endpoint that serves them.

Counters and histograms move in the hot path (a lock and an add each: no database work per
message); what needs the database (clients, queue depth) is read at scrape time by
DatabaseCollector, in one aggregate query. Each process serves its own numbers: Prometheus
scrapes every daphne port (docs/metrics.md), no shared multiprocess directory.
"""

import functools
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from django.db.models import Count, F, Max, Q, Sum
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from messaging import conf

logger = logging.getLogger(__name__)

F_ = TypeVar("F_", bound=Callable[..., Any])

# Seconds: from a millisecond (one SQLite insert) to the 10 s a stuck database takes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Close codes get a label of their own; any other code a peer sends counts as "other", so a
# client cannot grow the series without bound.
KNOWN_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 1012, 1013}
    | {4000, 4400, 4401, 4403, 4404, 4409, 4413, 4429, 4503}
)
# The same for the codes of refused sends (clients.errors); unknown ones are "error".
KNOWN_REFUSALS = frozenset(
    {"rate_limited", "unknown_room", "not_a_member", "unknown_user", "unknown_client"}
)


class ProcessMetrics:
    """
    The instruments of this process, in a registry of their own (not prometheus_client's global
    one, which tests and other libraries share).
    """

    def __init__(self, process_id: str) -> None:
        self.registry = r = CollectorRegistry()
        self.sends = Counter("tabrelay_sends", "Messages stored (retries excluded).", registry=r)
        self.send_duplicates = Counter(
            "tabrelay_send_duplicates", "Sends answered as retries of a stored one.", registry=r
        )
        self.send_refusals = Counter(
            "tabrelay_send_refusals", "Sends refused, by error code.", ["code"], registry=r
        )
        self.send_store_seconds = Histogram(
            "tabrelay_send_store_seconds",
            "Time to store a send with its deliveries (its batch's transaction), per send.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.deliveries = Counter(
            "tabrelay_deliveries", "Delivery frames written to this process's sockets.", registry=r
        )
        self.acks = Counter(
            "tabrelay_acks", "Client acks written (several of one tab in a batch: one).", registry=r
        )
        self.push_seconds = Histogram(
            "tabrelay_push_seconds",
            "From a send's commit to its pokes handed to this process's sockets and the layer.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.resyncs = Counter(
            "tabrelay_resyncs", "resync_required errors sent to this process's tabs.", registry=r
        )
        self.closes = Counter(
            "tabrelay_websocket_closes", "WebSocket closes, by close code.", ["code"], registry=r
        )
        self.cleanup_runs = Counter(
            "tabrelay_cleanup_runs", "Cleanup runs of this process (it held the lease).", registry=r
        )
        self.cleanup_removed = Counter(
            "tabrelay_cleanup_removed_clients", "Clients removed by cleanup runs.", registry=r
        )
        self.sockets = Gauge(
            "tabrelay_sockets", "WebSockets attached to a client in this process.", registry=r
        )
        self.sockets.set_function(_attached_sockets)
        info = Gauge(
            "tabrelay_process_info",
            "This process (its id is ServerProcess.id and Client.server).",
            ["process_id", "pid"],
            registry=r,
        )
        info.labels(process_id, str(os.getpid())).set(1)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(DatabaseCollector())


def _attached_sockets() -> int:
    from clients import push  # clients.push imports this module

    return len(push.local_receivers)


@functools.cache
def process() -> ProcessMetrics:
    """
    This process's metrics, made on first use.
    """
    from clients.process import PROCESS_ID

    return ProcessMetrics(PROCESS_ID)


class DatabaseCollector:
    """
    Gauges read from the database at scrape time, in one aggregate query over the clients:
    the same numbers from every process (take `max` across instances).
    """

    def collect(self) -> Iterator[Metric]:
        """
        Registered and connected clients, resync_required clients and the queue depths.
        """
        from clients.models import Client

        depth = F("head") - F("acked_seq")
        try:
            totals = Client.objects.aggregate(
                clients=Count("id"),
                connected=Count("id", filter=~Q(channel_name="")),
                resync=Count("id", filter=Q(resync_required=True)),
                queued=Sum(depth),
                deepest=Max(depth),
            )
        except Exception as exc:  # the database is away: the process's own metrics still go out
            logger.warning("metrics: database gauges unavailable: %r", exc)
            yield GaugeMetricFamily(
                "tabrelay_database_up", "Whether the scrape's database query worked.", 0
            )
            return
        yield GaugeMetricFamily(
            "tabrelay_database_up", "Whether the scrape's database query worked.", 1
        )
        for name, key, text in (
            ("tabrelay_clients", "clients", "Registered clients (tabs), in the database."),
            ("tabrelay_clients_connected", "connected", "Clients with a socket on any process."),
            ("tabrelay_clients_resync_required", "resync", "Clients whose queue overflowed."),
            ("tabrelay_queue_depth", "queued", "Unacked deliveries, all clients together."),
            ("tabrelay_queue_depth_max", "deepest", "Unacked deliveries of the deepest queue."),
        ):
            yield GaugeMetricFamily(name, text, totals[key] or 0)


# -- hooks of the hot path ----------------------------------------------------------------------


def delivered() -> None:
    """
    Count a delivery frame written to a socket.
    """
    process().deliveries.inc()


def resynced() -> None:
    """
    Count a resync_required error sent to a tab.
    """
    process().resyncs.inc()


def closed(code: int | None) -> None:
    """
    Count a WebSocket close by its code.
    """
    label = str(code) if code in KNOWN_CLOSE_CODES else "other"
    process().closes.labels(label).inc()


def pushed(since: float) -> None:
    """
    Observe a push handed over, `since` being its time.monotonic() at commit.
    """
    process().push_seconds.observe(time.monotonic() - since)


def sends_counted(func: F_) -> F_:
    """
    Decorate services.send_many: count what its batch stored, found stored and refused, and
    observe its time once per send.
    """

    @functools.wraps(func)
    def wrapper(requests: list, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        results = func(requests, *args, **kwargs)
        elapsed = time.perf_counter() - start
        m = process()
        stored = duplicates = 0
        for result in results:
            if isinstance(result, Exception):
                code = getattr(result, "code", None)
                m.send_refusals.labels(code if code in KNOWN_REFUSALS else "error").inc()
            elif result.duplicate:
                duplicates += 1
            else:
                stored += 1
            m.send_store_seconds.observe(elapsed)
        m.sends.inc(stored)
        m.send_duplicates.inc(duplicates)
        return results

    return wrapper  # type: ignore[return-value]


def acks_counted(per: Callable[..., int] | None = None) -> Callable[[F_], F_]:
    """
    Decorate an ack service: count `per(*args)` acks (one without it) once it returns.
    """

    def decorate(func: F_) -> F_:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = func(*args, **kwargs)
            process().acks.inc(per(*args, **kwargs) if per else 1)
            return result

        return wrapper  # type: ignore[return-value]

    return decorate


def cleanup_counted(func: F_) -> F_:
    """
    Decorate clients.cleanup.cleanup_clients: count its runs (not dry ones) and removals.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = func(*args, **kwargs)
        if not result.dry_run:
            m = process()
            m.cleanup_runs.inc()
            m.cleanup_removed.inc(result.total)
        return result

    return wrapper  # type: ignore[return-value]


# -- the endpoint -------------------------------------------------------------------------------


def allowed_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """
    MESSAGING_METRICS_ALLOWED_IPS as networks (a list, or one comma-separated string, of
    addresses or CIDR networks); ValueError names a bad entry.
    """
    raw = conf.get("MESSAGING_METRICS_ALLOWED_IPS") or []
    entries = raw.split(",") if isinstance(raw, str) else list(raw)
    return [ipaddress.ip_network(str(e).strip(), strict=False) for e in entries if str(e).strip()]


def _address_allowed(address: str, networks: list) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def _bearer(request: HttpRequest) -> str:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


def metrics_view(request: HttpRequest) -> HttpResponse:
    """
    This process's metrics in Prometheus's text format, for an allowed address and/or the
    bearer token; with neither configured, the endpoint does not exist (404).
    """
    token = str(conf.get("MESSAGING_METRICS_TOKEN") or "")
    networks = allowed_networks()
    if not token and not networks:
        raise Http404("metrics are off")
    if request.method not in ("GET", "HEAD"):
        return HttpResponseNotAllowed(["GET", "HEAD"])
    if "X-Forwarded-For" in request.headers or "X-Forwarded-Proto" in request.headers:
        # Through a proxy (nginx sets both), or a client claiming an address: under daphne's
        # --proxy-headers REMOTE_ADDR would be that claim. A scrape comes straight to daphne.
        raise Http404("metrics are scraped on daphne's own port")
    if networks and not _address_allowed(request.META.get("REMOTE_ADDR", ""), networks):
        return HttpResponse("metrics: address not allowed\n", status=403, content_type="text/plain")
    if token and not hmac.compare_digest(_bearer(request).encode(), token.encode()):
        response = HttpResponse("metrics: bearer token required\n", status=401)
        response["Content-Type"] = "text/plain"
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(process().registry), content_type=CONTENT_TYPE_LATEST)
