"""
The send rate limits: a token bucket per client (MESSAGING_SEND_RATE / MESSAGING_SEND_BURST)
and one per user (MESSAGING_USER_SEND_RATE / MESSAGING_USER_SEND_BURST), so that a user's
tabs share one allowance instead of multiplying it.

With MESSAGING_RATE_REDIS_URL (set from REDIS_URL) the buckets live in Redis and hold across
server processes: one Lua script per batch of sends refills and takes atomically, on Redis's
clock. Without it (one process, the in-memory default) they live in this process. A send takes
a token from both of its buckets or from neither.
"""

import logging
import threading
import time
import uuid
from typing import Any

from messaging import conf

logger = logging.getLogger(__name__)

# A Redis that does not answer costs a batch of sends at most REDIS_TIMEOUT seconds (all the
# sends of a process wait on one thread), and then REDIS_BACKOFF seconds of this process's own
# buckets before Redis is tried again: not the timeout again on every batch.
REDIS_TIMEOUT = 0.5
REDIS_BACKOFF = 5.0

# KEYS: the client bucket and the user bucket of each send, in pairs. ARGV: client rate, client
# burst, user rate, user burst (a rate of 0: no such bucket). A bucket is a hash {t: tokens,
# a: when}; it expires once it would be full again anyway. Returns 1 (taken) or 0 per send.
_TAKE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local out = {}
for i = 1, #KEYS, 2 do
  local levels, ok = {}, 1
  for j = 0, 1 do
    local rate, burst = tonumber(ARGV[1 + 2 * j]), tonumber(ARGV[2 + 2 * j])
    if rate > 0 then
      local state = redis.call('HMGET', KEYS[i + j], 't', 'a')
      local tokens = tonumber(state[1])
      if tokens then
        tokens = math.min(burst, tokens + math.max(0, now - tonumber(state[2])) * rate)
      else
        tokens = burst
      end
      levels[j] = tokens
      if tokens < 1 then ok = 0 end
    end
  end
  if ok == 1 then
    for j = 0, 1 do
      if levels[j] then
        local rate, burst = tonumber(ARGV[1 + 2 * j]), tonumber(ARGV[2 + 2 * j])
        redis.call('HSET', KEYS[i + j], 't', tostring(levels[j] - 1), 'a', tostring(now))
        redis.call('EXPIRE', KEYS[i + j], math.ceil(burst / rate) + 1)
      end
    end
  end
  out[#out + 1] = ok
end
return out
"""


def _limits() -> tuple[float, float, float, float]:
    # (client rate, client burst, user rate, user burst); a rate of 0 turns that bucket off.
    def pair(rate_name: str, burst_name: str) -> tuple[float, float]:
        rate = conf.get(rate_name)
        return (0.0, 0.0) if rate is None else (float(rate), float(conf.get(burst_name)))

    return (
        *pair("MESSAGING_SEND_RATE", "MESSAGING_SEND_BURST"),
        *pair("MESSAGING_USER_SEND_RATE", "MESSAGING_USER_SEND_BURST"),
    )


class SendRate:
    """
    The send buckets of every client and user, in Redis or in this process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[tuple, tuple[float, float]] = {}
        self._redis: dict[str, tuple[Any, Any]] = {}  # Redis URL -> (client, its script)
        self._epoch = "0"  # part of every Redis key; reset() starts afresh
        self._written: set[tuple[str, str]] = set()  # (URL, key prefix) used since reset()
        self._redis_failed_at = -REDIS_BACKOFF  # monotonic time of the last Redis failure

    def take(self, client_id: object, user_id: object) -> bool:
        """
        Take a token for one send of this client of this user.
        """
        return self.take_many([(client_id, user_id)])[0]

    def take_many(self, sends: list[tuple[object, object]]) -> list[bool]:
        """
        Take a token for each (client id, user id) send, in order: whether each may go.
        """
        limits = _limits()
        if not sends or not (limits[0] or limits[2]):
            return [True] * len(sends)
        url = conf.get("MESSAGING_RATE_REDIS_URL")
        if url and time.monotonic() - self._redis_failed_at >= REDIS_BACKOFF:
            try:
                return self._take_redis(url, sends, limits)
            except Exception as exc:
                # Redis is away: this process's buckets still bound the sends it takes.
                logger.warning(
                    "send rate limits per process for %.0f s, Redis failed: %r", REDIS_BACKOFF, exc
                )
                self._redis_failed_at = time.monotonic()
        return self._take_local(sends, limits)

    def _take_redis(self, url: str, sends: list, limits: tuple) -> list[bool]:
        if url not in self._redis:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            client = redis.Redis.from_url(
                url,
                socket_timeout=REDIS_TIMEOUT,
                socket_connect_timeout=REDIS_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
            )
            self._redis.setdefault(url, (client, client.register_script(_TAKE)))
        script = self._redis[url][1]
        prefix = f"{conf.get('MESSAGING_RATE_REDIS_PREFIX')}:rate:{self._epoch}"
        self._written.add((url, prefix))
        keys = [k for c, u in sends for k in (f"{prefix}:c:{c}", f"{prefix}:u:{u}")]
        return [bool(ok) for ok in script(keys=keys, args=[repr(x) for x in limits])]

    def _take_local(self, sends: list, limits: tuple) -> list[bool]:
        now = time.monotonic()
        results = []
        with self._lock:
            for client_id, user_id in sends:
                buckets = []
                for key, rate, burst in (
                    (("c", client_id), limits[0], limits[1]),
                    (("u", user_id), limits[2], limits[3]),
                ):
                    if rate:
                        tokens, last = self._buckets.get(key, (burst, now))
                        buckets.append((key, min(burst, tokens + (now - last) * rate)))
                ok = all(tokens >= 1 for _, tokens in buckets)
                for key, tokens in buckets:
                    self._buckets[key] = (tokens - 1 if ok else tokens, now)
                results.append(ok)
            if len(self._buckets) > 50_000:
                self._prune(now, limits)
        return results

    def _prune(self, now: float, limits: tuple) -> None:
        # A bucket idle long enough to be full again is the same as no bucket.
        refill = max(b / r for r, b in (limits[:2], limits[2:]) if r)
        idle = [k for k, (_, last) in self._buckets.items() if now - last > refill]
        for key in idle:
            del self._buckets[key]

    def reset(self) -> None:
        """
        Forget every bucket (tests): this process's, and the ones it wrote to Redis.
        """
        with self._lock:
            self._buckets.clear()
            self._epoch = uuid.uuid4().hex[:12]
            written, self._written = self._written, set()
        for url, prefix in written:
            client = self._redis[url][0]
            try:
                for key in client.scan_iter(f"{prefix}:*"):
                    client.delete(key)
            except Exception as exc:
                logger.warning("could not delete send buckets in Redis: %r", exc)


send_rate = SendRate()
