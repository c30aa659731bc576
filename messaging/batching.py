"""
What the batchers of the sockets' database writes (messaging.acks, messaging.sends) share: one
thread of the process for each kind of write, and one batcher per event loop.
"""

import asyncio
import concurrent.futures
import functools
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


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
