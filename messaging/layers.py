"""
The channel layers: the in-memory one of a single-process deployment, without its per-message
overheads, and channels-redis with a bound on every call that is not a receive.
"""

import asyncio
import time
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer as ChannelsInMemoryChannelLayer
from channels_redis.core import RedisChannelLayer as ChannelsRedisChannelLayer


class InMemoryChannelLayer(ChannelsInMemoryChannelLayer):
    """
    Channels' in-memory layer, with three costs taken out (each measured by bench/):

    - it swept every channel and group for expired entries on every receive and group send, so
      a message to N tabs cost O(N^2) (31 % of the server's time with 200 tabs): here the sweep
      runs at most once a second; entries still expire after `expiry` seconds, give or take
      that second;
    - it built a new asyncio.Queue (and its Event) on every send and receive, and dropped a
      channel's queue whenever it ran empty, so an idle socket got a new queue per message (a
      fifth of the event loop's time in fan-out to 1,000 tabs): here a channel keeps its queue,
      and the sweep drops the empty ones nobody waits on (closed sockets');
    - it deep-copied every message: here a shallow copy (the project's handlers never change a
      message they receive).
    """

    sweep_interval = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_sweep = 0.0
        self._waiting: dict[str, int] = {}  # channel: receivers waiting on it

    def _queue(self, channel: str) -> asyncio.Queue:
        queue = self.channels.get(channel)
        if queue is None:
            queue = self.channels[channel] = asyncio.Queue(maxsize=self.get_capacity(channel))
        return queue

    async def send(self, channel: str, message: dict) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        assert "__asgi_channel__" not in message
        try:
            self._queue(channel).put_nowait((time.time() + self.expiry, dict(message)))
        except asyncio.QueueFull:
            raise ChannelFull(channel) from None

    async def receive(self, channel: str) -> dict:
        self.require_valid_channel_name(channel)
        self._clean_expired()
        queue = self._queue(channel)
        self._waiting[channel] = self._waiting.get(channel, 0) + 1
        try:
            _, message = await queue.get()
        finally:
            left = self._waiting.get(channel, 1) - 1  # (a flush may have reset the count)
            if left > 0:
                self._waiting[channel] = left
            else:
                self._waiting.pop(channel, None)
        return message

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < self.sweep_interval:
            return
        self._last_sweep = now
        super()._clean_expired()
        idle = [
            name
            for name, queue in self.channels.items()
            if queue.empty() and name not in self._waiting
        ]
        for name in idle:
            del self.channels[name]

    async def flush(self) -> None:
        await super().flush()
        self._waiting = {}


class RedisChannelLayer(ChannelsRedisChannelLayer):
    """
    channels-redis whose sends and group calls give up after `op_timeout` seconds (TimeoutError)
    instead of waiting for good on a Redis that accepts connections but does not answer. Its
    connections have no read timeout of their own (settings: with one, a cancelled receive now
    and then never ends), and a receive waits as long as it must.
    """

    def __init__(self, *args: Any, op_timeout: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.op_timeout = op_timeout

    async def send(self, channel: str, message: dict) -> None:
        async with asyncio.timeout(self.op_timeout):
            await super().send(channel, message)

    async def group_add(self, group: str, channel: str) -> None:
        async with asyncio.timeout(self.op_timeout):
            await super().group_add(group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        async with asyncio.timeout(self.op_timeout):
            await super().group_discard(group, channel)

    async def group_send(self, group: str, message: dict) -> None:
        async with asyncio.timeout(self.op_timeout):
            await super().group_send(group, message)
