"""
The operator's overview in the admin (admin/overview/): the numbers that matter now and the
last hour's messages per minute, drawn as inline SVG on the server.

Every number is a bounded query at page load: aggregates over the clients, the ten longest
queues, and the last hour's messages read through the primary key (at most HOUR_SCAN_MAX rows).
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.contrib.admin import site
from django.core.exceptions import PermissionDenied
from django.db.models import Count, F, Max, Q
from django.db.models.functions import TruncMinute
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone

from clients import conf as clients_conf
from clients.models import Client, ServerProcess
from messaging.models import Message

# The last hour's messages are counted among the newest this many (by id): a page load stays
# bounded however busy the hour was; past it the page says "at least".
HOUR_SCAN_MAX = 200_000
LONGEST_QUEUES = 10
CHART_WIDTH, CHART_HEIGHT, MINUTES = 600, 120, 60


@dataclass
class ProcessRow:
    """
    A server process (or a `server` value no process row names) and the tabs it holds.
    """

    id: str
    hostname: str = ""
    pid: int = 0
    heartbeat_at: datetime | None = None
    alive: bool = False
    sockets: int = 0


@dataclass
class Chart:
    """
    Stacked bars of room and direct messages per minute, with their SVG geometry.
    """

    bars: list[dict] = field(default_factory=list)
    peak: int = 0
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT


def processes(now: datetime) -> list[ProcessRow]:
    """
    Every heart-beating process with its connected tabs, and any `server` without a row.
    """
    timeout = timedelta(seconds=clients_conf.get("CLIENTS_PROCESS_TIMEOUT"))
    counts = dict(
        Client.objects.connected().values_list("server").annotate(n=Count("id")).order_by()
    )
    rows = [
        ProcessRow(
            p.id,
            p.hostname,
            p.pid,
            p.heartbeat_at,
            now - p.heartbeat_at < timeout,
            counts.pop(p.id, 0),
        )
        for p in ServerProcess.objects.order_by("started_at", "id")
    ]
    rows.extend(ProcessRow(server or "(none)", sockets=n) for server, n in sorted(counts.items()))
    return rows


def client_states(now: datetime) -> dict[str, int]:
    """
    Clients by state: connected, closing (beacon sent, in or past its grace), stale (the next
    cleanup removes them) and idle (the rest: disconnected, kept for their return).
    """
    stale_cutoff = now - timedelta(seconds=clients_conf.get("CLIENTS_STALE_AFTER"))
    away = Q(channel_name="")
    totals = Client.objects.aggregate(
        total=Count("id"),
        connected=Count("id", filter=~away),
        closing=Count("id", filter=away & Q(closing_at__isnull=False)),
        stale=Count("id", filter=away & Q(closing_at__isnull=True, last_seen_at__lt=stale_cutoff)),
        resync=Count("id", filter=Q(resync_required=True)),
        seen=Count("id", filter=Q(last_seen_at__gte=now - timedelta(hours=1))),
    )
    totals["idle"] = totals["total"] - totals["connected"] - totals["closing"] - totals["stale"]
    return totals


def longest_queues() -> list[Client]:
    """
    The clients with the most unacked deliveries (with a `depth` attribute).
    """
    return list(
        Client.objects.annotate(depth=F("head") - F("acked_seq"))
        .filter(depth__gt=0)
        .select_related("user")
        .order_by("-depth", "id")[:LONGEST_QUEUES]
    )


def last_hour(now: datetime) -> tuple[list[tuple[datetime, int, int]], bool]:
    """
    (minute, room messages, direct messages) for each of the last 60 minutes, oldest first, and
    whether HOUR_SCAN_MAX cut the count short.
    """
    start = (now - timedelta(minutes=MINUTES - 1)).replace(second=0, microsecond=0)
    newest = Message.objects.aggregate(top=Max("id"))["top"] or 0
    floor = newest - HOUR_SCAN_MAX
    rows = (
        Message.objects.filter(id__gt=floor, created_at__gte=start)
        .annotate(minute=TruncMinute("created_at"))
        .values("minute")
        .annotate(rooms=Count("id", filter=Q(room__isnull=False)), total=Count("id"))
        .order_by("minute")
    )
    by_minute = {r["minute"]: (r["rooms"], r["total"] - r["rooms"]) for r in rows}
    below = Message.objects.filter(id__lte=floor).order_by("-id").values_list("created_at")[:1]
    capped = floor > 0 and any(created >= start for (created,) in below)
    minutes = [start + timedelta(minutes=i) for i in range(MINUTES)]
    return [(m, *by_minute.get(m, (0, 0))) for m in minutes], capped


def chart(series: list[tuple[datetime, int, int]]) -> Chart:
    """
    The SVG geometry of stacked bars (room below, direct above) for a per-minute series.
    """
    peak = max((rooms + direct for _, rooms, direct in series), default=0)
    result = Chart(peak=peak)
    slot = CHART_WIDTH / max(len(series), 1)
    scale = (CHART_HEIGHT - 4) / peak if peak else 0.0
    for i, (minute, rooms, direct) in enumerate(series):
        room_h, direct_h = rooms * scale, direct * scale
        result.bars.append(
            {
                "x": round(i * slot + 1, 1),
                "w": round(slot - 2, 1),
                "room_y": round(CHART_HEIGHT - room_h, 1),
                "room_h": round(room_h, 1),
                "direct_y": round(CHART_HEIGHT - room_h - direct_h, 1),
                "direct_h": round(direct_h, 1),
                "label": f"{minute:%H:%M} UTC: {rooms} in rooms, {direct} direct",
            }
        )
    return result


def overview_view(request: HttpRequest) -> HttpResponse:
    """
    The overview page, for staff who may view clients (superusers may).
    """
    if not request.user.has_perm("clients.view_client"):
        raise PermissionDenied("viewing clients is needed for the overview")
    now = timezone.now()
    series, capped = last_hour(now)
    context: dict[str, Any] = {
        **site.each_context(request),
        "title": "Overview",
        "now": now,
        "processes": processes(now),
        "states": client_states(now),
        "queues": longest_queues(),
        "messages_last_hour": sum(rooms + direct for _, rooms, direct in series),
        "capped": capped,
        "chart": chart(series),
        "first_minute": series[0][0],
    }
    return TemplateResponse(request, "admin/overview.html", context)
