"""The node's own IPv4 addresses that serve NodePorts when `services.nodePortAddresses` is set.

kube-proxy's `--nodeport-addresses` semantics: every address on the node's interfaces inside one of the
CIDRs. Not the addresses this agent puts on devices itself (the service device's service IPs, the IPIP
tunnel's address) and not loopback (IPVS answers there only with route_localnet, which the agent leaves
alone). With the list empty only `node.address` serves NodePorts — kube-proxy's nftables-mode default
("primary"), and the safe one: a NodePort never appears on an interface the operator didn't name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from ipip import netlink as nl
from ipip import rtnl

READ_TIMEOUT = 5.0  # an address dump of this namespace; the kernel answers in microseconds


def nodeport_addresses(node_address: ipaddress.IPv4Address, cidrs: Iterable[ipaddress.IPv4Network],
                       local: Iterable[tuple[str, ipaddress.IPv4Address]], own_devices: Iterable[str]) -> tuple[str, ...]:
    """Pure: the addresses to give the service proxy. `local`: (device, address) of every IPv4 address."""
    nets = list(cidrs)
    if not nets:
        return (str(node_address),)
    skip = set(own_devices)
    found = {a for dev, a in local if dev not in skip and not a.is_loopback and any(a in n for n in nets)}
    return tuple(str(a) for a in sorted(found))


def read_local_addresses(timeout: float = READ_TIMEOUT) -> list[tuple[str, ipaddress.IPv4Address]]:
    """(device, address) of every IPv4 address in this namespace. OSError on failure or timeout."""
    sock = nl.open_netlink(nl.NETLINK_ROUTE, timeout)
    try:
        seq = nl.Sequence32()
        s = seq.next()
        names = {ln.index: ln.name for _t, b in nl.request(sock, rtnl.link_dump_request(s), s, "link dump")
                 if (ln := rtnl.decode_link(b))}
        s = seq.next()
        addrs = [a for _t, b in nl.request(sock, rtnl.addr_dump_request(s), s, "address dump")
                 if (a := rtnl.decode_addr(b))]
    finally:
        sock.close()
    return [(names.get(a.index, "?"), a.address) for a in addrs]
