"""A pod's interface, routed like Calico's: a veth pair, a /32 on the pod side, a /32 host route.

    pod netns                          node
    eth0 10.244.1.5/32  <--veth-->  fab<hash>  (no address, MAC ee:ee:ee:ee:ee:ee)
    169.254.1.1 dev eth0 scope link           10.244.1.5/32 dev fab<hash> scope link proto 81
    default via 169.254.1.1 dev eth0
    neigh 169.254.1.1 lladdr ee:ee:ee:ee:ee:ee PERMANENT

The pod's gateway is link-local and never answers ARP: the pod has a permanent neighbour entry for
it, so the node needs no proxy_arp (a sysctl an unprivileged agent could not set). Adapter: does
what it is told over the two netlink sockets it is given; decides nothing.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
from dataclasses import dataclass

from cni import rtnl
from cni.rtnl import Rtnl

GATEWAY = ipaddress.IPv4Address("169.254.1.1")
HOST_MAC = "ee:ee:ee:ee:ee:ee"
HOST_PREFIX = "fab"  # host-side veth names: fab + 12 hex digits of sha256(containerID/ifname)
DEFAULT = ipaddress.IPv4Network("0.0.0.0/0")
IFF_UP = 0x1


def host_ifname(container_id: str, ifname: str) -> str:
    return HOST_PREFIX + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:12]


def is_host_ifname(name: str) -> bool:
    return len(name) == len(HOST_PREFIX) + 12 and name.startswith(HOST_PREFIX) and \
        all(c in "0123456789abcdef" for c in name[len(HOST_PREFIX):])


class InterfaceExists(Exception):
    """The pod's namespace already has an interface of the requested name that is not ours."""


@dataclass(frozen=True)
class Built:
    host_mac: str
    pod_mac: str
    host_index: int


class PodLinks:
    def __init__(self, proto: int, table: int = rtnl.RT_TABLE_MAIN) -> None:
        self.proto = proto
        self.table = table

    def add(self, host: Rtnl, pod: Rtnl, ns_fd: int, *, host_name: str, ifname: str,
            address: ipaddress.IPv4Address, mtu: int) -> Built:
        """Build the pair and its addresses and routes. On failure nothing of it is left."""
        mac = bytes.fromhex(HOST_MAC.replace(":", ""))
        try:
            host.request([(rtnl.RTM_NEWLINK, rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL,
                           Rtnl.veth_body(host_name, ifname, mtu=mtu, mac=mac, peer_netns_fd=ns_fd),
                           f"create veth {host_name} / {ifname}")])
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
            if pod.link(ifname) is not None:
                raise InterfaceExists(f"the pod's namespace already has an interface {ifname}") from None
            # Our own leftover host side (an ADD that died half way): remove it and build afresh.
            self.delete(host, host_name)
            host.request([(rtnl.RTM_NEWLINK, rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL,
                           Rtnl.veth_body(host_name, ifname, mtu=mtu, mac=mac, peer_netns_fd=ns_fd),
                           f"create veth {host_name} / {ifname}")])
        try:
            h = host.link(host_name)
            p = pod.link(ifname)
            if h is None or p is None:
                raise OSError(errno.ENODEV, f"veth {host_name} / {ifname} vanished while being set up")
            gw = ipaddress.IPv4Network(f"{GATEWAY}/32")
            pod.request([
                (rtnl.RTM_NEWLINK, 0, Rtnl.up_body(1), "set lo up"),
                (rtnl.RTM_NEWLINK, 0, Rtnl.up_body(p.index), f"set {ifname} up"),
                (rtnl.RTM_NEWADDR, rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
                 Rtnl.addr_body(p.index, ipaddress.IPv4Interface(f"{address}/32")), f"address {address}/32"),
                (rtnl.RTM_NEWROUTE, rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
                 Rtnl.route_body(gw, oif=p.index, proto=self.proto, scope=rtnl.RT_SCOPE_LINK), f"route {GATEWAY}"),
                (rtnl.RTM_NEWROUTE, rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
                 Rtnl.route_body(DEFAULT, oif=p.index, proto=self.proto, gateway=GATEWAY), "default route"),
                (rtnl.RTM_NEWNEIGH, rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
                 Rtnl.neigh_body(p.index, GATEWAY, mac), f"neighbour {GATEWAY}"),
            ])
            host.request([(rtnl.RTM_NEWROUTE, rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
                           Rtnl.route_body(ipaddress.IPv4Network(f"{address}/32"), oif=h.index, proto=self.proto,
                                           scope=rtnl.RT_SCOPE_LINK, table=self.table), f"host route {address}/32")])
        except BaseException:
            self.delete(host, host_name)
            raise
        return Built(host_mac=h.mac, pod_mac=p.mac, host_index=h.index)

    def delete(self, host: Rtnl, host_name: str) -> bool:
        """Delete the pair by its host side (the pod side and the host route go with it). False if absent."""
        try:
            host.request([(rtnl.RTM_DELLINK, 0, Rtnl.del_link_body(host_name), f"delete {host_name}")])
            return True
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENOENT):
                return False
            raise

    def host_links(self, host: Rtnl) -> dict[str, rtnl.Link]:
        """Our host-side veths in this namespace, by name (a veth named like ours; nothing else)."""
        return {ln.name: ln for ln in host.links() if is_host_ifname(ln.name) and ln.kind == "veth"}

    def check(self, host: Rtnl, pod: Rtnl | None, *, host_name: str, ifname: str,
              address: ipaddress.IPv4Address) -> list[str]:
        """What is missing or wrong of what `add` built (empty: all there)."""
        problems: list[str] = []
        h = host.link(host_name)
        if h is None:
            problems.append(f"host interface {host_name} is missing")
        else:
            if h.kind != "veth":
                problems.append(f"host interface {host_name} is a {h.kind or 'non-veth'} device, not a veth")
            if not h.flags & IFF_UP:
                problems.append(f"host interface {host_name} is down")
            dst = ipaddress.IPv4Network(f"{address}/32")
            if not any(r.dst == dst and r.oif == h.index for r in host.routes(proto=self.proto, table=self.table)):
                problems.append(f"host route {dst} dev {host_name} (proto {self.proto}) is missing")
        if pod is None:
            problems.append("the pod's network namespace could not be opened")
            return problems
        p = pod.link(ifname)
        if p is None:
            problems.append(f"pod interface {ifname} is missing")
            return problems
        if not p.flags & IFF_UP:
            problems.append(f"pod interface {ifname} is down")
        if ipaddress.IPv4Interface(f"{address}/32") not in {a.address for a in pod.addrs(p.index)}:
            problems.append(f"pod interface {ifname} lacks {address}/32")
        routes = pod.routes()
        if not any(r.dst == DEFAULT and r.gateway == GATEWAY and r.oif == p.index for r in routes):
            problems.append(f"pod default route via {GATEWAY} dev {ifname} is missing")
        neigh = [n for n in pod.neighbours(p.index) if n.dst == GATEWAY]
        if not neigh or neigh[0].lladdr != HOST_MAC:
            problems.append(f"pod neighbour entry {GATEWAY} lladdr {HOST_MAC} is missing")
        return problems
