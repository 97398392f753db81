"""A threaded HTTP test double of the Kubernetes API server (default: 127.0.0.1, a random port).

It speaks the wire format the official `kubernetes` client and real clients rely on:
- list: `{"kind": "NodeList", "metadata": {"resourceVersion": "N", "continue": ...}, "items": [...]}`
  with `limit`/`continue` paging; built-in items come without kind/apiVersion (as the real server
  sends them), custom resources with them.
- watch (`?watch=true&resourceVersion=N`): HTTP 200 with a chunked stream of one JSON event per
  line, `{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR", "object": ...}`; events after N
  are replayed from history; a resourceVersion older than the compaction point gets an ERROR event
  with a `Status` of code 410 (Expired), as the real server does; `timeoutSeconds` ends the stream.
- faults the tests need: drop every open watch mid-stream, expire watches (410), stop listening
  (connection refused) and come back on the same port, fail the next N lists of a kind.

Tests mutate state through `apply` / `delete` / `bookmark`; every request is logged in `requests`.
As a standalone process (`python -m tests.fakeapi`, see __main__.py) it binds the address given on
the command line, is driven through a control socket (tests.fakeapi.control) and can keep its
objects in a state file, so a stopped and restarted server serves the same objects.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Resource:
    kind: str
    path: str  # the cluster-wide list/watch path
    api_version: str
    namespaced: bool
    builtin: bool


RESOURCES: dict[str, Resource] = {r.kind: r for r in (
    Resource("Node", "/api/v1/nodes", "v1", False, True),
    Resource("Service", "/api/v1/services", "v1", True, True),
    Resource("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1", True, True),
    Resource("BGPConfiguration", "/apis/bgp-fabric.io/v1/bgpconfigurations", "bgp-fabric.io/v1", False, False),
    Resource("BGPPeer", "/apis/bgp-fabric.io/v1/bgppeers", "bgp-fabric.io/v1", False, False),
    Resource("IPPool", "/apis/bgp-fabric.io/v1/ippools", "bgp-fabric.io/v1", False, False),
    Resource("Pod", "/api/v1/pods", "v1", True, True),
    Resource("Namespace", "/api/v1/namespaces", "v1", False, True),
    Resource("NetworkPolicy", "/apis/networking.k8s.io/v1/networkpolicies", "networking.k8s.io/v1", True, True),
)}
_BY_PATH = {r.path: r for r in RESOURCES.values()}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _key(obj: dict[str, Any]) -> str:
    md = obj.get("metadata", {})
    return f"{md['namespace']}/{md['name']}" if md.get("namespace") else md["name"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: "FakeApiServer"

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], OSError):  # clients hanging up are normal here
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.fake._cond:
            self.server.fake._conns.add(self.connection)

    def finish(self) -> None:
        with self.server.fake._cond:
            self.server.fake._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:
        self.server.fake._handle(self, "GET")

    def do_POST(self) -> None:
        self.server.fake._handle(self, "POST")


class FakeApiServer:
    """Start with `start()` (or as a context manager); `url` is what `Configuration.host` takes.

    `state_file`: objects and the resourceVersion are loaded from it at start (if it exists) and
    written to it (atomically) on every change. A server started from a state file has no watch
    history, as a restarted API server whose watch cache starts empty: a watch resuming from before
    the restart gets 410 Gone and the client relists.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, state_file: str | None = None) -> None:
        self._cond = threading.Condition()
        self._rv = 1
        self._objects: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in RESOURCES}
        self._history: dict[str, list[tuple[int, str, dict[str, Any]]]] = {k: [] for k in RESOURCES}
        self._compacted: dict[str, int] = {k: 0 for k in RESOURCES}
        self._drop_gen = 0
        self._expire_gen = 0
        self._stopping = False
        self._fail: dict[str, list[int]] = {}
        self._missing: set[str] = set()  # kinds whose CRD is "not installed" (404)
        self._snapshots: dict[str, list[dict[str, Any]]] = {}
        self._watchers: dict[str, int] = {k: 0 for k in RESOURCES}
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.hang_events = threading.Event()  # set: an Event POST gets no answer until it is cleared
        self.requests: list[dict[str, Any]] = []
        self._conns: set[socket.socket] = set()
        self.host = host
        self.port = port
        self.state_file = state_file
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "FakeApiServer":
        if self.state_file and os.path.exists(self.state_file):
            self._load_state()
        self._listen()
        return self

    def _load_state(self) -> None:
        assert self.state_file is not None
        with open(self.state_file) as f:
            data = json.load(f)
        with self._cond:
            for kind in RESOURCES:
                self._objects[kind] = {_key(o): o for o in data["objects"].get(kind, [])}
            self.events = list(data.get("events") or [])
            self._rv = int(data["resourceVersion"]) + 1  # the restart itself is a write
            self.compact()

    def _save_state(self) -> None:
        """Write objects, resourceVersion and events; caller holds self._cond."""
        if not self.state_file:
            return
        data = {"resourceVersion": self._rv, "events": self.events,
                "objects": {k: list(v.values()) for k, v in self._objects.items()}}
        tmp = f"{self.state_file}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.state_file)

    def _listen(self) -> None:
        srv = _Server((self.host, self.port), _Handler)
        srv.fake = self
        self.port = srv.server_address[1]
        self._server = srv
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fakeapi", daemon=True)
        self._thread.start()

    def go_down(self) -> None:
        """Stop listening (clients get connection refused) and cut every open connection."""
        srv, self._server = self._server, None
        if srv is not None:
            srv.shutdown()
            srv.server_close()
        self.drop_watches()
        with self._cond:  # idle keep-alive connections too, so nothing is served while "down"
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def come_up(self) -> None:
        """Listen again on the same port."""
        self._listen()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.go_down()

    def __enter__(self) -> "FakeApiServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- state changes (what a controller or kubectl would do) ------------------------------------
    def apply(self, kind: str, obj: dict[str, Any]) -> int:
        """Create or update an object; returns its new resourceVersion."""
        res = RESOURCES[kind]
        obj = copy.deepcopy(obj)
        obj["kind"], obj["apiVersion"] = kind, res.api_version
        md = obj.setdefault("metadata", {})
        with self._cond:
            self._rv += 1
            key = _key(obj)
            old = self._objects[kind].get(key)
            md["uid"] = old["metadata"]["uid"] if old else md.get("uid") or str(uuid.uuid4())
            md.setdefault("creationTimestamp", "2026-11-26T00:00:00Z")
            md["resourceVersion"] = str(self._rv)
            self._objects[kind][key] = obj
            self._history[kind].append((self._rv, "MODIFIED" if old else "ADDED", copy.deepcopy(obj)))
            self._save_state()
            self._cond.notify_all()
            return self._rv

    def delete(self, kind: str, name: str, namespace: str | None = None) -> int:
        key = f"{namespace}/{name}" if namespace else name
        with self._cond:
            obj = self._objects[kind].pop(key)
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._history[kind].append((self._rv, "DELETED", copy.deepcopy(obj)))
            self._save_state()
            self._cond.notify_all()
            return self._rv

    def bump(self) -> int:
        """Advance the global resourceVersion (as writes to unrelated resources do)."""
        with self._cond:
            self._rv += 1
            return self._rv

    def bookmark(self, kind: str) -> int:
        """Send a BOOKMARK at the current resourceVersion to watchers of `kind` that asked for bookmarks."""
        res = RESOURCES[kind]
        with self._cond:
            obj = {"kind": kind, "apiVersion": res.api_version, "metadata": {"resourceVersion": str(self._rv)}}
            self._history[kind].append((self._rv, "BOOKMARK", obj))
            self._cond.notify_all()
            return self._rv

    def compact(self) -> None:
        """Forget history: watches from any resourceVersion before now get 410 Gone."""
        with self._cond:
            for k in RESOURCES:
                self._compacted[k] = self._rv
                self._history[k].clear()

    def expire_watches(self) -> None:
        """Compact, and end every open watch with an ERROR 410 event (as after etcd compaction)."""
        with self._cond:
            self.compact()
            self._expire_gen += 1
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream, without a final chunk."""
        with self._cond:
            self._drop_gen += 1
            self._cond.notify_all()

    def fail_lists(self, kind: str, status: int, times: int = 1) -> None:
        with self._cond:
            self._fail.setdefault(kind, []).extend([status] * times)

    def set_missing(self, kind: str, missing: bool = True) -> None:
        """Make `kind` answer 404 (a CRD that is not installed)."""
        with self._cond:
            (self._missing.add if missing else self._missing.discard)(kind)

    # ---- what tests inspect ----------------------------------------------------------------------
    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def lists(self, kind: str) -> int:
        """How many list requests (first pages) of `kind` were served or refused so far."""
        return sum(1 for r in self.requests_for(kind, watch=False) if not r["query"].get("continue"))

    def watchers(self, kind: str) -> int:
        with self._cond:
            return self._watchers[kind]

    def requests_for(self, kind: str, *, watch: bool | None = None) -> list[dict[str, Any]]:
        path = RESOURCES[kind].path
        with self._cond:
            return [r for r in self.requests if r["path"] == path
                    and (watch is None or (r["query"].get("watch") == "true") == watch)]

    # ---- HTTP ------------------------------------------------------------------------------------
    def _handle(self, h: _Handler, method: str) -> None:
        parts = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        body = None
        if method == "POST":
            n = int(h.headers.get("Content-Length") or 0)
            body = json.loads(h.rfile.read(n) or b"null")
        with self._cond:
            self.requests.append({"method": method, "path": parts.path, "query": query})
        res = _BY_PATH.get(parts.path)
        if res is not None and method == "GET":
            with self._cond:
                missing = res.kind in self._missing
                fail = self._fail.get(res.kind, [])
                status = fail.pop(0) if fail and not missing else None
            if missing:
                return self._send(h, 404, _status(404, "NotFound", "the server could not find the requested resource"))
            if status is not None:
                return self._send(h, status, _status(status, "InternalError", "injected failure"))
            if query.get("watch") in ("true", "1"):
                return self._watch(h, res, query)
            return self._list(h, res, query)
        seg = parts.path.strip("/").split("/")
        if len(seg) == 6 and seg[:3] == ["api", "v1", "namespaces"] and seg[4] == "secrets" and method == "GET":
            secret = self.secrets.get((seg[3], seg[5]))
            if secret is None:
                return self._send(h, 404, _status(404, "NotFound", f'secrets "{seg[5]}" not found'))
            return self._send(h, 200, secret)
        if len(seg) == 5 and seg[:3] == ["api", "v1", "namespaces"] and seg[4] == "events" and method == "POST":
            while self.hang_events.is_set() and not self._stopping:
                time.sleep(0.01)
            ev = dict(body or {})
            ev.setdefault("metadata", {})["namespace"] = seg[3]
            # As the API server validates Events: the involved object's namespace must be the Event's,
            # and an Event about a cluster-scoped object may only live in `default`.
            involved_ns = (ev.get("involvedObject") or {}).get("namespace") or ""
            if involved_ns != seg[3] and not (involved_ns == "" and seg[3] == "default"):
                return self._send(h, 422, _status(422, "Invalid", f'Event "{ev["metadata"].get("name")}" is '
                                                  'invalid: involvedObject.namespace: Invalid value: '
                                                  f'"{involved_ns}": does not match event.namespace'))
            with self._cond:
                self.events.append(ev)
                self._save_state()
            return self._send(h, 201, ev)
        return self._send(h, 404, _status(404, "NotFound", f"no handler for {method} {parts.path}"))

    def _send(self, h: _Handler, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _list(self, h: _Handler, res: Resource, query: dict[str, str]) -> None:
        limit = int(query.get("limit") or 0)
        token = query.get("continue")
        with self._cond:
            if token:
                snap_id, _, offset = token.partition(":")
                items = self._snapshots.get(snap_id)
                if items is None:
                    return self._send(h, 410, _status(410, "Expired", "continue token expired"))
                start, rv = int(offset), snap_id.split("@")[1]
            else:
                items = [copy.deepcopy(self._objects[res.kind][k]) for k in sorted(self._objects[res.kind])]
                for it in items:
                    if res.builtin:  # the real server omits these on list items of built-in kinds
                        it.pop("kind", None)
                        it.pop("apiVersion", None)
                rv = str(self._rv)
                snap_id = f"{uuid.uuid4().hex}@{rv}"
                start = 0
            page = items[start:start + limit] if limit else items[start:]
            md: dict[str, Any] = {"resourceVersion": rv}
            if limit and start + limit < len(items):
                self._snapshots[snap_id] = items
                md["continue"] = f"{snap_id}:{start + limit}"
        self._send(h, 200, {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": md,
                            "items": page})

    def _watch(self, h: _Handler, res: Resource, query: dict[str, str]) -> None:
        bookmarks = query.get("allowWatchBookmarks") == "true"
        timeout = float(query.get("timeoutSeconds") or 0)
        deadline = time.monotonic() + timeout if timeout else None
        pending: list[tuple[str, dict[str, Any]]] = []
        with self._cond:
            drop_gen, expire_gen = self._drop_gen, self._expire_gen
            rv_param = query.get("resourceVersion") or ""
            expired = False
            if rv_param in ("", "0"):  # start at "now": synthetic ADDED for every current object
                pos = self._rv
                pending = [("ADDED", copy.deepcopy(o)) for o in self._objects[res.kind].values()]
            else:
                pos = int(rv_param)
                expired = pos < self._compacted[res.kind]
            self._watchers[res.kind] += 1
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            if expired:
                self._chunk(h, {"type": "ERROR", "object": _status(410, "Expired", f"too old resource version: "
                                                                                   f"{pos} ({self._compacted[res.kind]})")})
                return self._end(h)
            for typ, obj in pending:
                self._chunk(h, {"type": typ, "object": obj})
            while True:
                with self._cond:
                    while True:
                        events = [(rv, t, o) for rv, t, o in self._history[res.kind]
                                  if rv > pos and (t != "BOOKMARK" or bookmarks)]
                        dropped = self._drop_gen != drop_gen or self._stopping
                        gone = self._expire_gen != expire_gen
                        timed_out = deadline is not None and time.monotonic() >= deadline
                        if events or dropped or gone or timed_out:
                            break
                        self._cond.wait(0.5 if deadline is None else max(0.01, min(0.5, deadline - time.monotonic())))
                if dropped:
                    h.close_connection = True
                    try:
                        h.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                for rv, typ, obj in events:
                    self._chunk(h, {"type": typ, "object": obj})
                    pos = max(pos, rv)
                if gone:
                    self._chunk(h, {"type": "ERROR", "object": _status(410, "Expired", "too old resource version")})
                    return self._end(h)
                if timed_out and not events:
                    return self._end(h)
        except OSError:  # the client went away
            h.close_connection = True
        finally:
            with self._cond:
                self._watchers[res.kind] -= 1

    @staticmethod
    def _chunk(h: _Handler, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        h.wfile.flush()

    @staticmethod
    def _end(h: _Handler) -> None:
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()
