"""Route/tunnel adapter: read what the kernel holds, apply route and tunnel operations. Decides nothing.

One read = three dumps on one rtnetlink socket (links, IPv4 addresses, IPv4 routes), decoded by
ipip.rtnl; writes are pipelined (ipip.netlink). Every receive has a deadline. Runs in the current
network namespace, synchronously (call it from a worker thread in asyncio code).

What a read returns is split by owner: routes with our protocol in our table are `owned`; every other
route of our table is `foreign`, keyed like ours by (dst, metric), so the reconciler can refuse to
write where another owner's route sits (the kernel's NLM_F_REPLACE matches table/dst/tos/metric
whatever the protocol: writing there would replace the node's own route). The node's facts (the
address holding the node IP, its network and device, connected networks, underlay routes) are read
in the same pass; a missing node address does not stop the read of what we own.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ipip import netlink as nl
from ipip import rtnl
from ipip.model import NodeFacts, Route, RouteKey, UnderlayRoute


# Route messages are small: 128 KiB is ~1,800 routes per send (their acks, 36 bytes each with
# NETLINK_CAP_ACK, fit the 4 MiB receive buffer many times over).
ROUTE_CHUNK_BYTES = 128 * 1024


class FactsError(RuntimeError):
    """The kernel does not (yet) hold what the node's config says (e.g. no address = node IP)."""


@dataclass(frozen=True)
class TunnelState:
    index: int
    up: bool
    mtu: int
    owned: frozenset[ipaddress.IPv4Address]  # our addresses on it (IFA_PROTO = our protocol)
    other: frozenset[ipaddress.IPv4Address]  # anyone else's


@dataclass(frozen=True)
class KernelView:
    facts: NodeFacts | None  # None: `facts_error` says what is missing
    facts_error: str | None
    kernel_prefix: ipaddress.IPv4Interface | None
    owned: dict[RouteKey, Route]
    foreign: dict[RouteKey, str]  # another owner's route at a key: its `ip route`-like text
    ifindex: dict[str, int]
    ifname: dict[int, str]
    tunnel: TunnelState | None
    addresses: tuple[rtnl.Address, ...] = field(default=(), repr=False)
    links: dict[int, rtnl.Link] = field(default_factory=dict, repr=False)  # by index: name, up, mtu


@dataclass(frozen=True)
class OpError:
    op: str  # "create" | "replace" | "delete"
    route: Route
    errno: int

    @property
    def error(self) -> str:
        return os.strerror(self.errno)


class RouteKernel:
    def __init__(self, *, proto: int, table: int, tunnel_device: str, timeout: float = nl.RECV_TIMEOUT) -> None:
        self.proto = proto
        self.table = table
        self.tunnel_device = tunnel_device
        self._sock = nl.open_netlink(nl.NETLINK_ROUTE, timeout, rcvbuf=4 << 20, sndbuf=1 << 20)
        self._seq = nl.Sequence32()

    def close(self) -> None:
        self._sock.close()

    @property
    def portid(self) -> int:
        """This socket's netlink port id: the kernel's notifications of our own writes carry it."""
        return int(self._sock.getsockname()[0])

    # -- reading ---------------------------------------------------------------------------------

    def _dump(self, msg_fn, what: str) -> list[bytes]:
        seq = self._seq.next()
        return [body for _typ, body in nl.request(self._sock, msg_fn(seq), seq, what)]

    def read(self, node_ip: ipaddress.IPv4Address, underlay_mtu: int | None = None,
             device: str | None = None) -> KernelView:
        links = [rtnl.decode_link(b) for b in self._dump(rtnl.link_dump_request, "link dump")]
        ifname = {ln.index: ln.name for ln in links}
        ifindex = {ln.name: ln.index for ln in links}
        by_index = {ln.index: ln for ln in links}
        addrs = tuple(a for b in self._dump(rtnl.addr_dump_request, "address dump") if (a := rtnl.decode_addr(b)))
        routes = [r for b in self._dump(rtnl.route_dump_request, "route dump") if (r := rtnl.decode_route(b))]

        owned: dict[RouteKey, Route] = {}
        foreign: dict[RouteKey, str] = {}
        underlay: list[UnderlayRoute] = []
        for r in routes:
            if r.table != self.table or r.tos:
                continue
            if r.proto == self.proto:
                owned[(r.dst, r.metric)] = r.to_route(ifname)
                continue
            foreign.setdefault((r.dst, r.metric), r.text(ifname))
            if r.type == rtnl.RTN_UNICAST and r.oif is not None and ifname.get(r.oif) != self.tunnel_device:
                underlay.append(UnderlayRoute(r.dst, r.gateway, ifname.get(r.oif, "?")))

        t = ifindex.get(self.tunnel_device)
        tunnel = None
        if t is not None:
            mine = frozenset(a.address for a in addrs if a.index == t and a.proto == self.proto)
            other = frozenset(a.address for a in addrs if a.index == t and a.proto != self.proto)
            tunnel = TunnelState(t, by_index[t].up, by_index[t].mtu, mine, other)

        holder = next((a for a in addrs if a.address == node_ip and (device is None or ifname.get(a.index) == device)),
                      None)
        if holder is None:
            why = f"no interface holds the node address {node_ip}" + (f" on {device}" if device else "")
            return KernelView(None, why, None, owned, foreign, ifindex, ifname, tunnel, addrs, by_index)
        kernel_prefix = ipaddress.IPv4Interface(f"{node_ip}/{holder.prefixlen}")
        connected = tuple(sorted({(ipaddress.IPv4Interface(f"{a.address}/{a.prefixlen}").network,
                                   ifname.get(a.index, "?"))
                                  for a in addrs if a.index != t and a.prefixlen < 32 and not a.address.is_loopback}))
        facts = NodeFacts(address=node_ip, network=kernel_prefix.network, device=ifname[holder.index],
                          mtu=underlay_mtu or by_index[holder.index].mtu, routes=tuple(underlay), connected=connected)
        return KernelView(facts, None, kernel_prefix, owned, foreign, ifindex, ifname, tunnel, addrs, by_index)

    # -- writing ---------------------------------------------------------------------------------

    def apply(self, ops: Iterable[tuple[str, Route]], ifindex: dict[str, int]) -> list[OpError]:
        """Apply ("create" | "replace" | "delete", route) in order, pipelined. Deleting a route that is
        already gone is fine. Returns the refusals; never raises for one bad route."""
        msgs: list[tuple[bytes, int, tuple[str, Route]]] = []
        errors: list[OpError] = []
        enc = rtnl.RouteEncoder(proto=self.proto, table=self.table, ifindex=ifindex)
        for op, route in ops:
            seq = self._seq.next()
            try:
                msg = enc.encode(route, op=op, seq=seq)
            except KeyError:
                errors.append(OpError(op, route, errno.ENODEV))
                continue
            msgs.append((msg, seq, (op, route)))
        for (op, route), err in nl.pipeline(self._sock, msgs, chunk=ROUTE_CHUNK_BYTES, errors_only=True):
            if op == "delete" and err in (errno.ESRCH, errno.ENOENT):
                continue
            errors.append(OpError(op, route, err))
        return errors

    def _ask(self, msg_fn, what: str) -> None:
        seq = self._seq.next()
        nl.request(self._sock, msg_fn(seq), seq, what)

    def create_tunnel(self) -> int:
        """tunl0 is the kernel's fallback ipip device (local/remote any, like Calico's): it receives all
        IPIP and sends to the per-route onlink gateway. Created if this namespace lacks it."""
        try:
            self._ask(lambda s: rtnl.encode_new_link(self.tunnel_device, "ipip", s), f"create {self.tunnel_device}")
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
        links = [rtnl.decode_link(b) for b in self._dump(rtnl.link_dump_request, "link dump")]
        idx = next((ln.index for ln in links if ln.name == self.tunnel_device), None)
        if idx is None:
            raise OSError(errno.ENODEV, f"{self.tunnel_device} was not created")
        return idx

    def set_link(self, index: int, *, mtu: int | None = None, up: bool | None = None) -> None:
        self._ask(lambda s: rtnl.encode_set_link(index, s, mtu=mtu, up=up), f"set link {index}")

    def tunnel_address(self, index: int, add: Iterable[ipaddress.IPv4Address],
                       delete: Iterable[ipaddress.IPv4Address]) -> list[tuple[str, ipaddress.IPv4Address, int]]:
        """Add/remove /32s (ours: IFA_PROTO = our protocol) on the tunnel device; returns (op, address, errno)
        per refusal (already there / already gone are fine)."""
        msgs = []
        for op, addrs in (("delete", delete), ("add", add)):
            for a in addrs:
                seq = self._seq.next()
                msgs.append((rtnl.encode_addr(op, index, a, 32, seq, self.proto), seq, (op, a)))
        out = []
        for (op, a), err in nl.pipeline(self._sock, msgs):
            if (op, err) in (("add", errno.EEXIST), ("delete", errno.EADDRNOTAVAIL)):
                continue
            out.append((op, a, err))
        return out


def set_sysctl(name: str, value: str) -> str | None:
    """Write a sysctl of the current netns; returns an error text instead of raising."""
    path = Path("/proc/sys") / name.replace(".", "/")
    try:
        if path.read_text().strip() != value:
            path.write_text(value)
        return None
    except OSError as e:
        return f"sysctl {name}={value}: {e.strerror or e}"
