"""
A stuck test fails in minutes with what it was waiting on, not at CI's limit with nothing.

pytest-timeout (`timeout` in pyproject.toml, thread method) ends a test that runs too long and
prints every thread's stack. A stuck event loop's threads all look idle, though: what matters
is which asyncio task does not end. Shortly before pytest-timeout fires, this plugin prints
every live event loop's tasks with their await chains. The dump runs in the loop's own thread
(through `call_soon_threadsafe`, which wakes a loop idle in epoll): a Python signal handler may
never run while the main thread sits there.
"""

import asyncio
import sys
import threading
import time
import weakref

import pytest

# Seconds before pytest-timeout's own deadline at which the tasks are printed.
DUMP_AHEAD = 20.0

_loops: "weakref.WeakSet[asyncio.AbstractEventLoop]" = weakref.WeakSet()
_original_init = asyncio.BaseEventLoop.__init__


def _recording_init(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    _loops.add(self)


# Every event loop made in the test process is recorded (weakly) by patching the base class:
# acceptable in a test run, where loops come from pytest-asyncio, asyncio.run and libraries alike.
asyncio.BaseEventLoop.__init__ = _recording_init  # type: ignore[method-assign]


def await_chain(task: asyncio.Task) -> list[str]:
    """
    The frames a task is suspended in, outermost first, down to what it awaits.
    """
    lines = []
    coro = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            lines.append(f"awaiting {coro!r:.300}")
            break
        lines.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        nxt = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        if nxt is not None and not hasattr(nxt, "cr_frame") and not hasattr(nxt, "gi_frame"):
            lines.append(f"awaiting {nxt!r:.300}")
            break
        coro = nxt
    return lines


def describe_tasks(loop: asyncio.AbstractEventLoop) -> str:
    """
    Every task of `loop` with its await chain; call in the loop's thread.
    """
    out = [f"event loop {loop!r}:"]
    for task in asyncio.all_tasks(loop):
        out.append(f"  {task!r:.300}")
        out.extend(f"      {line}" for line in await_chain(task))
    return "\n".join(out)


class _Watch:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.deadline: float | None = None
        self.nodeid = ""
        self.lock = threading.Lock()
        threading.Thread(target=self._run, name="hang-watch", daemon=True).start()

    def arm(self, nodeid: str, seconds: float) -> None:
        with self.lock:
            self.nodeid, self.deadline = nodeid, time.monotonic() + seconds

    def disarm(self) -> None:
        with self.lock:
            self.deadline = None

    def _run(self) -> None:
        while True:
            time.sleep(1.0)
            with self.lock:
                due = self.deadline is not None and time.monotonic() >= self.deadline
                if due:
                    self.deadline = None
                nodeid = self.nodeid
            if due:
                self._dump(nodeid)

    def _dump(self, nodeid: str) -> None:
        texts = []
        for loop in list(_loops):
            if loop.is_closed():
                continue
            done = threading.Event()
            box: list[str] = []

            def collect(loop=loop, box=box, done=done):
                box.append(describe_tasks(loop))
                done.set()

            try:
                loop.call_soon_threadsafe(collect)
            except RuntimeError:
                continue
            if not done.wait(5.0):
                box.append(f"event loop {loop!r}: did not answer within 5 s (busy or not running)")
            texts.extend(box)
        capman = self.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            capman.suspend_global_capture(in_=True)
        sys.stderr.write(
            f"\n{'=' * 20} {nodeid} is taking too long: asyncio tasks {'=' * 20}\n"
            + ("\n".join(texts) or "no live event loop")
            + "\n"
        )
        sys.stderr.flush()
        if capman is not None:
            capman.resume_global_capture()


_watch: _Watch | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _watch
    _watch = _Watch(config)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else item.config.getini("timeout")
    limit = float(limit or 0)
    if _watch is not None and limit > DUMP_AHEAD:
        _watch.arm(item.nodeid, limit - DUMP_AHEAD)
    try:
        yield
    finally:
        if _watch is not None:
            _watch.disarm()
