"""rtnetlink messages for routes, links and addresses: encoders and decoders (pure, bytes in and out).

Only what the route adapter needs: RTM_NEWROUTE / RTM_DELROUTE for IPv4 routes (unicast with one or
more next hops, blackhole, metric, MTU), route/link/address dumps decoded into small records, and
RTM_NEWADDR / RTM_DELADDR / RTM_NEWLINK for the tunnel device. tests/unit/test_rtnl.py checks the
bytes against pyroute2's encoder.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from ipip.model import NextHop, Route
from ipip.netlink import (NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, attr_list, attrs,
                          header, nla, nla_u32)

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC = 1, 4, 5, 6, 7
RTA_METRICS, RTA_MULTIPATH, RTA_TABLE = 8, 9, 15
RTAX_MTU = 2
RTN_UNICAST, RTN_LOCAL, RTN_BROADCAST, RTN_BLACKHOLE, RTN_UNREACHABLE, RTN_PROHIBIT = 1, 2, 3, 6, 7, 8
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
RTNH_F_ONLINK = 4
RTPROT_KERNEL = 2
IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 4, 18, 1
IFF_UP = 1
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS, IFA_PROTO = 1, 2, 8, 11
IFA_F_SECONDARY = 0x01
AF_INET = socket.AF_INET
TYPE_NAMES = {RTN_UNICAST: "unicast", RTN_BLACKHOLE: "blackhole", RTN_UNREACHABLE: "unreachable",
              RTN_PROHIBIT: "prohibit"}


def encode_route(route: Route, *, op: str, seq: int, proto: int, table: int, ifindex: dict[str, int]) -> bytes:
    """One RTM_NEWROUTE or RTM_DELROUTE. op: "create" (NLM_F_EXCL: the kernel refuses with EEXIST when any
    route holds the same table/dst/tos/metric, whoever owns it), "replace" (a route we own at that key),
    "delete" (matched by dst, table, metric AND our protocol: never another owner's route)."""
    a = [nla(RTA_DST, route.dst.network_address.packed)]
    flags = NLM_F_ACK
    rtm_flags = 0
    if op == "delete":
        msg_type, rtm_type, scope = RTM_DELROUTE, 0, RT_SCOPE_NOWHERE
    else:
        msg_type, scope = RTM_NEWROUTE, RT_SCOPE_UNIVERSE
        flags |= NLM_F_CREATE | (NLM_F_EXCL if op == "create" else NLM_F_REPLACE)
        rtm_type = RTN_BLACKHOLE if route.kind == "blackhole" else RTN_UNICAST
        if route.kind != "blackhole":
            if len(route.nexthops) == 1:
                nh = route.nexthops[0]
                a.append(nla(RTA_GATEWAY, nh.gateway.packed))
                a.append(nla_u32(RTA_OIF, ifindex[nh.device]))
                if nh.onlink:
                    rtm_flags |= RTNH_F_ONLINK
            else:
                hops = b""
                for nh in route.nexthops:
                    gw = nla(RTA_GATEWAY, nh.gateway.packed)
                    hops += struct.pack("=HBBi", 8 + len(gw), RTNH_F_ONLINK if nh.onlink else 0, 0,
                                        ifindex[nh.device]) + gw
                a.append(nla(RTA_MULTIPATH, hops))
        if route.mtu:
            a.append(nla(RTA_METRICS, nla_u32(RTAX_MTU, route.mtu)))
    if route.metric:
        a.append(nla_u32(RTA_PRIORITY, route.metric))
    if table > 255:
        a.append(nla_u32(RTA_TABLE, table))
    rtm = struct.pack("=BBBBBBBBI", AF_INET, route.dst.prefixlen, 0, 0, table if table < 256 else 252,
                      proto, scope, rtm_type, rtm_flags)
    return header(msg_type, flags, seq, rtm + b"".join(a))


_HEAD = struct.Struct("=IHHIIBBBBBBBBIHH4s")  # nlmsghdr, rtmsg, then the RTA_DST attribute's header and address


class RouteEncoder:
    """encode_route for many routes: what follows RTA_DST (next hops, MTU, metric, table) is encoded once
    per route shape (op, kind, next hops, mtu, metric) and reused — 10,000 routes through one next hop
    differ only in their destination. One encoder per batch (it holds that batch's ifindex map)."""

    def __init__(self, *, proto: int, table: int, ifindex: dict[str, int]) -> None:
        self.proto, self.table, self.ifindex = proto, table, ifindex
        self._shapes: dict[tuple, tuple] = {}

    def encode(self, route: Route, *, op: str, seq: int) -> bytes:
        """As encode_route (KeyError for a device without an ifindex)."""
        k = (op, route.kind, route.nexthops, route.mtu, route.metric)
        t = self._shapes.get(k)
        if t is None:
            full = encode_route(route, op=op, seq=0, proto=self.proto, table=self.table, ifindex=self.ifindex)
            f = _HEAD.unpack_from(full)
            t = self._shapes[k] = (f[1], f[2], f[9], f[10], f[11], f[12], f[13], full[_HEAD.size:])
        typ, flags, tbl, proto, scope, rtype, rflags, tail = t
        return _HEAD.pack(_HEAD.size + len(tail), typ, flags, seq, 0, AF_INET, route.dst.prefixlen, 0, 0, tbl, proto,
                          scope, rtype, rflags, 8, RTA_DST, route.dst.network_address.packed) + tail


def route_dump_request(seq: int) -> bytes:
    return header(RTM_GETROUTE, NLM_F_DUMP, seq, struct.pack("=BBBBBBBBI", AF_INET, 0, 0, 0, 0, 0, 0, 0, 0))


def link_dump_request(seq: int) -> bytes:
    return header(RTM_GETLINK, NLM_F_DUMP, seq, struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0))


def addr_dump_request(seq: int) -> bytes:
    return header(RTM_GETADDR, NLM_F_DUMP, seq, struct.pack("=BBBBI", AF_INET, 0, 0, 0, 0))


@dataclass(frozen=True)
class KernelRoute:
    """One IPv4 route as dumped (any owner)."""

    dst: ipaddress.IPv4Network
    table: int
    proto: int
    scope: int
    type: int
    metric: int
    tos: int
    oif: int | None
    gateway: ipaddress.IPv4Address | None
    hops: tuple[tuple[ipaddress.IPv4Address, int, bool], ...]  # (gateway, oif, onlink) for multipath
    onlink: bool
    mtu: int | None

    def to_route(self, ifname: dict[int, str]) -> Route:
        """As the model's Route (for routes we own)."""
        if self.type == RTN_BLACKHOLE:
            return Route(self.dst, "blackhole", metric=self.metric)
        if self.hops:
            hops = [NextHop(g, ifname.get(o, "?"), on) for g, o, on in self.hops]
        elif self.gateway is not None:
            hops = [NextHop(self.gateway, ifname.get(self.oif or 0, "?"), self.onlink)]
        else:
            hops = []
        kind = "unicast" if self.type == RTN_UNICAST else TYPE_NAMES.get(self.type, f"type{self.type}")
        return Route(self.dst, kind, tuple(sorted(hops)), self.mtu, self.metric)

    def text(self, ifname: dict[int, str]) -> str:
        """`ip route`-like, for conflict reports."""
        out = str(self.dst) if self.type == RTN_UNICAST else f"{TYPE_NAMES.get(self.type, self.type)} {self.dst}"
        if self.gateway is not None:
            out += f" via {self.gateway}"
        if self.oif is not None:
            out += f" dev {ifname.get(self.oif, self.oif)}"
        for g, o, _ in self.hops:
            out += f" nexthop via {g} dev {ifname.get(o, o)}"
        out += f" proto {'kernel' if self.proto == RTPROT_KERNEL else self.proto}"
        if self.scope == RT_SCOPE_LINK:
            out += " scope link"
        return out + (f" metric {self.metric}" if self.metric else "")


_NETS: dict[tuple[bytes, int], ipaddress.IPv4Network] = {}
_ADDRS: dict[bytes, ipaddress.IPv4Address] = {}
CACHE_MAX = 200_000  # dumps repeat the same prefixes: building IPv4Network objects dominated decoding


def _net(raw: bytes, plen: int) -> ipaddress.IPv4Network:
    key = (raw, plen)
    n = _NETS.get(key)
    if n is None:
        if len(_NETS) >= CACHE_MAX:
            _NETS.clear()
        n = _NETS[key] = ipaddress.IPv4Network((int.from_bytes(raw, "big"), plen), strict=False)
    return n


def _addr(raw: bytes) -> ipaddress.IPv4Address:
    a = _ADDRS.get(raw)
    if a is None:
        if len(_ADDRS) >= CACHE_MAX:
            _ADDRS.clear()
        a = _ADDRS[raw] = ipaddress.IPv4Address(raw)
    return a


def decode_route(body: bytes) -> KernelRoute | None:
    """An RTM_NEWROUTE body (after the netlink header); None for non-IPv4."""
    family, dst_len, _src_len, tos, table, proto, scope, rtype, flags = struct.unpack_from("=BBBBBBBBI", body)
    if family != AF_INET:
        return None
    a = attrs(body, 12)
    if RTA_TABLE in a:
        table = struct.unpack("=I", a[RTA_TABLE])[0]
    dst = _net(a[RTA_DST][:4] if RTA_DST in a else b"\0\0\0\0", dst_len)
    metric = struct.unpack("=I", a[RTA_PRIORITY])[0] if RTA_PRIORITY in a else 0
    oif = struct.unpack("=I", a[RTA_OIF])[0] if RTA_OIF in a else None
    gw = _addr(a[RTA_GATEWAY][:4]) if RTA_GATEWAY in a else None
    hops: list[tuple[ipaddress.IPv4Address, int, bool]] = []
    mp = a.get(RTA_MULTIPATH)
    off = 0
    while mp is not None and off + 8 <= len(mp):
        ln, nh_flags, _hops, ifi = struct.unpack_from("=HBBi", mp, off)
        if ln < 8:
            break
        g = attrs(mp[off + 8:off + ln]).get(RTA_GATEWAY)
        if g:
            hops.append((_addr(g[:4]), ifi, bool(nh_flags & RTNH_F_ONLINK)))
        off += (ln + 3) & ~3
    mtu = None
    if RTA_METRICS in a:
        m = attrs(a[RTA_METRICS]).get(RTAX_MTU)
        mtu = struct.unpack("=I", m)[0] if m else None
    return KernelRoute(dst, table, proto, scope, rtype, metric, tos, oif, gw, tuple(hops), bool(flags & RTNH_F_ONLINK),
                       mtu or None)


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mtu: int
    up: bool
    kind: str | None


def decode_link(body: bytes) -> Link:
    _family, _type, index, flags, _change = struct.unpack_from("=BxHiII", body)
    a = attrs(body, 16)
    kind = None
    if IFLA_LINKINFO in a:
        k = attrs(a[IFLA_LINKINFO]).get(IFLA_INFO_KIND)
        kind = k.rstrip(b"\0").decode(errors="replace") if k else None
    return Link(index, a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace"),
                struct.unpack("=I", a[IFLA_MTU])[0] if IFLA_MTU in a else 0, bool(flags & IFF_UP), kind)


@dataclass(frozen=True)
class Address:
    index: int
    address: ipaddress.IPv4Address
    prefixlen: int
    secondary: bool
    proto: int  # IFA_PROTO (0 when the kernel does not report one)


def decode_addr(body: bytes) -> Address | None:
    family, prefixlen, flags, _scope, index = struct.unpack_from("=BBBBI", body)
    if family != AF_INET:
        return None
    a = attrs(body, 8)
    raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
    if not raw:
        return None
    if IFA_FLAGS in a:
        flags = struct.unpack("=I", a[IFA_FLAGS])[0]
    proto = a[IFA_PROTO][0] if IFA_PROTO in a else 0
    return Address(index, ipaddress.IPv4Address(raw[:4]), prefixlen, bool(flags & IFA_F_SECONDARY), proto)


def encode_addr(op: str, index: int, address: ipaddress.IPv4Address, prefixlen: int, seq: int, proto: int) -> bytes:
    """RTM_NEWADDR (op "add", refused with EEXIST if present) or RTM_DELADDR ("delete") of one address."""
    body = struct.pack("=BBBBI", AF_INET, prefixlen, 0, 0, index) + nla(IFA_LOCAL, address.packed) \
        + nla(IFA_ADDRESS, address.packed)
    if op == "add":
        return header(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq,
                      body + nla(IFA_PROTO, struct.pack("=B", proto)))
    return header(RTM_DELADDR, NLM_F_ACK, seq, body)


def encode_new_link(name: str, kind: str, seq: int) -> bytes:
    info = nla(IFLA_LINKINFO, nla(IFLA_INFO_KIND, kind.encode()))
    return header(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq,
                  struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0) + nla(IFLA_IFNAME, name.encode() + b"\0") + info)


def encode_set_link(index: int, seq: int, *, mtu: int | None = None, up: bool | None = None) -> bytes:
    flags, change = (IFF_UP if up else 0, IFF_UP) if up is not None else (0, 0)
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)
    if mtu is not None:
        body += nla_u32(IFLA_MTU, mtu)
    return header(RTM_NEWLINK, NLM_F_ACK, seq, body)


__all__ = ["encode_route", "RouteEncoder", "decode_route", "decode_link", "decode_addr", "encode_addr", "encode_new_link",
           "encode_set_link", "route_dump_request", "link_dump_request", "addr_dump_request", "KernelRoute", "Link",
           "Address", "attr_list"]
