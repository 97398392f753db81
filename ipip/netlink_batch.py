"""Pipelined route writes over rtnetlink: many requests per send(), acks collected after.

pyroute2 pays Python encoding + one round trip per route (10k routes: ~8.4 s in the lab kernel,
even with asyncio.gather, vs 1.4 s for `ip -batch`). Route messages are small and fixed in shape,
so we pack them with struct and let the kernel process a whole batch per system call. Reads
(dumps) stay with pyroute2.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ipip.model import Route

NETLINK_ROUTE = 0
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_METRICS, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 8, 9, 15
RTAX_MTU = 2
RTN_UNICAST, RTN_BLACKHOLE = 1, 6
RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE = 0, 255
RTNH_F_ONLINK = 4
AF_INET = socket.AF_INET

BATCH_BYTES = 128 * 1024


def _rta(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _u32(kind: int, value: int) -> bytes:
    return _rta(kind, struct.pack("=I", value))


def encode_route(route: Route, *, op: str, seq: int, proto: int, table: int, ifindex: dict[str, int]) -> bytes:
    """One RTM_NEWROUTE (op "replace") or RTM_DELROUTE (op "delete") message."""
    attrs = [_rta(RTA_DST, route.dst.network_address.packed)]
    flags = NLM_F_REQUEST | NLM_F_ACK
    rtm_flags = 0
    if op == "delete":
        # Match by destination, table and our protocol only: the kernel then never deletes a route
        # of another owner that happens to have the same prefix.
        msg_type, rtm_type, scope = RTM_DELROUTE, 0, RT_SCOPE_NOWHERE
    else:
        msg_type, scope = RTM_NEWROUTE, RT_SCOPE_UNIVERSE
        flags |= NLM_F_CREATE | NLM_F_REPLACE
        rtm_type = RTN_BLACKHOLE if route.kind == "blackhole" else RTN_UNICAST
        if route.kind != "blackhole":
            if len(route.nexthops) == 1:
                nh = route.nexthops[0]
                attrs.append(_rta(RTA_GATEWAY, nh.gateway.packed))
                attrs.append(_u32(RTA_OIF, ifindex[nh.device]))
                if nh.onlink:
                    rtm_flags |= RTNH_F_ONLINK
            else:
                hops = b""
                for nh in route.nexthops:
                    gw = _rta(RTA_GATEWAY, nh.gateway.packed)
                    hops += struct.pack("=HBBi", 8 + len(gw), RTNH_F_ONLINK if nh.onlink else 0, 0,
                                        ifindex[nh.device]) + gw
                attrs.append(_rta(RTA_MULTIPATH, hops))
        if route.mtu:
            attrs.append(_rta(RTA_METRICS, _u32(RTAX_MTU, route.mtu)))
    if table > 255:
        attrs.append(_u32(RTA_TABLE, table))
    rtm = struct.pack("=BBBBBBBBI", AF_INET, route.dst.prefixlen, 0, 0, table if table < 256 else 252,
                      proto, scope, rtm_type, rtm_flags)
    body = rtm + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


@dataclass(frozen=True)
class WriteError:
    route: Route
    op: str
    error: str


class RouteWriter:
    """Sends route changes in pipelined batches on one rtnetlink socket (of the current netns)."""

    def __init__(self, proto: int, table: int) -> None:
        self.proto = proto
        self.table = table
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock.bind((0, 0))
        self._seq = 1

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "RouteWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def apply(self, ops: Iterable[tuple[str, Route]], ifindex: dict[str, int]) -> list[WriteError]:
        """Apply ("delete"|"replace", route) in order. Deleting a route that is already gone is fine.
        Returns the failures; never raises for one bad route."""
        errors: list[WriteError] = []
        batch: list[tuple[int, str, Route]] = []
        buf = bytearray()
        for op, route in ops:
            try:
                msg = encode_route(route, op=op, seq=self._seq, proto=self.proto, table=self.table, ifindex=ifindex)
            except KeyError as e:
                errors.append(WriteError(route, op, f"device {e.args[0]} does not exist"))
                continue
            batch.append((self._seq, op, route))
            self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
            buf += msg
            if len(buf) >= BATCH_BYTES:
                errors += self._flush(buf, batch)
                buf, batch = bytearray(), []
        if batch:
            errors += self._flush(buf, batch)
        return errors

    def _flush(self, buf: bytearray, batch: Sequence[tuple[int, str, Route]]) -> list[WriteError]:
        self._sock.send(bytes(buf))
        pending = {seq: (op, route) for seq, op, route in batch}
        errors: list[WriteError] = []
        while pending:
            data = self._sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _flags, seq, _pid = struct.unpack_from("=IHHII", data, off)
                if length < 16:
                    break
                if mtype == NLMSG_ERROR and seq in pending:
                    (code,) = struct.unpack_from("=i", data, off + 16)
                    op, route = pending.pop(seq)
                    if code < 0 and not (op == "delete" and -code in (errno.ESRCH, errno.ENOENT)):
                        errors.append(WriteError(route, op, os.strerror(-code)))
                off += (length + 3) & ~3
        return errors
