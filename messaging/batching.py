"""
What the batchers of the sockets' database writes (messaging.acks, messaging.sends) share: one
thread of the process for each kind of write, and one batcher per event loop.
"""

import asyncio
import concurrent.futures
import functools
import weakref
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


@functools.cache
def one_thread(name: str) -> concurrent.futures.ThreadPoolExecutor:
    """
    The process's thread for the writes called `name` (shared by every event loop's batcher:
    tests run many loops).
    """
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)


def of_this_loop(
    registry: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T]", make: Callable[[], T]
) -> T:
    """
    The running event loop's object in `registry` (one per server process), made on first use.
    """
    loop = asyncio.get_running_loop()
    found = registry.get(loop)
    if found is None:
        found = registry[loop] = make()
    return found
