"""The `fabric lab exec` wire format: frames survive any split, line noise is skipped, corrupt lengths don't
swallow the stream; the exec client finds the one live lab socket."""

from __future__ import annotations

import random
import socket
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
