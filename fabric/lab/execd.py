"""The lab's exec server: runs commands in a lab node's namespace for `fabric lab exec`, with a pty or pipes.

Started by the lab runner once the lab is built, as its own process (a failure here never touches the
lab), stopped with the lab. It serves the wire protocol (fabric.lab.wire) either on a unix socket
under /run/fabric-lab (a lab on a capable kernel) or on the lab kernel's serial line, which the
`fabric lab run` process on the host relays to a unix socket of its own (fabric.lab.relay).

    python -m fabric.lab.execd --nodes NODES.json (--listen PATH | --tty ssl0)

Only the lab's own namespaces are entered; a command runs as `ip netns exec NS ARGV...` (no shell
of ours in between), in its own session; every session's process group is killed when its client
goes away or the server stops.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import signal
import socket
import stat
import struct
import sys
import termios
import tty
from pathlib import Path
from typing import Any

from fabric.lab.wire import CHUNK, Decoder, T, frame, jframe, jload

MAX_SESSIONS = 32
DRAIN_AFTER_EXIT = 1.0  # seconds: output still arriving after the command exited (then EXIT is sent)
SERIAL_MAJOR, SERIAL_MINOR0 = 4, 64  # UML's ssl<N> lines are /dev/ttyS<N>


class Stream:
    """One multiplexed byte stream: frames out through `send`, in through `frames()`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = Decoder()
        self.closed = False

    def send(self, data: bytes) -> None:
        if not self.closed:
            try:
                self.writer.write(data)
            except (ConnectionError, RuntimeError):
                self.closed = True

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError):
            self.closed = True


class Session:
    """One command in one node's namespace."""

    def __init__(self, stream: Stream, channel: int, proc: asyncio.subprocess.Process, master: int | None) -> None:
        self.stream, self.channel, self.proc, self.master = stream, channel, proc, master
        self.output_done = asyncio.Event()
        self._pending: list[asyncio.Task] = []
        self._stdin: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._stdin_task = asyncio.get_running_loop().create_task(self._feed_stdin())

    # -- output ------------------------------------------------------------------------------------

    def start_output(self) -> None:
        loop = asyncio.get_running_loop()
        if self.master is not None:
            loop.add_reader(self.master, self._pty_readable)
        else:
            assert self.proc.stdout is not None and self.proc.stderr is not None
            outs = [loop.create_task(self._pipe(self.proc.stdout, T.STDOUT)),
                    loop.create_task(self._pipe(self.proc.stderr, T.STDERR))]
            self._pending += outs

            async def both() -> None:
                await asyncio.gather(*outs, return_exceptions=True)
                self.output_done.set()
            self._pending.append(loop.create_task(both()))

    def _pty_readable(self) -> None:
        assert self.master is not None
        try:
            data = os.read(self.master, CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO: every slave side is closed
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
            self.output_done.set()
            return
        self.stream.send(frame(T.STDOUT, self.channel, data))

    async def _pipe(self, r: asyncio.StreamReader, t: T) -> None:
        while True:
            data = await r.read(CHUNK)
            if not data:
                return
            self.stream.send(frame(t, self.channel, data))
            await self.stream.drain()

    # -- input -------------------------------------------------------------------------------------

    def stdin(self, data: bytes | None) -> None:
        """Data for the command, or None for end of input."""
        self._stdin.put_nowait(data)

    async def _feed_stdin(self) -> None:
        while True:
            data = await self._stdin.get()
            try:
                if self.master is not None:
                    await self._write_pty(b"\x04" if data is None else data)  # ^D: end of input on a terminal
                    continue
                w = self.proc.stdin
                if w is None:
                    continue
                if data is None:
                    w.close()
                    continue
                w.write(data)
                await w.drain()
            except (ConnectionError, OSError, RuntimeError):
                continue  # the command stopped reading: its input goes nowhere, like a closed pipe

    async def _write_pty(self, data: bytes) -> None:
        assert self.master is not None
        while data:
            try:
                n = os.write(self.master, data)
                data = data[n:]
            except BlockingIOError:
                await asyncio.sleep(0.01)  # the pty's input buffer is full: the command is not reading yet

    def resize(self, rows: int, cols: int) -> None:
        if self.master is not None and 0 < rows < 10000 and 0 < cols < 10000:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def signal(self, signum: int) -> None:
        if self.proc.returncode is None and signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL,
                                                       signal.SIGQUIT):
            _killpg(self.proc.pid, signum)

    # -- end ---------------------------------------------------------------------------------------

    async def wait(self) -> int:
        code = await self.proc.wait()
        try:
            await asyncio.wait_for(self.output_done.wait(), DRAIN_AFTER_EXIT)
        except asyncio.TimeoutError:
            pass  # a background child keeps the output open: the session ends with its command
        return 128 - code if code < 0 else code

    def close(self) -> None:
        if self.proc.returncode is None:  # once reaped, its pid (and group id) may belong to someone else
            _killpg(self.proc.pid, signal.SIGKILL)
        self._stdin_task.cancel()
        for t in self._pending:
            t.cancel()
        if self.master is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.master)
            except (ValueError, RuntimeError):
                pass
            os.close(self.master)
            self.master = None


LAB_PTMX = Path("/run/pts/ptmx")  # the lab kernel's own devpts (its init mounts it; the host's /dev may have none)
TIOCSPTLCK, TIOCGPTPEER = 0x40045431, 0x5441


def openpty() -> tuple[int, int]:
    try:
        return os.openpty()
    except FileNotFoundError:
        if not LAB_PTMX.exists():
            raise
    master = os.open(LAB_PTMX, os.O_RDWR | os.O_NOCTTY)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))  # unlockpt
        return master, fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        os.close(master)
        raise


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Server:
    """The lab's nodes (name -> namespace and environment) and the sessions of every stream."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.lab, self.run_id = str(info["lab"]), str(info["run"])
        self.nodes: dict[str, dict[str, Any]] = dict(info["nodes"])
        self.sessions: dict[tuple[int, int], Session] = {}

    def hello(self) -> dict[str, Any]:
        return {"lab": self.lab, "run": self.run_id, "nodes": sorted(self.nodes)}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = Stream(reader, writer)
        stream.send(jframe(T.HELLO, 0, self.hello()))
        await stream.drain()
        try:
            while not stream.closed:
                data = await reader.read(65536)
                if not data:
                    break
                for t, ch, payload in stream.decoder.feed(data):
                    await self._dispatch(stream, t, ch, payload)
                await stream.drain()
        finally:
            for key in [k for k in self.sessions if k[0] == id(stream)]:
                self.sessions.pop(key).close()
            try:
                writer.close()
            except RuntimeError:
                pass

    async def _dispatch(self, stream: Stream, t: T, ch: int, payload: bytes) -> None:
        key = (id(stream), ch)
        s = self.sessions.get(key)
        if t is T.OPEN:
            if s is not None or ch == 0:
                stream.send(jframe(T.ERROR, ch, {"message": f"channel {ch} is in use"}))
                return
            try:
                await self._open(stream, ch, jload(payload))
            except (ValueError, OSError) as e:
                stream.send(jframe(T.ERROR, ch, {"message": str(e)}))
            return
        if s is None:
            return  # a late frame for a session that has ended
        try:
            if t is T.STDIN:
                s.stdin(payload)
            elif t is T.EOF:
                s.stdin(None)
            elif t is T.RESIZE:
                d = jload(payload)
                s.resize(int(d.get("rows", 0)), int(d.get("cols", 0)))
            elif t is T.SIGNAL:
                s.signal(int(jload(payload).get("signal", 0)))
            elif t is T.CLOSE:
                self.sessions.pop(key).close()
        except (ValueError, TypeError, OSError):
            pass  # a malformed control frame is dropped; the session goes on

    async def _open(self, stream: Stream, ch: int, req: dict[str, Any]) -> None:
        node, argv = req.get("node"), req.get("argv")
        if node not in self.nodes:
            raise ValueError(f"no node {node!r} in lab {self.lab} (nodes: {', '.join(sorted(self.nodes))})")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
            raise ValueError("argv must be a non-empty list of strings")
        if len(self.sessions) >= MAX_SESSIONS:
            raise ValueError(f"too many sessions (at most {MAX_SESSIONS})")
        n = self.nodes[node]
        env = {str(k): str(v) for k, v in (n.get("env") or {}).items()}
        if isinstance(req.get("term"), str) and req["term"]:
            env["TERM"] = req["term"]
        env.setdefault("PS1", f"{node}:\\w\\$ ")  # a shell's prompt names the node
        cmd = ["ip", "netns", "exec", str(n["netns"]), *argv]
        master = None
        if req.get("tty"):
            master, slave = openpty()
            try:
                fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", int(req.get("rows") or 24),
                                                                   int(req.get("cols") or 80), 0, 0))
                os.set_blocking(master, False)
                # setsid -c: a new session whose controlling terminal is the pty (job control, ^C, resize)
                proc = await asyncio.create_subprocess_exec("setsid", "-c", *cmd, stdin=slave, stdout=slave,
                                                            stderr=slave, env=env, cwd="/")
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
        else:
            proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.PIPE,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE, env=env, cwd="/",
                                                        start_new_session=True)
        s = Session(stream, ch, proc, master)
        key = (id(stream), ch)
        self.sessions[key] = s
        s.start_output()
        asyncio.get_running_loop().create_task(self._finish(stream, key, s))

    async def _finish(self, stream: Stream, key: tuple[int, int], s: Session) -> None:
        code = await s.wait()
        if self.sessions.get(key) is s:
            stream.send(jframe(T.EXIT, key[1], {"code": code}))
            await stream.drain()
            self.sessions.pop(key).close()

    def close_all(self) -> None:
        for s in self.sessions.values():
            s.close()
        self.sessions.clear()


# -- transports ------------------------------------------------------------------------------------

def _peer_is_root_or_us(sock: socket.socket) -> bool:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


async def serve_unix(server: Server, path: Path, stop: asyncio.Event) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is None or not _peer_is_root_or_us(sock):
            writer.close()
            return
        await server.serve(reader, writer)

    old = os.umask(0o077)
    try:
        srv = await asyncio.start_unix_server(client, str(path))
    finally:
        os.umask(old)
    try:
        await stop.wait()
    finally:
        srv.close()
        path.unlink(missing_ok=True)


def open_serial(line: str) -> int:
    """The lab kernel's serial line `ssl<N>` as a raw terminal (device node made under /run, the lab
    kernel's own tmpfs: never on the host)."""
    if not line.startswith("ssl") or not line[3:].isdigit():
        raise ValueError(f"{line!r}: expected ssl<N>")
    dev = Path(f"/run/fabric-lab-{line}")
    if not dev.exists():
        os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(SERIAL_MAJOR, SERIAL_MINOR0 + int(line[3:])))
    fd = os.open(dev, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)  # 8-bit clean, no echo: the relay only writes after our HELLO, so nothing is echoed
    return fd


async def serve_serial(server: Server, fd: int, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    wfd = os.dup(fd)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                        os.fdopen(wfd, "wb", buffering=0))
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    task = loop.create_task(server.serve(reader, writer))
    await asyncio.wait([task, loop.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    task.cancel()


async def amain(args: argparse.Namespace) -> int:
    info = json.loads(Path(args.nodes).read_text())
    server = Server(info)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.listen:
            await serve_unix(server, Path(args.listen), stop)
        else:
            await serve_serial(server, open_serial(args.tty), stop)
    finally:
        server.close_all()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fabric.lab.execd", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", required=True, help="JSON: {lab, run, nodes: {name: {netns, env}}}")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", help="unix socket path")
    where.add_argument("--tty", help="the lab kernel's serial line (ssl0)")
    return asyncio.run(amain(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
