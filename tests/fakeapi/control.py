"""Driving a standalone fake API server from another process: an HTTP control API on a Unix socket.

A Unix socket because the server usually runs inside a network namespace the test process is not
in (a socket file is reachable from every namespace), and because the control API must not be
reachable by the clients under test. Endpoints (JSON bodies and answers):

  POST /apply           {"kind", "object"}                 -> {"resourceVersion"}
  POST /delete          {"kind", "name", "namespace"?}     -> {"resourceVersion"}
  POST /drop-watches    cut every open watch mid-stream
  POST /expire-watches  compact history and end every watch with ERROR 410
  GET  /events          the Events clients POSTed
  GET  /stats           {"resourceVersion", "watchers": {kind: open watches}, "lists": {kind: lists served},
                         "watches": {kind: watch requests so far}}
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

from .server import RESOURCES, FakeApiServer


class ControlError(Exception):
    """The control API refused a request (unknown kind, missing object, ...)."""


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    fake: FakeApiServer


class _ControlHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _UnixServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _reply(self, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        fake = self.server.fake
        if self.path == "/events":
            with fake._cond:
                return self._reply(200, list(fake.events))
        if self.path == "/stats":
            return self._reply(200, {"resourceVersion": fake.resource_version,
                                     "watchers": {k: fake.watchers(k) for k in RESOURCES},
                                     "lists": {k: fake.lists(k) for k in RESOURCES},
                                     "watches": {k: len(fake.requests_for(k, watch=True)) for k in RESOURCES}})
        self._reply(404, {"error": f"no such endpoint {self.path}"})

    def do_POST(self) -> None:
        fake = self.server.fake
        n = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(n) or b"{}")
        except json.JSONDecodeError as e:
            return self._reply(400, {"error": f"body: {e}"})
        try:
            if self.path == "/apply":
                return self._reply(200, {"resourceVersion": fake.apply(body["kind"], body["object"])})
            if self.path == "/delete":
                rv = fake.delete(body["kind"], body["name"], body.get("namespace"))
                return self._reply(200, {"resourceVersion": rv})
            if self.path == "/drop-watches":
                fake.drop_watches()
                return self._reply(200, {})
            if self.path == "/expire-watches":
                fake.expire_watches()
                return self._reply(200, {})
        except KeyError as e:
            return self._reply(400, {"error": f"unknown kind or object, or missing field: {e}"})
        self._reply(404, {"error": f"no such endpoint {self.path}"})


def serve_control(fake: FakeApiServer, path: str) -> socketserver.BaseServer:
    """Serve the control API for `fake` on Unix socket `path` (on a daemon thread)."""
    if os.path.exists(path):
        os.unlink(path)
    srv = _UnixServer(path, _ControlHandler)
    srv.fake = fake
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, name="fakeapi-control",
                     daemon=True).start()
    return srv


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class FakeApiControl:
    """The test side: change objects and inject faults in a fake API server running elsewhere."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def _call(self, method: str, endpoint: str, body: Any = None) -> Any:
        conn = _UnixConnection(self.path, self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, endpoint, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            answer = json.loads(resp.read() or b"null")
        finally:
            conn.close()
        if resp.status != 200:
            raise ControlError(f"{method} {endpoint}: {resp.status} {answer}")
        return answer

    def apply(self, kind: str, obj: dict[str, Any]) -> int:
        return int(self._call("POST", "/apply", {"kind": kind, "object": obj})["resourceVersion"])

    def delete(self, kind: str, name: str, namespace: str | None = None) -> int:
        body = {"kind": kind, "name": name, **({"namespace": namespace} if namespace else {})}
        return int(self._call("POST", "/delete", body)["resourceVersion"])

    def drop_watches(self) -> None:
        self._call("POST", "/drop-watches", {})

    def expire_watches(self) -> None:
        self._call("POST", "/expire-watches", {})

    def events(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/events"))

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "/stats"))

    def alive(self) -> bool:
        try:
            self.stats()
            return True
        except (OSError, ControlError, http.client.HTTPException):
            return False
