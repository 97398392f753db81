"""Netlink plumbing shared by every adapter that talks to the kernel (routes, addresses, links, IPVS).

One module, so there is one way to: open a socket whose every receive has a deadline, pipeline many
requests per send and collect their acks after (the kernel processes a batch in order and queues one
ack each; one refused request does not stop the others), ask one request or dump and read its answers,
and encode/decode attributes. Messages are packed with struct: encoding through pyroute2's message
classes costs more per message than the kernel's own work (measured, docs/benchmarks.md).

Nothing here waits without a bound: a socket from `open_netlink` raises TimeoutError when the kernel
does not answer within its timeout; `pipeline` then reports every unanswered request as ETIMEDOUT.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Sequence
from typing import TypeVar

NETLINK_ROUTE, NETLINK_GENERIC = 0, 16
NLM_F_REQUEST, NLM_F_ACK, NLM_F_ROOT, NLM_F_MATCH = 0x1, 0x4, 0x100, 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

RECV_TIMEOUT = 5.0  # seconds one receive may wait for the kernel's next answer
CHUNK_BYTES = 32 * 1024  # requests per send; far below the socket's send buffer

T = TypeVar("T")


def open_netlink(proto: int, timeout: float = RECV_TIMEOUT, *, rcvbuf: int = 1 << 20, sndbuf: int | None = None,
                 groups: int = 0) -> socket.socket:
    """A bound netlink socket of the current namespace whose receives (and sends) give up after `timeout`.
    `groups`: multicast groups to listen to (a monitor); 0 for requests."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, proto)
    try:
        s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # acks carry only the header, not our request back
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        s.bind((0, groups))
        s.settimeout(timeout)
    except BaseException:
        s.close()
        raise
    return s


class Sequence32:
    """Sequence numbers of one socket (never 0)."""

    def __init__(self) -> None:
        self.value = 0

    def next(self) -> int:
        self.value = (self.value + 1) & 0xFFFFFFFF or 1
        return self.value


def nla(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def nla_u32(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=I", value))


def attrs(buf: bytes, offset: int = 0) -> dict[int, bytes]:
    """Attributes of a message body from `offset` (type without flag bits -> payload; last one wins)."""
    out: dict[int, bytes] = {}
    off = offset
    while off + 4 <= len(buf):
        n, t = struct.unpack_from("=HH", buf, off)
        if n < 4:
            break
        out[t & NLA_TYPE_MASK] = buf[off + 4:off + n]
        off += (n + 3) & ~3
    return out


def attr_list(buf: bytes, offset: int = 0) -> list[tuple[int, bytes]]:
    """Like attrs() but keeps repeated types, in order."""
    out: list[tuple[int, bytes]] = []
    off = offset
    while off + 4 <= len(buf):
        n, t = struct.unpack_from("=HH", buf, off)
        if n < 4:
            break
        out.append((t & NLA_TYPE_MASK, buf[off + 4:off + n]))
        off += (n + 3) & ~3
    return out


def header(typ: int, flags: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), typ, NLM_F_REQUEST | flags, seq, 0) + body


def _recv(sock: socket.socket, what: str) -> bytes:
    try:
        return sock.recv(1 << 20)
    except TimeoutError:
        raise TimeoutError(errno.ETIMEDOUT, f"{what}: no answer from the kernel within {sock.gettimeout():g} s") \
            from None


def request(sock: socket.socket, msg: bytes, seq: int, what: str) -> list[tuple[int, bytes]]:
    """Send one request (a get/set with NLM_F_ACK, or a dump) and return its answers as (type, body after
    the netlink header) until the ack or NLMSG_DONE. Raises OSError with the kernel's errno, and
    TimeoutError naming `what` when the kernel does not answer within the socket's timeout."""
    sock.sendto(msg, (0, 0))
    out: list[tuple[int, bytes]] = []
    while True:
        data = _recv(sock, what)
        off = 0
        while off + 16 <= len(data):
            ln, typ, _fl, mseq, _pid = struct.unpack_from("=IHHII", data, off)
            if mseq == seq:
                if typ == NLMSG_DONE:
                    return out
                if typ == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    if err:
                        raise OSError(-err, f"{what}: {os.strerror(-err)}")
                    return out
                out.append((typ, data[off + 16:off + ln]))
            off += (ln + 3) & ~3 if ln else len(data)


def pipeline(sock: socket.socket, msgs: Sequence[tuple[bytes, int, T]], chunk: int = CHUNK_BYTES, *,
             errors_only: bool = False) -> list[tuple[T, int]]:
    """Send requests (bytes, seq, tag) many per send and collect their acks after each chunk.

    Returns (tag, errno) for every request the kernel refused; the others went through. When the kernel
    stops answering (the socket's timeout), the unanswered requests and the unsent rest get ETIMEDOUT.

    `errors_only`: only the last request of each send asks for an ack (NLM_F_ACK is cleared on the
    others, set on it). The kernel answers every refused request whatever its flags, in order, while it
    processes the send (rtnetlink and generic netlink run a request in the sender's sendmsg), so the
    last one's answer closes the chunk: what was not refused before it went through. One answer per
    send instead of one per request: in the lab kernel, receiving 10,000 acks cost 30x the 10,000 route
    inserts themselves (docs/benchmarks.md)."""
    errors: list[tuple[T, int]] = []
    i = 0
    while i < len(msgs):
        buf: list[bytes] = []
        pending: dict[int, T] = {}
        size = 0
        while i < len(msgs) and size < chunk:
            data, seq, tag = msgs[i]
            buf.append(data)
            pending[seq] = tag
            size += len(data)
            i += 1
        try:
            if errors_only:
                sock.sendto(_ack_last(buf), (0, 0))
                _collect(sock, pending, errors, msgs[i - 1][1])
            else:
                sock.sendto(b"".join(buf), (0, 0))
                _collect(sock, pending, errors)
        except TimeoutError:
            return errors + [(tag, errno.ETIMEDOUT) for tag in pending.values()] \
                + [(tag, errno.ETIMEDOUT) for _, _, tag in msgs[i:]]
    return errors


def _ack_last(parts: list[bytes]) -> bytearray:
    """The requests joined, NLM_F_ACK on the last one only (the flags are bytes 6-7 of each header)."""
    out = bytearray(b"".join(parts))
    off = 0
    for n, p in enumerate(parts):
        (flags,) = struct.unpack_from("=H", out, off + 6)
        flags = flags | NLM_F_ACK if n == len(parts) - 1 else flags & ~NLM_F_ACK
        struct.pack_into("=H", out, off + 6, flags)
        off += len(p)
    return out


def _collect(sock: socket.socket, pending: dict[int, T], errors: list[tuple[T, int]], last: int | None = None) -> None:
    """Read answers until every pending request has one (taking each off `pending`). With `last` (requests
    that asked only for refusals, and the last one for its ack): until the answer to `last`; then every
    request still pending went through."""
    while pending:
        data = _recv(sock, "acks")
        off = 0
        while off + 16 <= len(data):
            ln, typ, _fl, seq, _pid = struct.unpack_from("=IHHII", data, off)
            if typ == NLMSG_ERROR and seq in pending:
                (err,) = struct.unpack_from("=i", data, off + 16)
                tag = pending.pop(seq)
                if err:
                    errors.append((tag, -err))
                if seq == last:
                    pending.clear()
            off += (ln + 3) & ~3 if ln else len(data)


SO_RCVBUFFORCE, SO_ATTACH_FILTER = 33, 26


def open_monitor(groups: int, *, rcvbuf: int = 1 << 20) -> socket.socket:
    """A non-blocking socket listening to rtnetlink multicast `groups` (for an event loop's reader).
    The receive buffer is forced to `rcvbuf` when we may (root), so a burst of events is not dropped."""
    s = open_netlink(NETLINK_ROUTE, rcvbuf=rcvbuf, groups=groups)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except OSError:
        pass  # not privileged: SO_RCVBUF's (capped) value stands
    s.setblocking(False)  # a socket timeout would make an empty recv wait out the timeout
    return s


def ignore_sender(sock: socket.socket, portid: int) -> None:
    """Drop, in the kernel, the notifications caused by requests of the socket `portid` (they carry its
    port id): a monitor then never queues the echo of our own writes (10,000 routes written would be
    10,000 notifications to read and could overrun its buffer). A classic BPF socket filter."""
    import ctypes

    be = struct.unpack(">I", struct.pack("=I", portid))[0]  # BPF_ABS loads are big-endian
    prog = [(0x20, 0, 0, 12),  # ld [12]: nlmsg_pid
            (0x15, 0, 1, be),  # jeq portid -> drop
            (0x06, 0, 0, 0),  # ret 0 (drop)
            (0x06, 0, 0, 0xFFFFFFFF)]  # ret all
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in prog))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", len(prog), ctypes.addressof(code)))


def drain(sock: socket.socket) -> list[tuple[int, int, int, bytes]]:
    """Every message queued on a non-blocking monitor socket: (type, flags, sender port id, body); []
    when none. A notification caused by a request carries the requester's port id and the request's
    flags (NLM_F_REPLACE for a replace). An overrun (ENOBUFS: the kernel dropped notifications) is
    reported as one (NLMSG_ERROR, 0, 0, b"")."""
    out: list[tuple[int, int, int, bytes]] = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                out.append((NLMSG_ERROR, 0, 0, b""))
                continue
            raise
        off = 0
        while off + 16 <= len(data):
            ln, typ, fl, _seq, pid = struct.unpack_from("=IHHII", data, off)
            if ln < 16:
                break
            out.append((typ, fl, pid, data[off + 16:off + ln]))
            off += (ln + 3) & ~3
