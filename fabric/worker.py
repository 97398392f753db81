"""One daemon thread per stage: runs blocking work off the event loop, one call at a time.

Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so one hung call (a stuck
`nft`, a kernel that stops answering) would keep the process from ever exiting. A hung call here
only keeps its own daemon thread; `stop()` waits a bounded time.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class Worker:
    def __init__(self, name: str) -> None:
        self.name = name
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            fn, args, loop, fut = item
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting side
                loop.call_soon_threadsafe(_set, fut, None, e)
            else:
                loop.call_soon_threadsafe(_set, fut, result, None)

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run fn(*args) on this thread; the future completes on the calling (running) event loop."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._q.put((fn, args, loop, fut))
        return fut

    def stop(self, timeout: float) -> bool:
        """Ask the thread to end after its current call; True if it ended within `timeout`."""
        self._q.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _set(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
