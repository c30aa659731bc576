"""
What the batchers of the sockets' database writes (messaging.acks, messaging.sends) share: one
thread of the process for each kind of write, and one batcher per event loop.
"""

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
from django.db import InterfaceError, OperationalError, connection
from psycopg_pool import PoolTimeout

T = TypeVar("T")

# PostgreSQL's errors of a connection that the server dropped or lost: connection exceptions,
# and an administrator's or a crash's shutdown of the backend (a failover, a restart, a reaper).
_LOST_STATES = ("08", "57P")

# SQLite has one writer. The batchers' threads (sends, acks) took turns through SQLite's busy
# handler, which sleeps 1, 2, 5, 10, ... ms between tries whatever the holder does: a send to
# 1,000 tabs that met an ack batch took 43 ms at the median instead of 12 (2026-12-02). Between
# this process's batch writers a lock of the process hands the turn over at once.
_sqlite_writer = threading.RLock()


@contextlib.contextmanager
def one_writer() -> Iterator[None]:
    """
    Around a batch's transaction (outside it): on SQLite, this process's batch writes take turns
    on a lock of their own. Other writers (HTTP, other processes) still meet SQLite's busy handler.
    """
    if connection.vendor != "sqlite":
        yield
        return
    with _sqlite_writer:
        yield


@functools.cache
def one_thread(name: str) -> concurrent.futures.ThreadPoolExecutor:
    """
    The process's thread for the writes called `name` (shared by every event loop's batcher:
    tests run many loops).
    """
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)


_by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, Any]]" = (
    weakref.WeakKeyDictionary()
)


def made_on_this_loop(kind: Callable[[Any], T]) -> T | None:
    """
    The running event loop's batcher of this kind if it has one.
    """
    return _by_loop.get(asyncio.get_running_loop(), {}).get(kind)


def of_this_loop(kind: Callable[[Any], T], run_db: Any) -> T:
    """
    The running event loop's batcher of this kind (one per server process), made on first use
    with `run_db`, how it runs a database call off the loop given a thread.
    """
    batchers = _by_loop.setdefault(asyncio.get_running_loop(), {})
    found = batchers.get(kind)
    if found is None:
        found = batchers[kind] = kind(run_db)
    return found


def connection_lost(exc: object) -> bool:
    """
    Whether `exc` (what a batch got) says that the database dropped the connection: the batch
    may succeed at once on another one (the pool replaces connections made before). Not a pool
    that had none to give in time: with the database unreachable a retry would wait as long.
    """
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    cause = exc.__cause__
    if not isinstance(cause, psycopg.Error) or isinstance(cause, PoolTimeout):
        return False
    # A client-side error (no SQLSTATE) is one about the connection itself: closed, reset, lost.
    return cause.sqlstate is None or cause.sqlstate.startswith(_LOST_STATES)
