"""ExaBGP's API helper replaced by a direct connection to the agent's socket (installed by bgp.exabgp_launch).

ExaBGP talks to an API "process": a child whose stdin gets ExaBGP's messages and whose stdout brings
commands. Through the relay (bgp.relay) every message crossed one more process and two threads:
~1-4 ms per UPDATE in the lab kernel on each node, a Python start at every ExaBGP start, ~10 MB.
Here the helper named in the config is not started: ExaBGP connects to the agent's unix socket
itself and uses it as that helper's stdin and stdout (the same lines both ways: JSON messages and
`done`/`error` out, commands in).

Writes never block ExaBGP (a blocked write would stop its keepalives: shared notes, ExaBGP #882):
what the socket does not take at once is kept and sent when it is writable (bgp.exabgp_reactor
watches the socket for that while anything is pending). When the agent's side closes or fails,
ExaBGP exits at once without a NOTIFICATION, as when the agent dies: peers keep our routes for the
graceful-restart time and the agent starts a new ExaBGP. A plain `exabgp` (paths.exabgp) still runs
the relay named in the config.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import Any

# Set by install(): the helper to replace, the socket to use; the one live connection.
_process_name: str | None = None
_socket_path: str | None = None
_live: "ApiConnection | None" = None


def _gone(why: str) -> None:
    sys.stderr.write(f"bgp-fabric: the agent's API socket {why}: exiting (no NOTIFICATION: peers keep our "
                     "routes for the graceful-restart time)\n")
    sys.stderr.flush()
    os._exit(1)


class _Out:
    """What ExaBGP uses as the helper's stdout: something with a fileno() it polls and os.read()s."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()


class _In:
    """What ExaBGP uses as the helper's stdin: write() then flush() for every message."""

    def __init__(self, conn: "ApiConnection") -> None:
        self._conn = conn

    def write(self, data: bytes) -> int:
        self._conn.pending += data
        self._conn.flush()
        return len(data)

    def flush(self) -> None:
        self._conn.flush()


class ApiConnection:
    """Stands in for the subprocess.Popen of ExaBGP's helper."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except OSError as e:
            _gone(f"{path} cannot be reached ({e.strerror or e})")
        self.sock.setblocking(False)
        self.pending = bytearray()
        self.pid = os.getpid()
        self.returncode: int | None = None
        self.stdout = _Out(self.sock)
        self.stdin = _In(self)

    def flush(self) -> None:
        """Send what the socket takes now; keep the rest for when it is writable."""
        while self.pending:
            try:
                n = self.sock.send(self.pending)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return
                _gone(f"failed ({e.strerror or e})")
                return
            del self.pending[:n]

    # the parts of subprocess.Popen ExaBGP uses
    def poll(self) -> int | None:
        return self.returncode

    def terminate(self) -> None:
        self.flush()
        self.returncode = 0
        self.sock.close()

    kill = terminate

    def wait(self, timeout: float | None = None) -> int:
        return 0


def live_fd() -> int:
    c = _live
    return c.sock.fileno() if c is not None and c.returncode is None else -1


def check(events: int) -> None:
    """After a poll of the socket: exit when the agent's side is gone (EOF is readable, so ExaBGP's own
    read loop would not notice it: it asks poll() of a process that never exits)."""
    import select

    c = _live
    if c is None or c.returncode is not None:
        return
    if events & (select.POLLHUP | select.POLLERR | select.POLLRDHUP | select.POLLNVAL):
        _gone("was closed")
    if events & select.POLLIN:
        try:
            if c.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                _gone("was closed")
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            _gone(f"failed ({e.strerror or e})")


def pending_fd() -> int:
    """The API socket while it has output waiting (watch it for POLLOUT), else -1."""
    c = _live
    return c.sock.fileno() if c is not None and c.pending and c.returncode is None else -1


def flush() -> None:
    if _live is not None and _live.returncode is None:
        _live.flush()


def install(process_name: str, socket_path: str) -> None:
    """Make ExaBGP's Processes use ApiConnection for `process_name` instead of starting it."""
    from exabgp.reactor.api import processes

    global _process_name, _socket_path
    _process_name, _socket_path = process_name, socket_path
    P = processes.Processes
    for attr in ("_start", "_handle_problem", "_update_fds"):
        if not callable(getattr(P, attr, None)):
            raise RuntimeError(f"exabgp internals moved (Processes.{attr}): bgp/exabgp_api.py needs updating")
    orig_start, orig_problem = P._start, P._handle_problem

    def _start(self: Any, process: str) -> None:
        global _live
        if process != _process_name or _socket_path is None:
            return orig_start(self, process)
        if process in self._process or process not in self._configuration:
            return orig_start(self, process)  # its own "already running" / "no configuration" handling
        from exabgp.reactor.api.response import Response
        from exabgp.version import json as json_version
        from exabgp.version import text as text_version

        conf = self._configuration[process]
        use_json = conf.get("encoder", "text") == "json"
        self._encoder[process] = Response.JSON(json_version) if use_json else Response.Text(text_version)
        self._ackjson[process] = False
        self._ack[process] = conf.get("ack", self._default_ack)
        _live = self._process[process] = ApiConnection(_socket_path)
        self._update_fds()
        self._restart[process] = conf["respawn"]
        return None

    def _handle_problem(self: Any, process: str) -> None:
        if process == _process_name and isinstance(self._process.get(process), ApiConnection):
            _gone("was closed")  # EOF or an error on it: the agent went away
        return orig_problem(self, process)

    P._start = _start
    P._handle_problem = _handle_problem
