"""Warning Events sent off the caller's thread.

Recording an Event is an HTTP request (up to its request timeout against a slow API server). The
callers that find bad objects must not wait for it: a reflector thread would delay its kind's watch,
the agent's event loop would stall every stage. So they hand (object, message) to this sender: one
daemon thread, a bounded queue (when it is full the report is dropped and counted — the problem is in
the log and status anyway, an Event is best effort).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fabric.events")

QUEUE_SIZE = 256


class EventSender:
    def __init__(self, send: Callable[[dict[str, Any], str], bool], size: int = QUEUE_SIZE) -> None:
        self._send = send
        self._q: queue.Queue[tuple[dict[str, Any], str] | None] = queue.Queue(size)
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="k8s-events", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Returns within `timeout`: a request in flight ends at its own timeout on the daemon thread."""
        if self._thread is None:
            return
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass  # the thread is daemon: it dies with the process
        self._thread.join(timeout)

    def submit(self, obj: dict[str, Any], message: str) -> bool:
        """Queue one report; never blocks. False when the queue is full (dropped)."""
        try:
            self._q.put_nowait((obj, message))
            return True
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("events: queue full, %d reports dropped so far (the problems are in status)", self.dropped)
            return False

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                self._send(*item)
            except Exception:  # noqa: BLE001 - one bad report never ends the sender
                log.exception("events: could not send a report")
