"""`fabric lab exec [--lab NAME] [-t|-T] NODE [-- COMMAND ...]` and `fabric lab ls`: enter a running lab.

Finds the lab's socket under /run/fabric-lab (a lab in the lab kernel: the relay of the `fabric lab run`
that booted it; a lab on a capable kernel: its exec server), opens one session and pumps stdin,
stdout and stderr until the command exits; returns its exit status. Without a command it starts an
interactive shell. Like ssh, a pty is used when there is no command and stdin is a terminal (-t
forces one, -T refuses one); the local terminal is raw meanwhile and its size follows SIGWINCH.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import termios
import threading
import tty
from pathlib import Path
from typing import Any

from fabric.lab.relay import SOCKET_DIR, lab_of
from fabric.lab.wire import Decoder, T, frame, jframe, jload

EXIT_LAB_ERROR = 125  # as `docker exec`: the command did not run (no lab, no node, lab ended)
CONNECT_TIMEOUT = 5.0
SHELL = ["sh", "-c", 'if command -v bash >/dev/null; then exec bash --norc -i; else exec sh -i; fi']


class ExecError(Exception):
    pass


def sockets(lab: str | None = None) -> list[Path]:
    found = sorted(SOCKET_DIR.glob("*@*.sock")) if SOCKET_DIR.is_dir() else []
    return [p for p in found if lab is None or lab in (lab_of(p), p.stem)]  # NAME, or NAME@TAG for one run


def _answers(path: Path) -> bool:
    try:
        _connect(path).close()
        return True
    except ExecError:
        return False


def find_socket(lab: str | None) -> Path:
    # a socket nobody listens on is left by a lab that was killed: skipped (not removed: not ours to judge)
    found = [p for p in sockets(lab) if _answers(p)]
    if not found:
        raise ExecError(f"no running lab{' ' + repr(lab) if lab else ''} (nothing answers in {SOCKET_DIR}); "
                        "start one with `fabric lab run TOPOLOGY --keep`")
    if len(found) > 1:
        names = ", ".join(sorted({lab_of(p) for p in found}))
        raise ExecError(f"several labs are running ({names}): choose one with --lab"
                        if lab is None else f"several runs of lab {lab!r}: choose one with --lab "
                        + " or --lab ".join(p.stem for p in found))
    return found[0]


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CONNECT_TIMEOUT)
    try:
        s.connect(str(path))
    except OSError as e:
        s.close()
        raise ExecError(f"{path}: {e.strerror or e} (a lab that ended without cleaning up?)") from None
    s.settimeout(None)
    return s


def hello(path: Path) -> dict[str, Any]:
    """The lab's HELLO (name, run, nodes) from one short connection."""
    with _connect(path) as s:
        s.settimeout(CONNECT_TIMEOUT)
        d = Decoder()
        while True:
            try:
                data = s.recv(65536)
            except TimeoutError:
                raise ExecError(f"{path}: no answer from the lab") from None
            if not data:
                raise ExecError(f"{path}: the lab closed the connection")
            for t, _, payload in d.feed(data):
                if t is T.HELLO:
                    return jload(payload)
                if t is T.ERROR:
                    raise ExecError(str(jload(payload).get("message", "error")))


def list_labs() -> int:
    found = sockets()
    if not found:
        print(f"no running lab (nothing in {SOCKET_DIR})")
        return 0
    for p in found:
        try:
            h = hello(p)
            print(f"{p.stem} (lab {h.get('lab')}, run {h.get('run')}): {' '.join(h.get('nodes', []))}")
        except ExecError as e:
            print(f"{lab_of(p)}: {e}")
    return 0


async def _session(path: Path, node: str, argv: list[str], use_tty: bool) -> int:
    reader, writer = await asyncio.open_unix_connection(str(path))
    loop = asyncio.get_running_loop()
    decoder = Decoder()
    rows, cols = _size()
    opened = False
    code: int | None = None
    stdin_fd = sys.stdin.fileno()

    def send(t: T, payload: bytes = b"") -> None:
        if not writer.is_closing():
            writer.write(frame(t, 1, payload))

    def pump_stdin() -> None:  # a thread: stdin may be a file, which no event loop can watch
        while True:
            try:
                data = os.read(stdin_fd, 65536)
            except OSError:
                data = b""
            loop.call_soon_threadsafe(send, T.STDIN if data else T.EOF, data)
            if not data:
                return

    if use_tty:
        loop.add_signal_handler(signal.SIGWINCH, lambda: send(T.RESIZE, _resize_payload()))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, lambda sig=sig: writer.write(jframe(T.SIGNAL, 1, {"signal": int(sig)})))
    out, err = sys.stdout.buffer, sys.stderr.buffer
    while code is None:
        data = await reader.read(65536)
        if not data:
            raise ExecError("the lab closed the connection (it has ended?)")
        for t, _, payload in decoder.feed(data):
            if t is T.HELLO and not opened:
                nodes = jload(payload).get("nodes", [])
                if node not in nodes:
                    raise ExecError(f"no node {node!r} in lab {jload(payload).get('lab')} "
                                    f"(nodes: {', '.join(nodes)})")
                writer.write(jframe(T.OPEN, 1, {"node": node, "argv": argv, "tty": use_tty, "rows": rows,
                                                "cols": cols, "term": os.environ.get("TERM", "xterm")}))
                opened = True
                threading.Thread(target=pump_stdin, daemon=True).start()
            elif t in (T.STDOUT, T.STDERR):
                try:
                    (out if t is T.STDOUT else err).write(payload)
                    (out if t is T.STDOUT else err).flush()
                except BrokenPipeError:  # our reader went away (`| head`): end as a shell pipeline would
                    writer.close()
                    return 128 + signal.SIGPIPE
            elif t is T.EXIT:
                code = int(jload(payload).get("code", 1))
            elif t is T.ERROR:
                raise ExecError(str(jload(payload).get("message", "error")))
    writer.close()
    return code


def _size() -> tuple[int, int]:
    """The terminal's own size (as ssh asks it; $LINES/$COLUMNS may be stale), else 24x80."""
    for fd in (sys.stdout.fileno(), sys.stdin.fileno()):
        try:
            s = os.get_terminal_size(fd)
            return s.lines, s.columns
        except OSError:
            continue
    return 24, 80


def _resize_payload() -> bytes:
    rows, cols = _size()
    return f'{{"rows":{rows},"cols":{cols}}}'.encode()


def main(args: argparse.Namespace) -> int:
    if args.lab_cmd == "ls":
        return list_labs()
    argv = list(args.command) or SHELL
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    use_tty = args.tty if args.tty is not None else (not args.command and interactive)
    try:
        path = find_socket(args.lab)
        saved = None
        if use_tty and sys.stdin.isatty():
            saved = termios.tcgetattr(sys.stdin.fileno())
            tty.setraw(sys.stdin.fileno())
        try:
            code = asyncio.run(_session(path, args.node, argv, use_tty))
            if code == 128 + signal.SIGPIPE:  # nothing more may reach the closed pipe, not even at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return code
        finally:
            if saved is not None:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
    except (ExecError, OSError) as e:
        print(f"fabric lab exec: {e}", file=sys.stderr)
        return EXIT_LAB_ERROR
