"""
Acks from every socket of a process, written together.

Each tab acks what it processed (cumulatively, every few deliveries). One transaction per ack
made acks the largest share of the server's work under load (200 tabs in one room: 42 % of its
time, most of it waiting for SQLite's write lock), and they fell behind the deliveries. Here a
socket's ack joins the batch being collected while the previous one is written: under light load
an ack is written at once, alone; under heavy load hundreds go in one transaction.

The batches run on a thread of their own: in the shared pool they queued behind every send
waiting there (200 senders: 200 send transactions ahead of each batch), and acks fell behind
the deliveries by tens of thousands under load. A socket does not wait for its ack to be
written either (see the consumer's _on_ack).
"""

import asyncio
import uuid
from typing import Any

from clients import push
from messaging import batching, sends, services

# Clients per transaction: a bound on the statement's size (SQLite parses a chain of ORs as a
# tree at most 1,000 deep).
BATCH = 200
RETRY_AFTER = 0.2  # seconds before a failed batch is written once more
# Sends go first: a batch of acks waits while a send is being stored or its pokes handed over,
# for at most SENDS_FIRST_MAX seconds (checked every SENDS_FIRST_POLL). An ack only frees queue
# rows; a send is what a tab waits for. The ack thread's batches took the process's share of
# the interpreter and SQLite's lock from the send behind them (fan-out to 1,000 tabs: the
# previous message's 1,000 acks are written while the next send is stored and handed over).
# Under a steady flow of sends every batch waits the whole SENDS_FIRST_MAX (the send batcher is
# always storing): acks are written up to 0.1 s later, and a `ping` behind an ack waits as long.
SENDS_FIRST_MAX = 0.1
SENDS_FIRST_POLL = 0.005


class AckBatcher:
    """
    Collects (client id, seq) acks and writes them with services.ack_many, one batch at a time.
    """

    def __init__(self, run_db: Any) -> None:
        self._run_db = run_db  # how a database call is run off the event loop, given a thread
        self._pending: dict[uuid.UUID, tuple[int, list[asyncio.Future]]] = {}
        self._writing = False
        self._task: asyncio.Task | None = None

    def submit(self, client_id: uuid.UUID, seq: int) -> asyncio.Future:
        """
        Ack `seq` for the client; the future settles once it is written (with what the write
        raised, if it failed).
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        best, waiters = self._pending.get(client_id, (0, []))
        waiters.append(future)
        self._pending[client_id] = (max(best, seq), waiters)
        if not self._writing:
            self._writing = True
            self._task = loop.create_task(self._write())
        return future

    async def _write(self) -> None:
        try:
            while self._pending:
                await _after_sends()
                ids = list(self._pending)[:BATCH]
                batch = {cid: self._pending.pop(cid) for cid in ids}
                acks = {cid: seq for cid, (seq, _) in batch.items()}
                try:
                    try:
                        await self._run_db(services.ack_many, batching.one_thread("acks"))(acks)
                    except Exception as exc:
                        # One failure would fail every socket's ack in the batch, and a tab need
                        # not repeat an ack: retry once (acks are cumulative; one transaction).
                        # After a dropped connection at once, on the pool's next connection;
                        # after anything else (a lock timeout) a moment later.
                        if not batching.connection_lost(exc):
                            await asyncio.sleep(RETRY_AFTER)
                        await self._run_db(services.ack_many, batching.one_thread("acks"))(acks)
                except Exception as exc:
                    self._settle(batch, exc)
                else:
                    self._settle(batch, None)
        finally:
            self._writing = False

    @staticmethod
    def _settle(batch: dict, error: Exception | None) -> None:
        for _, waiters in batch.values():
            for future in waiters:
                if future.done():
                    continue  # its socket went away meanwhile
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)


async def _after_sends() -> None:
    # See SENDS_FIRST_MAX.
    loop = asyncio.get_running_loop()
    until = loop.time() + SENDS_FIRST_MAX
    while loop.time() < until:
        sender = batching.made_on_this_loop(sends.SendBatcher)
        if not ((sender is not None and sender.storing) or push.handing_over()):
            return
        await asyncio.sleep(SENDS_FIRST_POLL)
