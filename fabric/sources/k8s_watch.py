"""List + watch of one kind (a "reflector", as client-go calls it), on a thread, with the sync client.

Loop: list (paged) -> `on_list(items)` -> watch from the list's resourceVersion -> `on_event(type, obj)`
per event. The resourceVersion advances with every event and BOOKMARK, so a watch that ends (server
timeout, dropped connection, API server restart) resumes from where it was without a relist. Only
`410 Gone` (an HTTP status or an ERROR event; the history we need is compacted away) causes a relist:
at once, unless the 410 came on the very first watch after a relist (a server that keeps expiring us),
then after the backoff, which keeps growing across such cycles (a list's success does not reset it;
only a watch that delivers events does). Errors never call `on_list`: losing the API server changes
nothing until a list succeeds again. After an error the next attempt waits an exponential backoff with
jitter; `stop()` wakes every wait and shuts the socket of an open request so the thread ends promptly.
An unexpected exception (a bug) is logged with its traceback, counted, and retried like an error:
the thread never dies and leaves its kind frozen.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("fabric.sources.kubernetes")

ListFn = Callable[..., Any]  # a kubernetes client list method returning a raw urllib3 response


class Gone(Exception):
    """410: the resourceVersion (or continue token) is too old; relist."""


class WatchError(Exception):
    """The server ended a watch with an ERROR event other than 410."""


class Backoff:
    """Exponential backoff with 'equal jitter': a delay in [d/2, d], d doubling up to `maximum`."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, rng: random.Random | None = None) -> None:
        self.initial, self.maximum = initial, maximum
        self._next = initial
        self._rng = rng or random.Random()

    def reset(self) -> None:
        self._next = self.initial

    def next(self) -> float:
        d = self._next
        self._next = min(self.maximum, d * 2)
        return self._rng.uniform(d / 2, d)


def _lines(resp: Any) -> Iterator[bytes]:
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


class Reflector:
    """Keeps one kind in sync through `on_list` / `on_event`; run `run()` on its own thread."""

    def __init__(self, kind: str, list_fn: ListFn, on_list: Callable[[list[dict[str, Any]]], None],
                 on_event: Callable[[str, dict[str, Any]], None], stop: threading.Event, *,
                 page_size: int = 500, watch_timeout: tuple[int, int] = (300, 600),
                 backoff: Backoff | None = None, on_missing: Callable[[], None] | None = None,
                 request_timeout: tuple[float, float] = (10.0, 30.0),
                 on_state: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._on_state = on_state  # called (on this thread) when the reflector starts or stops failing
        self._list_fn = list_fn
        self._on_list = on_list
        self._on_event = on_event
        self._on_missing = on_missing
        self._stop = stop
        self._page_size = page_size
        self._request_timeout = request_timeout  # (connect, read) for lists and the watch's connect
        self._watch_timeout = watch_timeout
        self._backoff = backoff or Backoff()
        self._lock = threading.Lock()
        self._resp: Any = None
        self.resource_version: str | None = None  # where the next watch starts (None: relist first)
        self.failures = 0  # errors retried so far (for status and tests)
        self.lists = 0  # completed lists
        self.crashes = 0  # unexpected exceptions survived
        self.last_crash: str | None = None  # the last one, until the reflector works again
        self.watches = 0  # watches started (the first, then every restart)
        self.last_error: str | None = None  # the last failure, until a list or a watch event succeeds
        self.failing_since: float | None = None  # wall clock of the first failure in a row
        self._fresh = False  # the next watch is the first one after a relist

    # ---- stopping ---------------------------------------------------------------------------------
    def _track(self, resp: Any) -> None:
        with self._lock:
            self._resp = resp
        if self._stop.is_set():
            self.abort()

    def abort(self) -> None:
        """Unblock a read in progress (called from another thread by stop())."""
        with self._lock:
            resp = self._resp
        if resp is None:
            return
        try:
            conn = getattr(resp, "connection", None) or getattr(resp, "_connection", None)
            sock = getattr(conn, "sock", None)
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _release(self, resp: Any) -> None:
        with self._lock:
            self._resp = None
        try:
            resp.release_conn()
            resp.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways
            pass

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self.resource_version = self._list()
                    self._fresh = True
                self._watch()  # returns when the server ends the watch cleanly: resume at once
                self._fresh = False
            except Gone as e:
                self.resource_version = None
                if self._fresh:  # 410 on the first watch after a relist: don't hammer the server
                    self._retry(f"{e} right after a relist")
                else:
                    log.info("%s: %s; relisting", self.kind, e)
            except ApiException as e:
                self._fresh = False
                if e.status == 404 and self._on_missing is not None:
                    self._on_missing()
                self._retry(f"API error {e.status} {e.reason or ''}".strip())
            except (urllib3.exceptions.HTTPError, OSError, WatchError, ValueError) as e:
                self._fresh = False
                self._retry(f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - a bug must not freeze this kind forever
                self._fresh = False
                self.crashes += 1
                text = f"{type(e).__name__}: {e}"
                if text != self.last_crash:
                    log.exception("%s: unexpected error (retrying with backoff and a relist)", self.kind)
                self.last_crash = text
                self.resource_version = None
                self._retry(text)
        log.debug("%s: reflector stopped", self.kind)

    def _ok(self) -> None:
        if self.failing_since is not None:
            self.last_error, self.failing_since = None, None
            self._state_changed()

    def _state_changed(self) -> None:
        if self._on_state is not None:
            try:
                self._on_state()
            except Exception:  # noqa: BLE001 - status is best effort; the reflector goes on
                log.exception("%s: state callback failed", self.kind)

    def _retry(self, why: str) -> None:
        if self._stop.is_set():
            return
        self.failures += 1
        first, previous = self.failing_since is None, self.last_error
        self.last_error = why
        if first:
            self.failing_since = time.time()
        if first or why != previous:
            self._state_changed()
        delay = self._backoff.next()
        log.warning("%s: %s; retrying in %.1fs", self.kind, why, delay)
        self._stop.wait(delay)

    def _list(self) -> str:
        items: list[dict[str, Any]] = []
        cont: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self._page_size, "_preload_content": False,
                                      "_request_timeout": self._request_timeout}
            if cont:
                kwargs["_continue"] = cont
            try:
                resp = self._list_fn(**kwargs)
            except ApiException as e:
                if e.status == 410:  # continue token expired: start the list over
                    raise Gone("list continue token expired") from None
                raise
            self._track(resp)
            try:
                body = json.loads(resp.data)
            finally:
                self._release(resp)
            if self._stop.is_set():
                raise OSError("stopping")
            items.extend(body.get("items") or [])
            md = body.get("metadata") or {}
            cont = md.get("continue")
            if not cont:
                self._on_list(items)
                self.lists += 1
                self.last_crash = None
                self._ok()
                return str(md.get("resourceVersion") or "")

    def _watch(self) -> None:
        timeout = random.randint(*self._watch_timeout)
        try:
            resp = self._list_fn(watch=True, allow_watch_bookmarks=True, resource_version=self.resource_version,
                                 timeout_seconds=timeout, _preload_content=False,
                                 _request_timeout=(self._request_timeout[0], timeout + 30))
        except ApiException as e:
            if e.status == 410:
                raise Gone("watch: 410 Gone") from None
            raise
        self._track(resp)
        self.watches += 1
        self._ok()  # the API server answered the watch: reachable again
        started, seen = time.monotonic(), 0
        try:
            for line in _lines(resp):
                self._handle(json.loads(line))
                self._backoff.reset()
                seen += 1
        finally:
            self._release(resp)
        if not seen and time.monotonic() - started < 1.0 and not self._stop.is_set():
            # A server that ends every watch at once must not turn this into a busy loop.
            self._stop.wait(self._backoff.next())

    def _handle(self, ev: dict[str, Any]) -> None:
        typ, obj = ev.get("type"), ev.get("object") or {}
        if typ == "ERROR":
            if obj.get("code") == 410:
                raise Gone(f"watch: {obj.get('message') or 'resource version expired'}")
            raise WatchError(f"watch error event: {obj.get('code')} {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if typ in ("ADDED", "MODIFIED", "DELETED"):
            self._on_event(typ, obj)
        elif typ != "BOOKMARK":
            log.warning("%s: unknown watch event type %r ignored", self.kind, typ)
            return
        if rv:
            self.resource_version = str(rv)
        self._fresh = False  # the watch works: the next 410 relists at once
