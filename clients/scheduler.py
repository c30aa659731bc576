"""
Periodic work inside every server process, with no extra set-up: a heartbeat (so other
processes can tell this one is alive) and, under a lease so only one process does it per
interval, the cleanup of forgotten tabs plus any jobs other apps register.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from channels.db import aclose_old_connections, database_sync_to_async

from clients import conf
from clients.cleanup import cleanup_clients
from clients.process import heartbeat, take_lease

logger = logging.getLogger(__name__)

# Extra cleanup jobs (name, function returning a short summary), e.g. messaging's history
# retention; registered from AppConfig.ready().
_jobs: list[tuple[str, Callable[[], str]]] = []


def register_job(name: str, func: Callable[[], str]) -> None:
    """
    Run `func` after each periodic cleanup (and from `manage.py cleanup_clients`).
    """
    if all(existing != name for existing, _ in _jobs):
        _jobs.append((name, func))


def extra_jobs() -> list[tuple[str, Callable[[], str]]]:
    """
    The registered extra jobs.
    """
    return list(_jobs)


def run_cleanup_if_leader() -> bool:
    """
    Run the cleanup and the extra jobs if this process takes the cleanup lease; True if it did.
    """
    interval = conf.get("CLIENTS_CLEANUP_INTERVAL")
    if not take_lease("cleanup", interval * 0.9):
        return False
    cleanup_clients()
    for name, job in _jobs:
        try:
            summary = job()
            if summary:
                logger.info("%s: %s", name, summary)
        except Exception:
            logger.exception("periodic job %s failed", name)
    return True


async def run_forever() -> None:
    """
    Beat, and clean up when due, until cancelled; database errors are logged and retried.
    """
    next_cleanup = time.monotonic() + 1.0
    while True:
        try:
            await aclose_old_connections()
            await database_sync_to_async(heartbeat)()
            interval = conf.get("CLIENTS_CLEANUP_INTERVAL")
            if interval and time.monotonic() >= next_cleanup:
                next_cleanup = time.monotonic() + interval
                await database_sync_to_async(run_cleanup_if_leader)()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("periodic heartbeat/cleanup failed; retrying")
        await asyncio.sleep(conf.get("CLIENTS_HEARTBEAT_INTERVAL"))


class BackgroundTasks:
    """
    ASGI middleware that starts `run_forever` in the server's event loop: at lifespan startup
    where the server speaks lifespan (uvicorn), else on the first connection (daphne).
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._task: asyncio.Task | None = None

    def ensure_started(self) -> None:
        """
        Start the periodic task in the running loop, once.
        """
        if not conf.get("CLIENTS_RUN_PERIODIC"):
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(run_forever())
            logger.info("periodic heartbeat and cleanup started")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.ensure_started()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self._task:
                        self._task.cancel()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.ensure_started()
        await self.app(scope, receive, send)
