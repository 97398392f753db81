"""The relay helper as a real process: bytes both ways, stdin drained while the agent's socket is gone."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _server(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    s.settimeout(20)
    return s


def _read_until(conn: socket.socket, want: bytes, timeout: float = 20) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    conn.settimeout(0.5)
    while want not in buf:
        if time.monotonic() > deadline:
            raise AssertionError(f"never got {want!r}; got {buf[-200:]!r}")
        try:
            chunk = conn.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            raise AssertionError(f"socket closed before {want!r}")
        buf += chunk
    return buf


def _readline(proc: subprocess.Popen[bytes], timeout: float = 20) -> bytes:
    assert proc.stdout is not None
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    assert r, "relay wrote nothing to stdout"
    return proc.stdout.readline()


@pytest.fixture
def relay(tmp_path: Path):
    path = tmp_path / "relay.sock"
    proc = subprocess.Popen([sys.executable, "-m", "bgp.relay", str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_forwards_both_ways(relay) -> None:
    proc, path = relay
    srv = _server(path)
    conn, _ = srv.accept()
    proc.stdin.write(b'{"type": "state"}\ndone\n')
    proc.stdin.flush()
    assert _read_until(conn, b"done\n").endswith(b'{"type": "state"}\ndone\n')
    conn.sendall(b"announce route 10.0.0.0/24 next-hop self\nannounce eor")  # second line incomplete
    assert _readline(proc) == b"announce route 10.0.0.0/24 next-hop self\n"
    conn.sendall(b" ipv4 unicast\n")
    assert _readline(proc) == b"announce eor ipv4 unicast\n"
    conn.close()
    srv.close()


def test_keeps_draining_stdin_without_socket_then_reconnects(relay) -> None:
    proc, path = relay
    # No server: 8 MiB into stdin must still be consumed (a pipe holds 64 KiB; a relay that stopped
    # reading would block this write forever, like ExaBGP blocked in its pipe write).
    payload = (b'{"type": "update", "pad": "' + b"x" * 1000 + b'"}\n') * 8000
    fd = proc.stdin.fileno()
    os.set_blocking(fd, False)
    sent, deadline = 0, time.monotonic() + 60
    while sent < len(payload):
        assert time.monotonic() < deadline, f"relay stopped reading stdin after {sent} bytes"
        _, w, _ = select.select([], [fd], [], 1.0)
        if w:
            try:
                sent += os.write(fd, payload[sent:sent + 65536])
            except BlockingIOError:
                pass
    os.set_blocking(fd, True)
    # The socket appears: the relay connects on its own and new lines flow (old ones were dropped).
    srv = _server(path)
    conn, _ = srv.accept()
    # Lines written before the relay marks itself connected are dropped: repeat until one arrives.
    got, deadline = b"", time.monotonic() + 20
    while b"marker\n" not in got:
        assert time.monotonic() < deadline, "marker never forwarded after reconnect"
        proc.stdin.write(b"marker\n")
        proc.stdin.flush()
        try:
            got += _read_until(conn, b"marker\n", timeout=0.3)
        except AssertionError:
            continue
    assert got.count(b'"pad"') < 8000  # what came while nobody listened was not queued up forever
    # the agent goes away and comes back: the relay reconnects again
    conn.close()
    srv.close()
    path.unlink()
    srv = _server(path)
    conn, _ = srv.accept()
    conn.sendall(b"again\n")
    assert _readline(proc) == b"again\n"
    conn.close()
    srv.close()


def test_exits_when_exabgp_closes_stdin(relay) -> None:
    proc, _ = relay
    proc.stdin.close()
    assert proc.wait(timeout=20) == 0
