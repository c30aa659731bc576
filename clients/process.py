"""
This server process: its identity, its heartbeat, and leases that pick one process for a job.
"""

import os
import socket
import uuid
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from clients.models import Lease, ServerProcess

# This process's identity in ServerProcess and Client.server.
PROCESS_ID = f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def heartbeat(now: datetime | None = None) -> None:
    """
    Record that this process is alive (creating its row on the first beat).
    """
    now = now or timezone.now()
    updated = ServerProcess.objects.filter(pk=PROCESS_ID).update(heartbeat_at=now)
    if not updated:
        ServerProcess.objects.update_or_create(
            pk=PROCESS_ID,
            defaults={
                "hostname": socket.gethostname()[:255],
                "pid": os.getpid(),
                "heartbeat_at": now,
            },
        )


def take_lease(name: str, seconds: float, now: datetime | None = None) -> bool:
    """
    Take the lease `name` for `seconds` if it is free or expired; True if this process has it.
    """
    now = now or timezone.now()
    until = now + timedelta(seconds=seconds)
    if Lease.objects.filter(name=name, expires_at__lte=now).update(
        holder=PROCESS_ID, expires_at=until
    ):
        return True
    if Lease.objects.filter(name=name).exists():
        return False
    try:
        with transaction.atomic():
            Lease.objects.create(name=name, holder=PROCESS_ID, expires_at=until)
    except IntegrityError:
        return False
    return True
