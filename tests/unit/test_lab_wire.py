"""The `fabric lab exec` wire format: frames survive any split, line noise is skipped, corrupt lengths don't
swallow the stream; the exec client finds the one live lab socket."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

import pytest

from fabric.lab import exec_client, relay
from fabric.lab.wire import HEADER, MAGIC, MAX_PAYLOAD, Decoder, T, frame, jframe, jload


def test_frames_round_trip_through_any_split() -> None:
    frames = [(T.HELLO, 0, b'{"lab":"x"}'), (T.STDOUT, 7, bytes(range(256)) * 50), (T.EOF, 7, b""),
              (T.EXIT, 7, b'{"code":3}'), (T.STDIN, 2**32 - 1, bytes([MAGIC]) * 9)]
    data = b"".join(frame(t, ch, p) for t, ch, p in frames)
    rng = random.Random(4)
    for _ in range(50):
        d, got, i = Decoder(), [], 0
        while i < len(data):
            n = rng.randint(1, 700)
            got += d.feed(data[i:i + n])
            i += n
        assert got == frames and d.dropped == 0


def test_noise_is_skipped_and_a_corrupt_header_does_not_swallow_the_stream() -> None:
    d = Decoder()
    bad_len = HEADER.pack(MAGIC, int(T.STDOUT), 1, MAX_PAYLOAD + 1)
    bad_type = HEADER.pack(MAGIC, 99, 1, 3) + b"abc"
    out = d.feed(b"login: \r\n" + bad_len + bad_type + frame(T.STDOUT, 1, b"ok") + b"\x00\x01")
    assert out == [(T.STDOUT, 1, b"ok")]
    assert d.dropped > 0
    assert d.feed(frame(T.EXIT, 1, b"{}")) == [(T.EXIT, 1, b"{}")]


def test_json_payloads() -> None:
    (t, ch, p), = Decoder().feed(jframe(T.OPEN, 1, {"node": "h1", "argv": ["true"]}))
    assert (t, ch, jload(p)) == (T.OPEN, 1, {"node": "h1", "argv": ["true"]})
    with pytest.raises(ValueError):
        jload(b"[1]")
    with pytest.raises(ValueError):
        frame(T.STDOUT, 1, b"x" * (MAX_PAYLOAD + 1))


def test_socket_names_carry_the_lab_name() -> None:
    p = relay.socket_path("two-racks.v2", "1234")
    assert p.name == "two-racks.v2@1234.sock" and relay.lab_of(p) == "two-racks.v2"


def test_the_client_picks_the_one_live_lab_and_skips_dead_sockets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(exec_client, "SOCKET_DIR", tmp_path)
    with pytest.raises(exec_client.ExecError, match="no running lab"):
        exec_client.find_socket(None)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "old@1.sock"))
    dead.close()  # a socket file nobody listens on: a lab that was killed
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "lab@2.sock"))
    live.listen()
    try:
        assert exec_client.find_socket(None) == tmp_path / "lab@2.sock"
        with pytest.raises(exec_client.ExecError, match="no running lab 'old'"):
            exec_client.find_socket("old")
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(tmp_path / "other@3.sock"))
        other.listen()
        with pytest.raises(exec_client.ExecError, match=r"several labs are running \(lab, other\)"):
            exec_client.find_socket(None)
        assert exec_client.find_socket("other") == tmp_path / "other@3.sock"
        again = socket.socket(socket.AF_UNIX)
        again.bind(str(tmp_path / "other@4.sock"))
        again.listen()
        with pytest.raises(exec_client.ExecError, match="choose one with --lab other@3 or --lab other@4"):
            exec_client.find_socket("other")
        assert exec_client.find_socket("other@4") == tmp_path / "other@4.sock"
        again.close()
        other.close()
    finally:
        live.close()


class FakeLine:
    """The lab kernel's side of the serial line, played by the test: frames in, frames out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.decoder, self.got = sock, Decoder(), []
        sock.settimeout(5)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def expect(self, n: int) -> list:
        while len(self.got) < n:
            self.got += self.decoder.feed(self.sock.recv(65536))
        out, self.got = self.got[:n], self.got[n:]
        return out


def client_frames(c: socket.socket, n: int) -> list:
    d, got = Decoder(), []
    c.settimeout(5)
    while len(got) < n:
        data = c.recv(65536)
        if not data:
            break
        got += d.feed(data)
    return got


def test_relay_multiplexes_clients_on_the_line_and_cleans_up(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    path = tmp_path / "lab@1.sock"
    r = relay.Relay(ours, path)
    r.start()
    line = FakeLine(theirs)
    try:
        # before the lab's exec server said HELLO: refused, nothing written to the line
        early = socket.socket(socket.AF_UNIX)
        early.connect(str(path))
        (t, ch, p), = client_frames(early, 1)
        assert t is T.ERROR and "still being built" in jload(p)["message"]
        early.close()
        line.send(jframe(T.HELLO, 0, {"lab": "lab", "run": "ab12", "nodes": ["h1", "h2"]}))
        deadline = time.monotonic() + 5
        while r.hello is None and time.monotonic() < deadline:
            time.sleep(0.01)
        a, b = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
        for c in (a, b):
            c.connect(str(path))
            (t, _, p), = client_frames(c, 1)
            assert t is T.HELLO and jload(p)["nodes"] == ["h1", "h2"]
        # both clients use channel 1; on the line they get channels of their own
        a.sendall(jframe(T.OPEN, 1, {"node": "h1", "argv": ["true"]}))
        (t, ch_a, _), = line.expect(1)
        b.sendall(jframe(T.OPEN, 1, {"node": "h2", "argv": ["cat"]}) + frame(T.STDIN, 1, b"x"))
        (t1, ch_b, _), (t2, ch_b2, data) = line.expect(2)
        assert t1 is T.OPEN and t2 is T.STDIN and ch_b == ch_b2 != ch_a and data == b"x"
        # answers go back to the right client, on its own channel number
        line.send(frame(T.STDOUT, ch_b, b"for b") + jframe(T.EXIT, ch_a, {"code": 0}))
        assert client_frames(a, 1) == [(T.EXIT, 1, b'{"code":0}')]
        assert client_frames(b, 1) == [(T.STDOUT, 1, b"for b")]
        # a client that goes away: its session is closed on the line (the lab kills its command)
        b.close()
        assert line.expect(1) == [(T.CLOSE, ch_b, b"")]
        # the lab kernel ends: a connected client is told, the socket file goes
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(path))
        client_frames(c, 1)
        c.sendall(jframe(T.OPEN, 1, {"node": "h1", "argv": ["sleep", "9"]}))
        line.expect(1)
        theirs.close()
        (t, _, p), = client_frames(c, 1)
        assert t is T.ERROR and "ended" in jload(p)["message"]
        deadline = time.monotonic() + 5
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not path.exists()
    finally:
        r.stop()
        theirs.close()
    assert not path.exists()
