"""manage.py cleanup_clients: forget tabs that vanished, by hand (the server also does it)."""

import re
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from clients import conf
from clients.cleanup import cleanup_clients
from clients.scheduler import extra_jobs

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """
    Parse "90", "90s", "15m", "2h" or "7d" into seconds.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * UNITS[match.group(2) or "s"]


class Command(BaseCommand):
    """
    Delete stale clients and closing clients past their grace period, with their queues.
    """

    help = (
        "Delete clients (tabs) with no connection and no activity for longer than the stale "
        "timeout (CLIENTS_STALE_AFTER), and clients marked closing that did not come back within "
        "CLIENTS_CLOSE_GRACE, together with their queued deliveries. Sockets held by server "
        "processes that stopped heart-beating are marked disconnected first. Connected clients "
        "are never deleted. Then runs the other registered cleanup jobs (message history "
        "retention). The running server does this by itself every CLIENTS_CLEANUP_INTERVAL."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Report what would be deleted without deleting anything.",
        )
        parser.add_argument(
            "--older-than",
            metavar="DURATION",
            help="Stale timeout for this run instead of CLIENTS_STALE_AFTER, e.g. 3600, 30m, 2h, "
            "7d.",
        )
        parser.add_argument(
            "--skip-jobs",
            action="store_true",
            help="Only clean up clients; skip the other registered jobs.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        stale_after = None
        if options["older_than"] is not None:
            try:
                stale_after = duration(options["older_than"])
            except ValueError:
                raise CommandError(
                    f"--older-than: {options['older_than']!r} is not a duration like 3600, 30m, "
                    "2h or 7d"
                ) from None
        dry = options["dry_run"]
        result = cleanup_clients(stale_after=stale_after, dry_run=dry)
        verb = "Would remove" if dry else "Removed"
        threshold = stale_after if stale_after is not None else conf.get("CLIENTS_STALE_AFTER")
        self.stdout.write(
            f"{verb} {result.total} client(s): {len(result.stale)} stale (no activity for "
            f"{threshold:g}s), {len(result.closed)} closed (grace "
            f"{conf.get('CLIENTS_CLOSE_GRACE'):g}s), with {result.deliveries} queued "
            "deliveries."
        )
        if result.dead_processes:
            self.stdout.write(
                f"{'Would mark' if dry else 'Marked'} {result.healed} socket(s) of "
                f"{len(result.dead_processes)} dead server process(es) disconnected: "
                + ", ".join(result.dead_processes)
            )
        if options["verbosity"] >= 2:
            for label, ids in (("stale", result.stale), ("closed", result.closed)):
                for client_id in ids:
                    self.stdout.write(f"  {label} {client_id}")
        if not options["skip_jobs"] and not dry:
            for name, job in extra_jobs():
                self.stdout.write(f"{name}: {job() or 'nothing to do'}")
