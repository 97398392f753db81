"""The agent's side of the plugin: a unix socket served by a small thread pool.

One connection = one plugin run (see cni/shim/bgp-fabric.c for the wire format). The socket file is
created 0600 in a 0700 folder, and the peer must be root (SO_PEERCRED): only the node's runtime
runs plugins. Every read has a deadline, so a stuck client costs one worker for at most
`READ_TIMEOUT`; the verbs have their own netlink timeouts. Workers run requests concurrently.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cni.service import Fds

log = logging.getLogger("cni.server")

MAGIC = b"BGPFABRIC-CNI 1\n"
READ_TIMEOUT = 10.0
MAX_REQUEST = 1 << 20
WORKERS = 8

Handler = Callable[[dict[str, str], bytes, Fds], tuple[int, bytes]]


class ProtocolError(Exception):
    pass


def parse(data: bytes) -> tuple[dict[str, str], bytes]:
    """(environment, stdin) of one request. Raises ProtocolError."""
    if not data.startswith(MAGIC):
        raise ProtocolError("not a bgp-fabric CNI request")
    env: dict[str, str] = {}
    off = len(MAGIC)
    while True:
        end = data.find(b"\0", off)
        if end < 0:
            raise ProtocolError("truncated environment")
        entry = data[off:end]
        off = end + 1
        if not entry:
            break
        k, sep, v = entry.decode(errors="replace").partition("=")
        if sep and (k.startswith("CNI_") or k == "BGPFABRIC_NETNS_ERROR"):
            env[k] = v
    return env, data[off:]


class CniServer:
    def __init__(self, path: Path, handler: Handler, *, allowed_uids: tuple[int, ...] = (0,)) -> None:
        self.path = Path(path)
        self.handler = handler
        self.allowed_uids = allowed_uids
        self._sock: socket.socket | None = None
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="cni")
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.served = 0

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # a previous agent's; no one listens on it any more
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(str(self.path))
        finally:
            os.umask(old)
        s.listen(128)
        self._sock = s
        self._thread = threading.Thread(target=self._accept_loop, name="cni-accept", daemon=True)
        self._thread.start()
        log.info("CNI plugin requests served on %s", self.path)

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=False)
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            self._pool.submit(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        fds = Fds()
        received: list[int] = []
        try:
            conn.settimeout(READ_TIMEOUT)
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid not in self.allowed_uids:
                log.warning("CNI request from uid %d refused", uid)
                return
            data = self._read(conn, received)
            fds.extra, received = received, []
            if len(fds.extra) >= 2:
                fds.netns, fds.netlink = fds.extra.pop(0), fds.extra.pop(0)
            try:
                env, stdin = parse(data)
            except ProtocolError as e:
                log.warning("bad CNI request: %s", e)
                return
            rc, out = self.handler(env, stdin, fds)
            conn.sendall(b"%d\n" % rc + out)
            self.served += 1
        except (OSError, socket.timeout) as e:
            log.warning("CNI request failed: %s", e)
        finally:
            fds.close()
            for fd in received:
                os.close(fd)
            conn.close()

    @staticmethod
    def _read(conn: socket.socket, fds: list[int]) -> bytes:
        """The whole request (to EOF); descriptors that came with it are appended to `fds`."""
        chunks: list[bytes] = []
        total = 0
        msg, ancdata, flags, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4 * array.array("i").itemsize),
                                              socket.MSG_CMSG_CLOEXEC)
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[:len(data) - len(data) % a.itemsize])
                fds.extend(a)
        if flags & socket.MSG_CTRUNC:
            raise OSError("too many descriptors in a CNI request")
        while msg:
            chunks.append(msg)
            total += len(msg)
            if total > MAX_REQUEST:
                raise OSError("CNI request too large")
            msg = conn.recv(65536)
        return b"".join(chunks)
