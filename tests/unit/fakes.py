"""Fakes for the agent loop tests: a stateful kernel (routes keyed as the kernel keys them, owners,
links, addresses, a tunnel), a speaker, a service proxy — each with switches that inject failures.

FakeKernel follows the kernel's rules that matter here: a create (NLM_F_EXCL) is refused with EEXIST
when any route holds the (dst, metric) key; a replace overwrites whatever holds the key (whoever owns
it: the reason ownership checks exist); a delete matches our protocol only.
"""

from __future__ import annotations

import errno
import ipaddress
import threading
from dataclasses import dataclass, field
from typing import Any

import struct

from ipip.kernel import KernelView, OpError, TunnelState
from ipip.netlink import nla, nla_u32
from ipip.rtnl import IFF_UP, IFLA_IFNAME, IFLA_MTU, Link, encode_route
from ipip.model import NodeFacts, Route, RouteKey, UnderlayRoute

A = ipaddress.IPv4Address
N = ipaddress.IPv4Network
PROTO = 80


@dataclass
class FakeKernel:
    node_ip: A = A("10.0.1.11")
    network: N = N("10.0.1.0/24")
    has_address: bool = True
    routes: dict[RouteKey, tuple[Route, int]] = field(default_factory=dict)  # key -> (route, proto)
    tunnel: TunnelState | None = None
    refuse: dict[N, int] = field(default_factory=dict)  # dst -> errno, for every write of that dst
    fail_next_writes: int = 0  # the next N writes fail with ENETUNREACH
    fail_next_reads: int = 0  # the next N reads raise TimeoutError
    hang: threading.Event | None = None  # set: reads and writes block until it is cleared
    attempts: dict[N, int] = field(default_factory=dict)  # writes tried per dst
    reads: int = 0
    writes: int = 0
    closed: bool = False
    down: set[str] = field(default_factory=set)  # devices down: writes through them are refused
    portid: int = 4242  # our route socket's port id: the notifications of our writes carry it

    def add_foreign(self, route: Route, proto: int = 2) -> None:
        self.routes[route.id] = (route, proto)

    def ours(self) -> dict[RouteKey, Route]:
        return {k: r for k, (r, p) in self.routes.items() if p == PROTO}

    IFINDEX = {"lo": 1, "eth1": 2, "tunl0": 3}

    def set_down(self, device: str) -> bytes:
        """`ip link set DEVICE down`: as the kernel, every route through it goes without a notification;
        returns the RTM_NEWLINK body the monitor would read."""
        self.down.add(device)
        for k, (r, _) in list(self.routes.items()):
            if r.nexthops and all(h.device == device for h in r.nexthops):
                del self.routes[k]
        return link_body(device, self.IFINDEX[device], up=False)

    def set_up(self, device: str) -> bytes:
        self.down.discard(device)
        return link_body(device, self.IFINDEX[device], up=True)

    def _block(self) -> None:
        while self.hang is not None and self.hang.is_set():
            threading.Event().wait(0.01)

    def read(self, node_ip: A, underlay_mtu: int | None = None, device: str | None = None) -> KernelView:
        self._block()
        self.reads += 1
        if self.fail_next_reads:
            self.fail_next_reads -= 1
            raise TimeoutError(errno.ETIMEDOUT, "route dump: no answer from the kernel within 5 s")
        owned = self.ours()
        foreign = {k: f"{k[0]} proto {p}" for k, (r, p) in self.routes.items() if p != PROTO}
        ifindex = dict(self.IFINDEX)
        ifname = {v: k for k, v in ifindex.items()}
        links = {i: Link(i, n, 1480 if n == "tunl0" else 1500, n not in self.down, None) for n, i in ifindex.items()}
        if not self.has_address:
            return KernelView(None, f"no interface holds the node address {node_ip}", None, owned, foreign, ifindex,
                              ifname, self.tunnel, links=links)
        underlay = tuple(UnderlayRoute(r.dst, r.nexthops[0].gateway if r.nexthops else None, "eth1")
                         for k, (r, p) in self.routes.items() if p != PROTO and r.kind == "unicast")
        facts = NodeFacts(node_ip, self.network, "eth1", underlay_mtu or 1500, underlay)
        return KernelView(facts, None, ipaddress.IPv4Interface(f"{node_ip}/{self.network.prefixlen}"), owned, foreign,
                          ifindex, ifname, self.tunnel, links=links)

    def apply(self, ops: Any, ifindex: dict[str, int]) -> list[OpError]:
        self._block()
        errors = []
        for op, r in ops:
            self.writes += 1
            if op != "delete":
                self.attempts[r.dst] = self.attempts.get(r.dst, 0) + 1
                if any(h.device in self.down for h in r.nexthops):
                    errors.append(OpError(op, r, errno.ENETDOWN))
                    continue
                if r.dst in self.refuse:
                    errors.append(OpError(op, r, self.refuse[r.dst]))
                    continue
                if self.fail_next_writes:
                    self.fail_next_writes -= 1
                    errors.append(OpError(op, r, errno.ENETUNREACH))
                    continue
            held = self.routes.get(r.id)
            if op == "delete":
                if held is not None and held[1] == PROTO:
                    del self.routes[r.id]
            elif op == "create" and held is not None:
                errors.append(OpError(op, r, errno.EEXIST))
            else:
                self.routes[r.id] = (r, PROTO)  # replace overwrites whoever owns the key
        return errors

    def create_tunnel(self) -> int:
        self.tunnel = TunnelState(3, False, 1480, frozenset(), frozenset())
        return 3

    def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None) -> None:
        assert self.tunnel is not None
        self.tunnel = TunnelState(index, bool(up), mtu or self.tunnel.mtu, self.tunnel.owned, self.tunnel.other)

    def tunnel_address(self, index: int, add: Any, delete: Any) -> list:
        assert self.tunnel is not None
        owned = (set(self.tunnel.owned) | set(add)) - set(delete)
        self.tunnel = TunnelState(index, self.tunnel.up, self.tunnel.mtu, frozenset(owned), self.tunnel.other)
        return []

    def close(self) -> None:
        self.closed = True


def link_body(name: str, index: int, *, up: bool, mtu: int = 1500) -> bytes:
    """An RTM_NEWLINK body (ifinfomsg + name + mtu), as the monitor reads it."""
    return struct.pack("=BxHiII", 0, 1, index, IFF_UP if up else 0, 0xFFFFFFFF) + nla(IFLA_IFNAME, name.encode() + b"\0") \
        + nla_u32(IFLA_MTU, mtu)


def route_body(route: Route, proto: int = PROTO) -> bytes:
    """An RTM_NEWROUTE / RTM_DELROUTE body for `route` (the kernel's notification carries the whole route)."""
    return encode_route(route, op="create", seq=1, proto=proto, table=254, ifindex=FakeKernel.IFINDEX)[16:]


class FakeSpeaker:
    def __init__(self, run_dir: Any, on_event: Any) -> None:
        self.on_event = on_event
        self.neighbors: list = []
        self.announced: dict = {}
        self.final = False
        self.final_with: dict | None = None  # the announced set when it first became final
        self.calls: list[tuple[str, int]] = []  # ("set" | "update", how many prefixes handed over)
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    async def set_neighbors(self, neighbors: list) -> None:
        from bgp.exabgp_config import validate
        validate(neighbors)  # as the real one: raises for a bad set
        self.neighbors = list(neighbors)

    async def set_announcements(self, desired: dict, *, final: bool = True) -> None:
        self.announced = dict(desired)
        self.calls.append(("set", len(desired)))
        if final and not self.final:
            self.final, self.final_with = True, dict(desired)

    async def update_announcements(self, changes: dict, *, final: bool = True) -> None:
        for p, a in changes.items():
            if a is None:
                self.announced.pop(p, None)
            else:
                self.announced[p] = a
        self.calls.append(("update", len(changes)))
        if final and not self.final:
            self.final, self.final_with = True, dict(self.announced)

    def status(self) -> dict:
        return {"neighbors": {n.name: {"address": str(n.peer_address), "state": "established"}
                              for n in self.neighbors}}


class FakeServices:
    """Stands in for fabric.services.ServiceSync: records what it was given; can raise or hang."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict, bool]] = []
        self.raise_next = 0
        self.hang = threading.Event()
        self.closed = False

    def sync(self, store: Any, changes: Any, full: bool) -> None:
        while self.hang.is_set():
            threading.Event().wait(0.01)
        if self.raise_next:
            self.raise_next -= 1
            raise RuntimeError("nft: injected failure")
        self.calls.append(({k: set(v) for k, v in changes.keys.items()}, full))

    def seen(self, kind: str) -> set[str]:
        return {k for keys, _ in self.calls for k in keys.get(kind, set())}

    def status(self) -> dict:
        return {"calls": len(self.calls)}

    def close(self) -> None:
        self.closed = True
