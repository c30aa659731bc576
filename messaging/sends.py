"""
Sends from every socket of a process, stored together.

A send's transaction is short in the database but long in the server: each of its statements
gives up the interpreter's lock and waits for it again while the event loop is busy pushing
frames, and SQLite has one writer. At 200 tabs in one room a send held the write lock for 15-20
ms (measured), so sends were stored one after the other at about 50 a second, whatever else
was idle. Here the sends that arrive while a batch is being stored form the next batch, and
services.send_many stores the sends to one target in one transaction: under light load a send
is stored at once, alone; under heavy load dozens share the locks, the statements and the commit.

The batches run on a thread of their own (like acks), in arrival order, so a socket's sends
keep their order, and the sends of one room keep theirs in every tab.
"""

import asyncio
import logging
from typing import Any

from clients import push
from messaging import batching, services

logger = logging.getLogger(__name__)

# Sends per batch: a bound on a transaction's size and on the statements' parameter lists.
BATCH = 100


class SendBatcher:
    """
    Collects validated sends (services.SendRequest) and stores them with services.send_many,
    one batch at a time.
    """

    def __init__(self, run_db: Any) -> None:
        self._run_db = run_db  # how a database call is run off the event loop, given a thread
        self._pending: list[tuple[services.SendRequest, asyncio.Future]] = []
        self._writing = False
        self._task: asyncio.Task | None = None
        self.storing = False  # a batch is in the database now

    def submit(self, request: services.SendRequest) -> asyncio.Future:
        """
        Store a send; the future settles with its SendResult, or with the error it got.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((request, future))
        if not self._writing:
            self._writing = True
            self._task = loop.create_task(self._write())
        return future

    async def _store(
        self, requests: list[services.SendRequest]
    ) -> list[services.SendResult | Exception]:
        results = await self._store_once(requests)
        # The sends that met a connection the database had dropped (a failover, a restart) are
        # stored once more at once, on the pool's next connection. Each target's sends share a
        # transaction, so such a send was rolled back with its transaction, or committed just
        # before the connection broke: the retry then finds it by client_msg_id and answers it
        # as a duplicate, storing nothing twice. The others (stored, refused) are not repeated.
        lost = [i for i, r in enumerate(results) if batching.connection_lost(r)]
        if lost:
            logger.warning("%d send(s) met a dropped database connection; retrying", len(lost))
            again = await self._store_once([requests[i] for i in lost])
            for i, result in zip(lost, again, strict=True):
                results[i] = result
        return results

    async def _store_once(
        self, requests: list[services.SendRequest]
    ) -> list[services.SendResult | Exception]:
        try:
            return await self._run_db(services.send_many, batching.one_thread("sends"))(requests)
        except Exception as exc:  # e.g. the database went away: every send fails
            return [exc] * len(requests)

    async def _write(self) -> None:
        batch: list[tuple[services.SendRequest, asyncio.Future]] = []
        done = False
        try:
            while self._pending:
                # Stored no faster than this process's sockets get them (clients.push).
                await push.caught_up()
                batch, self._pending = self._pending[:BATCH], self._pending[BATCH:]
                self.storing = True
                try:
                    results = await self._store([request for request, _ in batch])
                finally:
                    self.storing = False
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue  # its socket went away meanwhile
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                batch = []
            done = True
        finally:
            self._writing = False
            if not done:
                # Whatever ended this early (a cancellation at shutdown, a bug): no socket
                # waits for its send for good; the tab's outbox retries.
                left, self._pending = batch + self._pending, []
                for _, future in left:
                    if not future.done():
                        future.set_exception(RuntimeError("the send was not stored; retry"))
