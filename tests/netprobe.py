"""In-process probes inside network namespaces: a thread enters the namespace (setns) and opens its
sockets there, so servers and clients cost no process start (slow in the lab kernels)."""

from __future__ import annotations

import socket
import threading


def in_netns(path: str, fn, *args):
    """Run fn in a thread that entered the network namespace at `path` (sockets opened there stay there)."""
    from pyroute2 import netns as pr_netns

    out: dict = {}

    def body() -> None:
        try:
            pr_netns.setns(path, 0)
            out["v"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            out["e"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join(120)
    if "e" in out:
        raise out["e"]
    return out.get("v")


class Server:
    """A TCP server inside a pod's namespace: answers each connection with its name, or counts bytes."""

    def __init__(self, pod_netns: str, port: int, name: str) -> None:
        self.name, self.port = name, port
        self.peers: list[str] = []  # source address of each HTTP request, as this server saw it
        self.sock = in_netns(pod_netns, lambda: socket.create_server(("0.0.0.0", port), reuse_port=True))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.settimeout(30)
                first = c.recv(65536)
                if first.startswith(b"GET"):
                    self.peers.append(_[0])
                    body = self.name.encode()
                    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                    continue
                n = len(first)
                while True:
                    b = c.recv(65536)
                    if not b:
                        break
                    n += len(b)
                c.sendall(str(n).encode())

    def close(self) -> None:
        self.sock.close()


def http_get(pod_netns: str, ip: str, port: int) -> str:
    def get() -> str:
        with socket.create_connection((ip, port), timeout=5) as c:
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := c.recv(4096):
                data += chunk
        return data.split(b"\r\n\r\n", 1)[1].decode()
    return in_netns(pod_netns, get)


def send_bulk(pod_netns: str, ip: str, port: int, size: int) -> int:
    def send() -> int:
        with socket.create_connection((ip, port), timeout=30) as c:
            c.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: DF on every segment
            c.sendall(b"x" * size)
            c.shutdown(socket.SHUT_WR)
            return int(c.recv(100))
    return in_netns(pod_netns, send)
