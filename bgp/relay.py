"""The helper process ExaBGP runs: `python -m bgp.relay SOCKET`.

It only moves bytes: every line ExaBGP writes to our stdin (JSON messages, `done`/`error` acks) goes to
the agent's unix socket, every line the agent writes goes to our stdout (ExaBGP's command input).
stdin is read at all times by its own thread: ExaBGP blocks in a pipe write if its helper stops reading,
its keepalives stop and peers drop the session at hold time. Until the first connection, lines are
kept (up to EARLY_LIMIT bytes): ExaBGP starts us before its sessions come up, and a fast peer reaches
`up` while Python is still starting; those first state/OPEN messages must reach the agent. After
that, while the agent's socket is gone, lines from stdin are dropped and the relay reconnects with a
capped backoff (blocking waits, no busy loop).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import sys
import threading

BACKOFF_START = 0.05
BACKOFF_MAX = 1.0
EARLY_LIMIT = 64 * 1024 * 1024
_STOP = object()


class Relay:
    def __init__(self, path: str, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        self.path = path
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.outbox: queue.SimpleQueue[object] = queue.SimpleQueue()  # stdin lines for the socket
        self.sock: socket.socket | None = None
        self.connected = threading.Event()
        self.done = threading.Event()
        self.dropped = 0
        self.lock = threading.Lock()  # orders "buffer early lines" against "connected: flush them"
        self.ever_connected = False
        self.early: list[bytes] = []
        self.early_bytes = 0

    # stdin -> outbox: never blocks on anything but stdin itself
    def read_stdin(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self.stdin_fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            cut = buf.rfind(b"\n")
            if cut >= 0:
                lines = buf[:cut + 1]
                buf = buf[cut + 1:]
                with self.lock:
                    if self.connected.is_set():
                        self.outbox.put(lines)
                    elif not self.ever_connected and self.early_bytes + len(lines) <= EARLY_LIMIT:
                        self.early.append(lines)
                        self.early_bytes += len(lines)
                    else:
                        self.dropped += lines.count(b"\n")
        self.done.set()
        self.outbox.put(_STOP)

    # outbox -> socket: takes everything queued and sends it in one write
    def send_loop(self) -> None:
        while True:
            item = self.outbox.get()
            if item is _STOP:
                return
            parts = [item]
            try:
                while True:
                    more = self.outbox.get_nowait()
                    if more is _STOP:
                        self._send(b"".join(parts))  # type: ignore[arg-type]
                        return
                    parts.append(more)
            except queue.Empty:
                pass
            self._send(b"".join(parts))  # type: ignore[arg-type]

    def _send(self, data: bytes) -> None:
        sock = self.sock
        if sock is None or not self.connected.is_set():
            self.dropped += data.count(b"\n")
            return
        try:
            sock.sendall(data)
        except OSError:
            self.dropped += data.count(b"\n")
            self._disconnect(sock)

    def _disconnect(self, sock: socket.socket) -> None:
        self.connected.clear()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # socket -> stdout, and (re)connecting
    def connect_loop(self) -> None:
        delay = BACKOFF_START
        while not self.done.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                if self.done.wait(delay):
                    return
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_START
            self.sock = sock
            with self.lock:
                for lines in self.early:
                    self.outbox.put(lines)
                self.early, self.early_bytes = [], 0
                self.ever_connected = True
                self.connected.set()
            self._pump_socket(sock)
            self.connected.clear()
            self.sock = None
            sock.close()

    def _pump_socket(self, sock: socket.socket) -> None:
        buf = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            cut = buf.rfind(b"\n")
            if cut >= 0:
                # only whole lines: a half line left by a dropped socket must not merge with the next
                self._write_stdout(buf[:cut + 1])
                buf = buf[cut + 1:]

    def _write_stdout(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.stdout_fd, view)
            except InterruptedError:
                continue
            except OSError:  # ExaBGP is gone
                os._exit(0)
            view = view[n:]

    def run(self) -> int:
        threading.Thread(target=self.connect_loop, name="relay-connect", daemon=True).start()
        sender = threading.Thread(target=self.send_loop, name="relay-send", daemon=True)
        sender.start()
        self.read_stdin()  # main thread: returns when ExaBGP closes our stdin
        sender.join(timeout=1.0)
        return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bgp.relay SOCKET", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ExaBGP's own Ctrl-C handling stops us via stdin EOF/SIGTERM
    return Relay(args[0]).run()


if __name__ == "__main__":
    sys.exit(main())
