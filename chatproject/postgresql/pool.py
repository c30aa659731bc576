"""
A psycopg_pool pool whose checkout discards broken connections without sleeping.

psycopg_pool checks a connection on checkout (Django passes `check` with CONN_HEALTH_CHECKS) and,
when several in a row fail it, sleeps between them with its reconnection backoff (0, 1, 2, 4 s).
After the database server drops every connection (a failover, a restart, an idle-connection
reaper) the pool holds only broken ones, and the first thread to ask for one sleeps through
them: on a server, the one thread that stores every socket's sends. Here the check runs in
`getconn`: a broken connection is closed and the next one tried at once; and the first broken
connection met, on checkout or returned broken, has every connection made before it replaced
(the pool opens the new ones in the background), since they usually broke together. Until a
connection passes its check again, a checkout waits for one for `failover_timeout` at most.
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

    def __init__(
        self,
        *args: Any,
        check: Callable[[Any], None] | None = None,
        failover_timeout: float = 2.0,
        **kwargs: Any,
    ):
        # The base pool gets no check: its own loop over failed checks is the one that sleeps.
        super().__init__(*args, **kwargs)
        self._checkout_check = check
        # While the pool's connections are known to be broken (from the last one that broke
        # until one passes its check), a checkout waits at most this long for a new one: with
        # the database unreachable, callers get their error (an `unavailable` frame, a 503)
        # then, not after the pool's whole timeout.
        self.failover_timeout = failover_timeout
        self._broken = False
        self._replacing = threading.Lock()
        self._replaced_at = -math.inf

    def getconn(self, timeout: float | None = None) -> Any:
        """
        A connection that passed the check, within `timeout` (the pool's by default; at most
        `failover_timeout` while its connections are broken); broken ones met are discarded.
        """
        deadline = monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            wait = deadline - monotonic()
            conn = super().getconn(min(wait, self.failover_timeout) if self._broken else wait)
            if self._checkout_check is None:
                self._broken = False  # nothing better to go by
                return conn
            try:
                self._checkout_check(conn)
            except Exception as exc:
                logger.warning("discarding a broken pooled connection: %s", exc)
                conn.close()  # so that the pool drops it on return, and opens another
                self.putconn(conn)
                self.replace_older()
                continue
            self._broken = False
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
        self._broken = True
        with self._replacing:
            now = monotonic()
            if now < self._replaced_at + REPLACE_EVERY:
                return
            self._replaced_at = now
        logger.warning("a pooled database connection broke: replacing the pool's connections")
        self.drain()
