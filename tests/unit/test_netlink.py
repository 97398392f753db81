"""The shared netlink plumbing: bounded waits (finding 6), pipelined acks, the monitor socket."""

from __future__ import annotations

import errno
import struct
import time

import pytest

from ipip import netlink as nl


class SilentKernel:
    """A socket the kernel never answers on: every recv times out."""

    def __init__(self, answers: list[bytes] | None = None) -> None:
        self.sent: list[bytes] = []
        self.answers = list(answers or [])

    def sendto(self, data: bytes, addr: object) -> None:
        self.sent.append(data)

    def recv(self, n: int) -> bytes:
        if self.answers:
            return self.answers.pop(0)
        raise TimeoutError("timed out")

    def gettimeout(self) -> float:
        return 5.0


def ack(seq: int, err: int = 0) -> bytes:
    return struct.pack("=IHHII", 20, nl.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -err)


def test_pipeline_reports_unanswered_requests_as_timed_out() -> None:
    msgs = [(nl.header(24, nl.NLM_F_ACK, s, b"x" * 12), s, f"op{s}") for s in range(1, 5)]
    sock = SilentKernel([ack(1), ack(2, errno.EEXIST)])
    errs = nl.pipeline(sock, msgs)  # type: ignore[arg-type]
    assert errs == [("op2", errno.EEXIST), ("op3", errno.ETIMEDOUT), ("op4", errno.ETIMEDOUT)]


def test_request_raises_a_named_timeout() -> None:
    with pytest.raises(TimeoutError, match="route dump: no answer from the kernel within 5 s"):
        nl.request(SilentKernel(), b"", 1, "route dump")  # type: ignore[arg-type]


def test_a_real_socket_times_out_instead_of_hanging() -> None:
    s = nl.open_netlink(nl.NETLINK_ROUTE, timeout=0.2)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="nothing: no answer"):
            nl._recv(s, "nothing")  # no request sent: nothing will come
        assert time.monotonic() - t0 < 1.0
    finally:
        s.close()


def test_the_monitor_socket_never_blocks() -> None:
    """An empty monitor returns at once (a socket timeout there blocked the event loop for 5 s)."""
    s = nl.open_monitor(0)
    try:
        t0 = time.monotonic()
        assert nl.drain(s) == []
        assert time.monotonic() - t0 < 0.2
    finally:
        s.close()


def _flags(sent: bytes) -> list[tuple[int, int]]:
    out, off = [], 0
    while off < len(sent):
        ln, _typ, fl, seq, _pid = struct.unpack_from("=IHHII", sent, off)
        out.append((seq, fl & nl.NLM_F_ACK))
        off += ln
    return out


def test_errors_only_asks_one_ack_per_send_and_reports_the_refusals() -> None:
    """Only the last request of each send asks for an ack; a refusal comes whatever the flags; the last
    one's answer closes the send: the requests not refused before it went through."""
    msgs = [(nl.header(24, nl.NLM_F_ACK, s, b"x" * 12), s, f"op{s}") for s in range(1, 7)]
    sock = SilentKernel([ack(2, errno.EEXIST), ack(3), ack(5, errno.ENODEV) + ack(6)])
    errs = nl.pipeline(sock, msgs, chunk=3 * 28, errors_only=True)  # type: ignore[arg-type]
    assert errs == [("op2", errno.EEXIST), ("op5", errno.ENODEV)]
    assert [_flags(s) for s in sock.sent] == [[(1, 0), (2, 0), (3, nl.NLM_F_ACK)], [(4, 0), (5, 0), (6, nl.NLM_F_ACK)]]


def test_errors_only_a_refused_last_request_closes_the_send_too() -> None:
    msgs = [(nl.header(24, 0, s, b"x" * 12), s, f"op{s}") for s in range(1, 4)]
    sock = SilentKernel([ack(3, errno.EINVAL)])
    assert nl.pipeline(sock, msgs, errors_only=True) == [("op3", errno.EINVAL)]  # type: ignore[arg-type]


def test_errors_only_unanswered_requests_are_timed_out_not_assumed_written() -> None:
    msgs = [(nl.header(24, nl.NLM_F_ACK, s, b"x" * 12), s, f"op{s}") for s in range(1, 5)]
    sock = SilentKernel([ack(2, errno.EEXIST)])  # then nothing: not even the last request's ack
    errs = nl.pipeline(sock, msgs, errors_only=True)  # type: ignore[arg-type]
    assert errs == [("op2", errno.EEXIST), ("op1", errno.ETIMEDOUT), ("op3", errno.ETIMEDOUT),
                    ("op4", errno.ETIMEDOUT)]
