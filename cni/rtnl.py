"""Just the rtnetlink messages a pod attachment needs, over ipip.netlink's sockets (deadlines, pipelining).

The plumbing (sockets whose receives have deadlines, pipelined acks, requests and dumps, attribute
encoding) is ipip.netlink, the project's one netlink module; this module adds the messages a pod
needs (a veth pair whose peer is created in another namespace, addresses, routes, a permanent
neighbour) and their decoding. One `Rtnl` wraps one NETLINK_ROUTE socket: the agent's own (host side)
or one the plugin created inside a pod's namespace and passed over its unix socket (pod side). A
kernel refusal is an OSError with its errno; no answer within the timeout is a TimeoutError.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from ipip import netlink as nl
from ipip.netlink import NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NETLINK_ROUTE  # noqa: F401

NETLINK_GET_STRICT_CHK = 12
NLM_F_ACK = nl.NLM_F_ACK

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 4, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
NLA_F_NESTED = 0x8000

IFF_UP = 0x1
RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTN_UNICAST = 1
NUD_PERMANENT = 0x80

_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")

attr = nl.nla
attr_u32 = nl.nla_u32
parse_attrs = nl.attrs


def attr_str(kind: int, s: str) -> bytes:
    return attr(kind, s.encode() + b"\0")


def mac_text(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    flags: int
    mtu: int
    mac: str
    kind: str | None


@dataclass(frozen=True)
class RouteEntry:
    dst: ipaddress.IPv4Network
    oif: int | None
    gateway: ipaddress.IPv4Address | None
    proto: int
    scope: int
    table: int


@dataclass(frozen=True)
class AddrEntry:
    index: int
    address: ipaddress.IPv4Interface


@dataclass(frozen=True)
class NeighEntry:
    index: int
    dst: ipaddress.IPv4Address
    lladdr: str
    state: int


class Rtnl:
    """One NETLINK_ROUTE socket. `Rtnl()` opens one in the current namespace; `Rtnl(fileno=fd)`
    adopts a socket opened elsewhere (a pod's namespace) and closes it when closed."""

    def __init__(self, fileno: int | None = None, *, timeout: float = nl.RECV_TIMEOUT) -> None:
        if fileno is None:
            self.sock = nl.open_netlink(NETLINK_ROUTE, timeout)
        else:  # a socket made in another namespace: give it what open_netlink gives ours
            self.sock = socket.socket(fileno=fileno)
            try:
                if self.sock.family != socket.AF_NETLINK:
                    raise ValueError("not a netlink socket")
                self.sock.setsockopt(nl.SOL_NETLINK, nl.NETLINK_CAP_ACK, 1)
                self.sock.bind((0, 0))
                self.sock.settimeout(timeout)
            except BaseException:
                self.sock.close()
                raise
        try:  # the kernel filters dumps by the header's fields (routes by protocol, addresses by index)
            self.sock.setsockopt(nl.SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        except OSError:
            pass
        self._seq = nl.Sequence32()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing (ipip.netlink) -------------------------------------------------------------------

    def request(self, requests: list[tuple[int, int, bytes, str]], *, ok_errnos: tuple[int, ...] = ()) -> None:
        """Send several requests (type, flags, body, what) in one write and wait for every ack; raises
        OSError for the first refusal not in `ok_errnos` (TimeoutError when the kernel does not answer)."""
        msgs = []
        for mtype, flags, body, what in requests:
            seq = self._seq.next()
            msgs.append((nl.header(mtype, flags | NLM_F_ACK, seq, body), seq, what))
        for what, code in nl.pipeline(self.sock, msgs):
            if code not in ok_errnos:
                if code == errno.ETIMEDOUT:
                    raise TimeoutError(code, f"{what}: no answer from the kernel")
                raise OSError(code, f"{what}: {os.strerror(code)}")

    def dump(self, mtype: int, body: bytes) -> list[tuple[int, bytes]]:
        seq = self._seq.next()
        return nl.request(self.sock, nl.header(mtype, NLM_F_DUMP, seq, body), seq, f"dump {mtype}")

    def get(self, mtype: int, body: bytes, what: str) -> bytes | None:
        """One get request; its answer's body, or None when the kernel says it does not exist."""
        seq = self._seq.next()
        try:
            out = nl.request(self.sock, nl.header(mtype, NLM_F_ACK, seq, body), seq, what)
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENOENT, errno.ESRCH):
                return None
            raise
        return out[0][1] if out else None

    # -- links -------------------------------------------------------------------------------------

    @staticmethod
    def _link(payload: bytes) -> Link:
        _family, _type, index, flags, _change = _IFINFO.unpack_from(payload, 0)
        a = parse_attrs(payload, _IFINFO.size)
        kind = None
        if IFLA_LINKINFO in a:
            info = parse_attrs(a[IFLA_LINKINFO])
            if IFLA_INFO_KIND in info:
                kind = info[IFLA_INFO_KIND].rstrip(b"\0").decode()
        return Link(index=index, name=a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(), flags=flags,
                    mtu=struct.unpack("=I", a[IFLA_MTU])[0] if IFLA_MTU in a else 0,
                    mac=mac_text(a.get(IFLA_ADDRESS, b"")), kind=kind)

    def link(self, name: str) -> Link | None:
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_str(IFLA_IFNAME, name)
        payload = self.get(RTM_GETLINK, body, f"get link {name}")
        return self._link(payload) if payload is not None else None

    def links(self) -> list[Link]:
        return [self._link(p) for t, p in self.dump(RTM_GETLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0))
                if t == RTM_NEWLINK]

    @staticmethod
    def veth_body(name: str, peer: str, *, mtu: int, mac: bytes | None, peer_netns_fd: int) -> bytes:
        """RTM_NEWLINK body of a veth pair, this end up, the peer created straight in another netns.
        (The peer can't be brought up in the same message: the kernel opens it before the pair is joined
        and refuses with ENOTCONN. Set it up afterwards through a socket in its namespace.)"""
        peer_msg = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_str(IFLA_IFNAME, peer) + \
            attr_u32(IFLA_MTU, mtu) + attr_u32(IFLA_NET_NS_FD, peer_netns_fd)
        linkinfo = attr(IFLA_INFO_KIND, b"veth") + \
            attr(IFLA_INFO_DATA | NLA_F_NESTED, attr(VETH_INFO_PEER | NLA_F_NESTED, peer_msg))
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, IFF_UP, IFF_UP) + attr_str(IFLA_IFNAME, name) + \
            attr_u32(IFLA_MTU, mtu) + attr(IFLA_LINKINFO | NLA_F_NESTED, linkinfo)
        if mac is not None:
            body += attr(IFLA_ADDRESS, mac)
        return body

    @staticmethod
    def up_body(index: int) -> bytes:
        return _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)

    @staticmethod
    def del_link_body(name: str) -> bytes:
        return _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_str(IFLA_IFNAME, name)

    # -- addresses, routes, neighbours -------------------------------------------------------------

    @staticmethod
    def addr_body(index: int, address: ipaddress.IPv4Interface) -> bytes:
        return _IFADDR.pack(socket.AF_INET, address.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index) + \
            attr(IFA_LOCAL, address.ip.packed) + attr(IFA_ADDRESS, address.ip.packed)

    def addrs(self, index: int) -> list[AddrEntry]:
        out = []
        for t, p in self.dump(RTM_GETADDR, _IFADDR.pack(socket.AF_INET, 0, 0, 0, index)):
            family, plen, _flags, _scope, idx = _IFADDR.unpack_from(p, 0)
            a = parse_attrs(p, _IFADDR.size)
            ip = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
            if family == socket.AF_INET and idx == index and ip:
                out.append(AddrEntry(idx, ipaddress.IPv4Interface((ipaddress.IPv4Address(ip), plen))))
        return out

    @staticmethod
    def route_body(dst: ipaddress.IPv4Network, *, oif: int, proto: int, gateway: ipaddress.IPv4Address | None = None,
                   scope: int = RT_SCOPE_UNIVERSE, table: int = RT_TABLE_MAIN) -> bytes:
        attrs = attr(RTA_DST, dst.network_address.packed) + attr_u32(RTA_OIF, oif)
        if gateway is not None:
            attrs += attr(RTA_GATEWAY, gateway.packed)
        if table > 255:
            attrs += attr_u32(RTA_TABLE, table)
        return _RTMSG.pack(socket.AF_INET, dst.prefixlen, 0, 0, table if table < 256 else 252, proto, scope,
                           RTN_UNICAST, 0) + attrs

    @staticmethod
    def del_route_body(dst: ipaddress.IPv4Network, *, proto: int, table: int = RT_TABLE_MAIN) -> bytes:
        return _RTMSG.pack(socket.AF_INET, dst.prefixlen, 0, 0, table if table < 256 else 252, proto, 255, 0, 0) + \
            attr(RTA_DST, dst.network_address.packed) + (attr_u32(RTA_TABLE, table) if table > 255 else b"")

    def routes(self, *, proto: int = 0, table: int = RT_TABLE_MAIN) -> list[RouteEntry]:
        """IPv4 routes of `table` (and of protocol `proto` when given; the kernel filters in strict mode)."""
        out = []
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, table if table < 256 else 0, proto, 0, 0, 0)
        for t, p in self.dump(RTM_GETROUTE, body):
            family, dst_len, _src_len, _tos, tbl, rproto, scope, _rtype, _flags = _RTMSG.unpack_from(p, 0)
            a = parse_attrs(p, _RTMSG.size)
            tbl = struct.unpack("=I", a[RTA_TABLE])[0] if RTA_TABLE in a else tbl
            if family != socket.AF_INET or tbl != table or (proto and rproto != proto):
                continue
            dst = ipaddress.IPv4Network((ipaddress.IPv4Address(a.get(RTA_DST, b"\0\0\0\0")), dst_len))
            out.append(RouteEntry(dst, struct.unpack("=I", a[RTA_OIF])[0] if RTA_OIF in a else None,
                                  ipaddress.IPv4Address(a[RTA_GATEWAY]) if RTA_GATEWAY in a else None,
                                  rproto, scope, tbl))
        return out

    @staticmethod
    def neigh_body(index: int, dst: ipaddress.IPv4Address, lladdr: bytes) -> bytes:
        return _NDMSG.pack(socket.AF_INET, index, NUD_PERMANENT, 0, 0) + attr(NDA_DST, dst.packed) + \
            attr(NDA_LLADDR, lladdr)

    def neighbours(self, index: int) -> list[NeighEntry]:
        out = []
        # Strict dumps filter neighbours by an NDA_IFINDEX attribute (the header's ifindex must be 0).
        for t, p in self.dump(RTM_GETNEIGH, _NDMSG.pack(socket.AF_INET, 0, 0, 0, 0) + attr_u32(NDA_IFINDEX, index)):
            family, idx, state, _flags, _type = _NDMSG.unpack_from(p, 0)
            a = parse_attrs(p, _NDMSG.size)
            if family == socket.AF_INET and idx == index and NDA_DST in a:
                out.append(NeighEntry(idx, ipaddress.IPv4Address(a[NDA_DST]), mac_text(a.get(NDA_LLADDR, b"")), state))
        return out
