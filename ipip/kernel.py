"""Route/tunnel adapter: read facts and our routes from the kernel, apply a RouteDiff. Decides nothing.

Reads are one pyroute2 dump each (links, addresses, routes); writes go through the pipelined
RouteWriter. Runs in the current network namespace, synchronously (call it from a worker thread
in asyncio code: pyroute2's sync IPRoute refuses a thread with a running loop).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from ipip.model import NextHop, NodeFacts, Route, RouteDiff, UnderlayRoute
from ipip.netlink_batch import RTNH_F_ONLINK, RouteWriter, WriteError

RTN_UNICAST, RTN_BLACKHOLE = 1, 6


class FactsError(RuntimeError):
    """The kernel does not (yet) hold what the node's config says (e.g. no address = node IP)."""


@dataclass(frozen=True)
class KernelView:
    facts: NodeFacts
    kernel_prefix: ipaddress.IPv4Interface
    owned: dict[ipaddress.IPv4Network, Route]
    ifindex: dict[str, int]
    ifname: dict[int, str]
    tunnel: dict | None  # {"up": bool, "mtu": int} when the tunnel device exists


class RouteKernel:
    def __init__(self, *, proto: int, table: int, tunnel_device: str) -> None:
        self.proto = proto
        self.table = table
        self.tunnel_device = tunnel_device
        self._ipr = IPRoute()
        self._writer = RouteWriter(proto, table)

    def close(self) -> None:
        self._ipr.close()
        self._writer.close()

    # -- reading ---------------------------------------------------------------------------------

    def read(self, node_ip: ipaddress.IPv4Address, underlay_mtu: int | None = None,
             device: str | None = None) -> KernelView:
        links = list(self._ipr.link("dump"))
        ifname = {ln["index"]: ln.get("IFLA_IFNAME") for ln in links}
        ifindex = {v: k for k, v in ifname.items()}
        mtu = {ln["index"]: ln.get("IFLA_MTU") for ln in links}
        up = {ln["index"]: bool(ln["flags"] & 1) for ln in links}
        holder = None
        for a in self._ipr.addr("dump", family=2):
            if a.get("IFA_ADDRESS") == str(node_ip) and (device is None or ifname.get(a["index"]) == device):
                holder = a
                break
        if holder is None:
            raise FactsError(f"no interface holds the node address {node_ip}" + (f" on {device}" if device else ""))
        kernel_prefix = ipaddress.IPv4Interface(f"{node_ip}/{holder['prefixlen']}")
        dev_index = holder["index"]
        owned: dict[ipaddress.IPv4Network, Route] = {}
        underlay: list[UnderlayRoute] = []
        for r in self._ipr.route("dump", family=2, table=self.table):
            if r.get("RTA_TABLE", r["table"]) != self.table:
                continue
            dst = ipaddress.IPv4Network(f"{r.get('RTA_DST') or '0.0.0.0'}/{r['dst_len']}")
            if r["proto"] == self.proto:
                owned[dst] = self._to_route(dst, r, ifname)
            elif r["type"] == RTN_UNICAST:
                oif = r.get("RTA_OIF")
                if oif is None or ifname.get(oif) == self.tunnel_device:
                    continue
                gw = r.get("RTA_GATEWAY")
                underlay.append(UnderlayRoute(dst, ipaddress.IPv4Address(gw) if gw else None, ifname.get(oif, "?")))
        t = ifindex.get(self.tunnel_device)
        tunnel = {"up": up[t], "mtu": mtu[t]} if t is not None else None
        facts = NodeFacts(address=node_ip, network=kernel_prefix.network, device=ifname[dev_index],
                          mtu=underlay_mtu or mtu[dev_index], routes=tuple(underlay))
        return KernelView(facts, kernel_prefix, owned, ifindex, ifname, tunnel)

    @staticmethod
    def _to_route(dst: ipaddress.IPv4Network, r, ifname: dict[int, str]) -> Route:
        if r["type"] == RTN_BLACKHOLE:
            return Route(dst, "blackhole")
        hops: list[NextHop] = []
        mp = r.get("RTA_MULTIPATH")
        if mp:
            for nh in mp:
                gw = nh.get("RTA_GATEWAY")
                if gw:
                    hops.append(NextHop(ipaddress.IPv4Address(gw), ifname.get(nh["oif"], "?"),
                                        bool(nh["flags"] & RTNH_F_ONLINK)))
        elif r.get("RTA_GATEWAY"):
            hops.append(NextHop(ipaddress.IPv4Address(r.get("RTA_GATEWAY")), ifname.get(r.get("RTA_OIF"), "?"),
                                bool(r["flags"] & RTNH_F_ONLINK)))
        metrics = r.get("RTA_METRICS")
        mtu = metrics.get("RTAX_MTU") if metrics else None
        return Route(dst, "unicast" if r["type"] == RTN_UNICAST else f"type{r['type']}", tuple(sorted(hops)),
                     mtu or None)

    # -- writing ---------------------------------------------------------------------------------

    def ensure_tunnel(self, mtu: int, view: KernelView) -> KernelView:
        """tunl0 is the kernel's fallback ipip device (local/remote any, like Calico's): it receives all
        IPIP and sends to the per-route onlink gateway. Create it if the netns lacks it; set MTU and up."""
        t = view.ifindex.get(self.tunnel_device)
        if t is None:
            self._ipr.link("add", ifname=self.tunnel_device, kind="ipip")
            t = self._ipr.link_lookup(ifname=self.tunnel_device)[0]
        elif view.tunnel and view.tunnel["up"] and view.tunnel["mtu"] == mtu:
            return view
        self._ipr.link("set", index=t, mtu=mtu, state="up")
        ifindex = {**view.ifindex, self.tunnel_device: t}
        ifname = {**view.ifname, t: self.tunnel_device}
        return KernelView(view.facts, view.kernel_prefix, view.owned, ifindex, ifname, {"up": True, "mtu": mtu})

    def apply(self, diff: RouteDiff, ifindex: dict[str, int]) -> list[WriteError]:
        ops = [("delete", r) for r in diff.delete] + [("replace", r) for r in diff.replace]
        return self._writer.apply(ops, ifindex)


def set_sysctl(name: str, value: str) -> str | None:
    """Write a sysctl of the current netns; returns an error text instead of raising."""
    path = Path("/proc/sys") / name.replace(".", "/")
    try:
        if path.read_text().strip() != value:
            path.write_text(value)
        return None
    except OSError as e:
        return f"sysctl {name}={value}: {e.strerror or e}"
