"""healthCheckNodePort servers for externalTrafficPolicy=Local services (as kube-proxy serves them).

A load balancer probes `http://NODE:healthCheckNodePort/`; the answer is 200 while this node has a
local ready endpoint for the service, else 503, so the balancer sends traffic only to nodes that can
serve it without a second hop. One small HTTP server thread per port; counts are swapped in place
when endpoints change (no restart). Listening sockets are opened on the namespace thread.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loadbalancer.types import HealthCheck


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, check: HealthCheck) -> None:
        self.check = check
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        c = self.server.check
        ns, _, name = c.service.partition("/")
        body = json.dumps({"service": {"namespace": ns, "name": name}, "localEndpoints": c.local_endpoints,
                           "serviceProxyHealthy": True}).encode()
        self.send_response(200 if c.local_endpoints > 0 else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: probes come every few seconds
        pass


class HealthServers:
    def __init__(self, run_in_ns: Callable, bind: str = "0.0.0.0") -> None:
        self._run_in_ns = run_in_ns
        self._bind = bind
        self._servers: dict[int, tuple[_Server, threading.Thread]] = {}

    def update(self, checks: Mapping[int, HealthCheck]) -> list[str]:
        """Serve exactly these ports; returns one error line per port that could not be opened."""
        errors: list[str] = []
        for port in list(self._servers):
            if port not in checks:
                self._stop(port)
        for port, check in checks.items():
            if port in self._servers:
                self._servers[port][0].check = check
                continue
            try:
                sock = self._run_in_ns(self._listen, port)
            except OSError as e:
                errors.append(f"{check.service}: healthCheckNodePort {port}: {e.strerror or e}")
                continue
            srv = _Server(sock, check)
            t = threading.Thread(target=srv.serve_forever, name=f"healthcheck-{port}", daemon=True)
            t.start()
            self._servers[port] = (srv, t)
        return errors

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((self._bind, port))
            s.listen(16)
        except OSError:
            s.close()
            raise
        return s

    def _stop(self, port: int) -> None:
        srv, t = self._servers.pop(port)
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)

    def ports(self) -> dict[int, HealthCheck]:
        return {p: s.check for p, (s, _) in self._servers.items()}

    def close(self) -> None:
        for port in list(self._servers):
            self._stop(port)
