"""The host end of a lab kernel's exec line: a unix socket under /run/fabric-lab that `fabric lab exec`
connects to, relayed onto the serial line the lab kernel's exec server (fabric.lab.execd) listens on.

The lab kernel (user-mode Linux) gets one end of a socket pair as its serial line `ssl0`; this relay,
a thread of the `fabric lab run` process that booted it, holds the other end. Each client connection
carries one session on channel 1; the relay gives it a channel of its own on the line and rewrites
channel numbers both ways. Nothing is written to the line before the server's HELLO (so the line's
terminal never echoes anything back). When the lab kernel ends, every client gets an ERROR and the
socket file is removed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from fabric.lab.wire import Decoder, T, frame, jframe, jload

SOCKET_DIR = Path("/run/fabric-lab")


def socket_path(lab: str, tag: str) -> Path:
    """`<lab>@<tag>.sock`: '@' never occurs in a lab name, so the name can be read back."""
    return SOCKET_DIR / f"{lab}@{tag}.sock"


def lab_of(path: Path) -> str:
    return path.name.rsplit("@", 1)[0]


class Relay:
    def __init__(self, line: socket.socket, path: Path) -> None:
        self.line = line
        self.path = path
        self.hello: dict[str, Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="lab-exec-relay", daemon=True)
        self._listening = threading.Event()
        self.error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        self._listening.wait(timeout)
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported by start(); the lab itself goes on without exec
            self.error = e
            self._listening.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        clients: dict[int, tuple[asyncio.StreamWriter, int]] = {}  # line channel -> (client, its channel)
        next_channel = 1
        self.line.setblocking(False)
        lr, lw = await asyncio.open_connection(sock=self.line)

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal next_channel
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] not in (0, os.getuid()):
                writer.close()
                return
            if self.hello is None:
                writer.write(jframe(T.ERROR, 0, {"message": "the lab is still being built; try again"}))
                writer.close()
                return
            writer.write(jframe(T.HELLO, 0, self.hello))
            mine: dict[int, int] = {}  # client channel -> line channel
            decoder = Decoder()
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    for t, ch, payload in decoder.feed(data):
                        if ch == 0:
                            continue
                        if t is T.OPEN and ch not in mine:
                            mine[ch] = next_channel
                            clients[next_channel] = (writer, ch)
                            next_channel += 1
                        if ch in mine:
                            lw.write(frame(t, mine[ch], payload))
                    await lw.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                for line_ch in mine.values():
                    if clients.pop(line_ch, None) is not None:
                        lw.write(frame(T.CLOSE, line_ch))  # its command is killed in the lab
                writer.close()

        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        old = os.umask(0o077)
        try:
            server = await asyncio.start_unix_server(client, str(self.path))
        finally:
            os.umask(old)
        self._listening.set()

        async def from_line() -> None:
            decoder = Decoder()
            while True:
                data = await lr.read(65536)
                if not data:
                    return
                for t, ch, payload in decoder.feed(data):
                    if t is T.HELLO and ch == 0:
                        try:
                            self.hello = jload(payload)
                        except ValueError:
                            continue
                        continue
                    target = clients.get(ch)
                    if target is None:
                        continue
                    writer, their = target
                    writer.write(frame(t, their, payload))
                    if t in (T.EXIT, T.ERROR):
                        clients.pop(ch, None)

        reading = asyncio.get_running_loop().create_task(from_line())
        await asyncio.wait([reading, asyncio.get_running_loop().create_task(self._stop.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        server.close()
        self.path.unlink(missing_ok=True)
        for writer, their in list(clients.values()):
            writer.write(jframe(T.ERROR, their, {"message": "the lab has ended"}))
            writer.close()
        reading.cancel()
        lw.close()
