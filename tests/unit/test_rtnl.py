"""rtnetlink bytes: our encoder read back by pyroute2's decoder, pyroute2's encoder read by ours."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address as A, IPv4Network as N

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from ipip import rtnl
from ipip.model import NextHop, Route
from ipip.netlink import NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE

IFX = {"eth1": 2, "tunl0": 3}


def decode(data: bytes) -> rtmsg:
    m = rtmsg(data)
    m.decode()
    return m


@pytest.mark.parametrize("route, op", [
    (Route(N("10.244.2.0/24"), nexthops=(NextHop(A("10.0.1.12"), "eth1"),)), "create"),
    (Route(N("10.244.3.0/24"), nexthops=(NextHop(A("10.0.2.21"), "tunl0", True),), mtu=1480), "replace"),
    (Route(N("0.0.0.0/0"), nexthops=(NextHop(A("10.0.1.1"), "eth1"),), metric=4096), "create"),
    (Route(N("10.244.1.0/24"), "blackhole"), "replace"),
    (Route(N("10.244.9.0/24"), nexthops=(NextHop(A("10.0.1.12"), "eth1"), NextHop(A("10.0.2.21"), "tunl0", True)),
           mtu=1480), "create"),
])
def test_encoded_route_reads_back_with_pyroute2(route: Route, op: str) -> None:
    data = rtnl.encode_route(route, op=op, seq=7, proto=80, table=254, ifindex=IFX)
    m = decode(data)
    assert m["header"]["type"] == rtnl.RTM_NEWROUTE and m["header"]["sequence_number"] == 7
    flags = m["header"]["flags"]
    assert flags & NLM_F_CREATE and bool(flags & NLM_F_EXCL) == (op == "create")
    assert bool(flags & NLM_F_REPLACE) == (op == "replace")
    assert (m["family"], m["dst_len"], m["table"], m["proto"]) == (2, route.dst.prefixlen, 254, 80)
    assert m["type"] == (rtnl.RTN_BLACKHOLE if route.kind == "blackhole" else rtnl.RTN_UNICAST)
    assert m.get_attr("RTA_DST") == (str(route.dst.network_address) if route.dst.prefixlen else "0.0.0.0")
    assert (m.get_attr("RTA_PRIORITY") or 0) == route.metric
    metrics = m.get_attr("RTA_METRICS")
    assert (metrics.get_attr("RTAX_MTU") if metrics else None) == route.mtu
    if len(route.nexthops) == 1:
        nh = route.nexthops[0]
        assert m.get_attr("RTA_GATEWAY") == str(nh.gateway) and m.get_attr("RTA_OIF") == IFX[nh.device]
        assert bool(m["flags"] & rtnl.RTNH_F_ONLINK) == nh.onlink
    elif route.nexthops:
        hops = [(h.get_attr("RTA_GATEWAY"), h["oif"], bool(h["flags"] & rtnl.RTNH_F_ONLINK))
                for h in m.get_attr("RTA_MULTIPATH")]
        assert hops == [(str(h.gateway), IFX[h.device], h.onlink) for h in route.nexthops]
    # and our own decoder agrees (a dump answer has the same layout)
    kr = rtnl.decode_route(data[16:])
    assert kr is not None and kr.to_route({v: k for k, v in IFX.items()}) == route


def test_delete_matches_our_protocol_and_metric() -> None:
    r = Route(N("0.0.0.0/0"), nexthops=(NextHop(A("10.0.1.1"), "eth1"),), metric=4096)
    m = decode(rtnl.encode_route(r, op="delete", seq=1, proto=80, table=254, ifindex=IFX))
    assert m["header"]["type"] == rtnl.RTM_DELROUTE
    assert m["proto"] == 80 and m.get_attr("RTA_PRIORITY") == 4096 and m["scope"] == rtnl.RT_SCOPE_NOWHERE


def test_big_table_number_goes_in_rta_table() -> None:
    r = Route(N("10.244.2.0/24"), "blackhole")
    m = decode(rtnl.encode_route(r, op="create", seq=1, proto=80, table=1000, ifindex=IFX))
    assert m["table"] == 252 and m.get_attr("RTA_TABLE") == 1000
    assert rtnl.decode_route(rtnl.encode_route(r, op="create", seq=1, proto=80, table=1000, ifindex=IFX)[16:]).table \
        == 1000


def test_pyroute2_link_and_address_messages_decode() -> None:
    link = ifinfmsg()
    link["family"], link["index"], link["flags"] = 0, 5, 1
    link["attrs"] = [("IFLA_IFNAME", "tunl0"), ("IFLA_MTU", 1480),
                     ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "ipip")]})]
    link.encode()
    ln = rtnl.decode_link(bytes(link.data[16:]))
    assert (ln.index, ln.name, ln.mtu, ln.up, ln.kind) == (5, "tunl0", 1480, True, "ipip")
    addr = ifaddrmsg()
    addr["family"], addr["prefixlen"], addr["index"] = 2, 24, 2
    addr["attrs"] = [("IFA_ADDRESS", "10.0.1.11"), ("IFA_LOCAL", "10.0.1.11"), ("IFA_FLAGS", 1)]
    addr.encode()
    a = rtnl.decode_addr(bytes(addr.data[16:]))
    assert a is not None and (a.index, str(a.address), a.prefixlen, a.secondary, a.proto) == (2, "10.0.1.11", 24, True, 0)


def test_our_address_carries_our_protocol() -> None:
    data = rtnl.encode_addr("add", 3, A("10.244.1.0"), 32, 9, 80)
    m = ifaddrmsg(data)
    m.decode()
    assert m["header"]["type"] == rtnl.RTM_NEWADDR and m["index"] == 3 and m["prefixlen"] == 32
    assert m.get_attr("IFA_LOCAL") == "10.244.1.0"
    a = rtnl.decode_addr(data[16:])
    assert a is not None and a.proto == 80
    assert struct.unpack_from("=H", rtnl.encode_addr("delete", 3, A("10.244.1.0"), 32, 9, 80), 4)[0] == rtnl.RTM_DELADDR
