"""The reflector's recovery (findings 14 and 16), driven by a scripted API: what it asks and when."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from fabric.sources.k8s_watch import Backoff, Reflector


class Resp:
    def __init__(self, data: bytes = b"", lines: list[bytes] | None = None) -> None:
        self.data, self._lines = data, lines or []

    def stream(self, amt: Any = None, decode_content: bool = False):
        for line in self._lines:
            yield line + b"\n"

    def release_conn(self) -> None:
        pass

    def close(self) -> None:
        pass


class ScriptedApi:
    """Answers lists with an empty list and watches from a script: "gone" (HTTP 410), "down"
    (connection refused), "event" (one ADDED event, then the server ends the watch), "crash" (an
    exception nobody expects). An exhausted script keeps answering "gone" (`repeat`) or blocks."""

    def __init__(self, script: list[str], repeat: str | None = None) -> None:
        self.script, self.repeat = list(script), repeat
        self.calls: list[tuple[str, float]] = []
        self.stop = threading.Event()

    def __call__(self, **kw: Any) -> Resp:
        kind = "watch" if kw.get("watch") else "list"
        self.calls.append((kind, time.monotonic()))
        if kind == "list":
            return Resp(json.dumps({"items": [], "metadata": {"resourceVersion": "7"}}).encode())
        step = self.script.pop(0) if self.script else self.repeat
        if step is None:
            self.stop.wait(5)
            raise urllib3.exceptions.ProtocolError("stopped")
        if step == "gone":
            raise ApiException(status=410, reason="Expired")
        if step == "down":
            raise urllib3.exceptions.NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
        if step == "crash":
            raise KeyError("a bug")
        assert step == "event"
        ev = {"type": "ADDED", "object": {"metadata": {"name": "x", "resourceVersion": "8"}}}
        return Resp(lines=[json.dumps(ev).encode()])


def run(api: ScriptedApi, seconds: float, backoff: Backoff, on_event=lambda t, o: None) -> Reflector:
    stop = threading.Event()
    r = Reflector("Node", api, lambda items: None, on_event, stop, backoff=backoff, watch_timeout=(1, 1))
    t = threading.Thread(target=r.run, daemon=True)
    t.start()
    time.sleep(seconds)
    stop.set()
    api.stop.set()
    t.join(5)
    return r


def test_410_after_an_outage_relists_at_once_not_after_another_backoff() -> None:
    """Finding 16: a quiet kind that had a 410 before must not wait a second full backoff after an outage."""
    api = ScriptedApi(["gone", "down", "down", "down", "down", "gone"])
    run(api, 1.2, Backoff(0.1, 0.2))
    kinds = [k for k, _ in api.calls]
    assert kinds[:9] == ["list", "watch", "list", "watch", "watch", "watch", "watch", "watch", "list"], kinds
    gone_at = api.calls[7][1]
    relist_at = api.calls[8][1]
    assert relist_at - gone_at < 0.05, relist_at - gone_at  # at once (the backoff here is 0.1-0.2 s)


def test_persistent_410_backs_off_instead_of_relisting_in_a_loop() -> None:
    """Finding 16: a server that expires every watch at once gets ever slower relists."""
    api = ScriptedApi([], repeat="gone")
    run(api, 1.5, Backoff(0.05, 0.4))
    lists = [t for k, t in api.calls if k == "list"]
    assert 3 <= len(lists) <= 10, len(lists)  # without the backoff: ~35 lists in 1.5 s
    gaps = [b - a for a, b in zip(lists, lists[1:])]
    assert gaps[-1] >= 0.2, gaps  # grew to the cap


def test_an_unexpected_exception_never_ends_the_thread() -> None:
    """Finding 14: a bug in handling one response leaves the kind working afterwards."""
    seen: list[str] = []
    api = ScriptedApi(["crash", "event"])
    r = run(api, 0.5, Backoff(0.05, 0.1), on_event=lambda t, o: seen.append(o["metadata"]["name"]))
    assert r.crashes == 1 and seen == ["x"]
    assert [k for k, _ in api.calls][:4] == ["list", "watch", "list", "watch"]  # relisted after the crash
