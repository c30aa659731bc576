"""
Per-socket bounds on the frames that cost the server without storing anything: typing (relayed
to every socket of every other member) and ping (a database read each).

A frame over its bound is dropped; the first one dropped after an accepted one is answered with
a `rate_limited` error frame, the rest silently, so a flood gets no flood of errors back.
"""

from messaging import conf

# Distinct rooms whose typing frames one socket may have relayed within one interval: a socket
# naming a new room in every frame would otherwise cost a database read per frame.
TYPING_ROOMS = 8


class Bucket:
    """
    A token bucket on event-loop time: `rate` tokens a second, at most `burst`.
    """

    def __init__(self) -> None:
        self.tokens = -1.0  # full on first use
        self.at = 0.0
        self.warned = False

    def take(self, now: float, rate: float, burst: float) -> bool:
        """
        Take a token if there is one.
        """
        if self.tokens < 0:
            self.tokens = burst
        else:
            self.tokens = min(burst, self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class SocketThrottle:
    """
    The typing and ping bounds of one socket (MESSAGING_TYPING_INTERVAL, MESSAGING_PING_RATE /
    MESSAGING_PING_BURST, read at each frame).
    """

    def __init__(self) -> None:
        self.ping = Bucket()
        self.typing_at: dict[str, float] = {}  # room name as sent -> when last relayed
        self.typing_warned = False

    def allow_ping(self, now: float) -> bool | None:
        """
        True: answer the ping. False: refuse it with an error frame. None: drop it silently.
        """
        rate = conf.get("MESSAGING_PING_RATE")
        if rate is None:
            return True
        if self.ping.take(now, float(rate), float(conf.get("MESSAGING_PING_BURST"))):
            self.ping.warned = False
            return True
        if self.ping.warned:
            return None
        self.ping.warned = True
        return False

    def allow_typing(self, room: object, now: float) -> bool | None:
        """
        True: relay the typing frame. False: refuse it with an error frame. None: drop it
        silently. A room that is not a string is left to validation (a malformed error).
        """
        interval = conf.get("MESSAGING_TYPING_INTERVAL")
        if interval is None or not isinstance(room, str):
            return True
        recent = {r: t for r, t in self.typing_at.items() if now - t < interval}
        self.typing_at = recent
        if room not in recent and len(recent) < TYPING_ROOMS:
            recent[room] = now
            self.typing_warned = False
            return True
        if self.typing_warned:
            return None
        self.typing_warned = True
        return False
