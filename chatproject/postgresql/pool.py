"""
A psycopg_pool pool whose checkout discards broken connections without sleeping.

psycopg_pool checks a connection on checkout (Django passes `check` with CONN_HEALTH_CHECKS) and,
when several in a row fail it, sleeps between them with its reconnection backoff (0, 1, 2, 4 s).
After the database server drops every connection (a failover, a restart, an idle-connection
reaper) the pool holds only broken ones, and the first thread to ask for one sleeps through
them: on a server, the one thread that stores every socket's sends. Here the check runs in
`getconn`: a broken connection is closed and the next one tried at once; and the first broken
connection met, on checkout or returned broken, has every connection made before it replaced
(the pool opens the new ones in the background), since they usually broke together.
"""

import logging
import math
import threading
from collections.abc import Callable
from time import monotonic
from typing import Any

import psycopg_pool

logger = logging.getLogger(__name__)

# The pool's connections are replaced at most this often: once covers every connection that
# one failover broke, however many of them are met afterwards.
REPLACE_EVERY = 1.0


class ConnectionPool(psycopg_pool.ConnectionPool):
    """
    psycopg_pool.ConnectionPool with the `check` callback applied by `getconn` itself: a
    connection that fails it is discarded at once, never slept on.
    """

    def __init__(self, *args: Any, check: Callable[[Any], None] | None = None, **kwargs: Any):
        # The base pool gets no check: its own loop over failed checks is the one that sleeps.
        super().__init__(*args, **kwargs)
        self._checkout_check = check
        self._replacing = threading.Lock()
        self._replaced_at = -math.inf

    def getconn(self, timeout: float | None = None) -> Any:
        """
        A connection that passed the check, within `timeout` (the pool's by default); broken
        ones met on the way are discarded.
        """
        deadline = monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            conn = super().getconn(deadline - monotonic())
            if self._checkout_check is None:
                return conn
            try:
                self._checkout_check(conn)
            except Exception as exc:
                logger.warning("discarding a broken pooled connection: %s", exc)
                conn.close()  # so that the pool drops it on return, and opens another
                self.putconn(conn)
                self.replace_older()
                continue
            return conn

    def putconn(self, conn: Any) -> None:
        """
        Take a connection back; one that broke while in use has the others replaced too.
        """
        broken = conn.broken
        super().putconn(conn)
        if broken:
            self.replace_older()

    def replace_older(self) -> None:
        """
        Replace every connection made until now: the idle ones at once, the ones in use when
        they come back (psycopg_pool's drain); at most once per REPLACE_EVERY.
        """
        with self._replacing:
            now = monotonic()
            if now < self._replaced_at + REPLACE_EVERY:
                return
            self._replaced_at = now
        logger.warning("a pooled database connection broke: replacing the pool's connections")
        self.drain()
