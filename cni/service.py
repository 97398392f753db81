"""The CNI verbs, done by the agent: ADD, DEL, CHECK, GC, STATUS over IPAM and the pod's veth.

`CniService.handle(env, stdin, fds)` is what the unix socket server calls for each plugin run; it
never raises: every failure becomes a CNI error result (code + msg). The node's facts come from the
agent through `set_network()` (pod CIDRs, pod MTU); until they are known STATUS says "not ready"
and ADD fails with error 11 (try again later), never hangs.

Decisions:
- ADD for an attachment (containerID, ifname) that already exists and is intact returns the same
  result and changes nothing (no second address). An interface of that name in the pod that is not
  ours is an error (spec: ADD MUST fail if the interface exists).
- DEL succeeds for unknown attachments and missing namespaces, and releases the address even when
  the interface could not be found.
- GC releases every allocation not in `cni.dev/valid-attachments` and deletes its host veth.
- `sweep()` (agent start): releases allocations whose host veth is gone (the pod's namespace was
  destroyed without a DEL, or the plugin did the DEL while the agent was down) and deletes our
  host veths that no allocation names.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cni import spec
from cni.ipam import Allocation, Exhausted, IpamStore
from cni.podlink import GATEWAY, InterfaceExists, PodLinks, host_ifname
from cni.rtnl import Rtnl
from cni.spec import Attachment, CniError, Request

log = logging.getLogger("cni.service")


@dataclass(frozen=True)
class NodeNetwork:
    """What the agent knows about this node that pods need."""

    pod_cidrs: tuple[ipaddress.IPv4Network, ...]
    mtu: int


@dataclass
class Counters:
    add: int = 0
    delete: int = 0
    check: int = 0
    gc: int = 0
    errors: int = 0
    last_error: str = ""
    released_by_sweep: int = 0
    released_by_gc: int = 0


@dataclass
class Fds:
    """Descriptors the plugin passed: the pod's netns and a netlink socket inside it (both owned here)."""

    netns: int | None = None
    netlink: int | None = None
    extra: list[int] = field(default_factory=list)

    def close(self) -> None:
        """Close what is still ours, once: a second close of a number the process has reused since
        would close someone else's descriptor."""
        fds = [self.netns, self.netlink, *self.extra]
        self.netns, self.netlink, self.extra = None, None, []
        for fd in fds:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


class CniService:
    def __init__(self, ipam: IpamStore, *, network: str, route_protocol: int,
                 on_change: Callable[[bool], None] = lambda hostports: None,
                 host: Callable[[], Rtnl] = Rtnl) -> None:
        self.ipam = ipam
        self.network = network
        self.links = PodLinks(route_protocol)
        self._node: NodeNetwork | None = None
        # An allocation came or went (True: with hostPorts, which the agent's nftables concern programs).
        self._on_change = on_change
        self._host = host
        self.counters = Counters()
        self._lock = threading.Lock()

    # -- inputs from the agent -------------------------------------------------------------------

    def set_network(self, node: NodeNetwork | None) -> None:
        self._node = node

    @property
    def node(self) -> NodeNetwork | None:
        return self._node

    # -- what the agent reads ---------------------------------------------------------------------

    def allocations(self) -> list[Allocation]:
        with self.ipam.locked():
            return self.ipam.all()

    # -- the entry point -------------------------------------------------------------------------

    def handle(self, env: dict[str, str], stdin: bytes, fds: Fds) -> tuple[int, bytes]:
        """(exit status, stdout) for one plugin invocation. Never raises."""
        version = "1.0.0"
        try:
            req = spec.parse_request(env, stdin)
            version = req.version
            out = self._dispatch(req, fds)
            return 0, spec.encode(out) if out is not None else b""
        except CniError as e:
            self._count_error(f"{env.get('CNI_COMMAND', '?')}: {e.msg}")
            return 1, spec.encode(e.to_json(version))
        except Exception as e:  # noqa: BLE001 - one bad request must never take the server down
            log.exception("CNI %s failed", env.get("CNI_COMMAND"))
            self._count_error(f"{env.get('CNI_COMMAND', '?')}: {e}")
            return 1, spec.encode(CniError(spec.IO_FAILURE, f"internal error: {type(e).__name__}", str(e))
                                  .to_json(version))
        finally:
            fds.close()

    def _count_error(self, msg: str) -> None:
        with self._lock:
            self.counters.errors += 1
            self.counters.last_error = msg[:300]

    def _dispatch(self, req: Request, fds: Fds) -> dict[str, Any] | None:
        if req.network != self.network:
            raise CniError(spec.INVALID_CONFIG, f"network {req.network!r}: this agent serves {self.network!r}")
        if req.command == "ADD":
            return self.add(req, fds)
        if req.command == "DEL":
            self.delete(req, fds)
            return None
        if req.command == "CHECK":
            self.check(req, fds)
            return None
        if req.command == "GC":
            self.gc(req.valid_attachments or frozenset())
            return None
        if req.command == "STATUS":
            self.status()
            return None
        return {"cniVersion": req.version, "supportedVersions": list(spec.SUPPORTED_VERSIONS)}  # VERSION

    # -- verbs ---------------------------------------------------------------------------------------

    def status(self) -> None:
        if self._node is None:
            raise CniError(spec.NOT_AVAILABLE, "bgp-fabric agent not ready: this node's pod CIDRs are not known yet")

    def add(self, req: Request, fds: Fds) -> dict[str, Any]:
        node = self._node
        if node is None:
            raise CniError(spec.TRY_AGAIN, "bgp-fabric agent not ready: this node's pod CIDRs are not known yet")
        if fds.netns is None or fds.netlink is None:
            raise CniError(spec.INVALID_ENV, f"CNI_NETNS {req.netns!r} could not be used",
                           req.netns_error or "the plugin passed no namespace")
        mtu = req.mtu or node.mtu
        with Rtnl(fds.netlink) as pod, self._host() as host:
            fds.netlink = None  # owned by `pod` now
            with self.ipam.locked():
                existing = self.ipam.find(*req.key)
                if existing is None:
                    try:
                        rec = self.ipam.allocate(node.pod_cidrs, Allocation(
                            ipaddress.IPv4Address(0), req.container_id, req.ifname,
                            host_ifname(req.container_id, req.ifname), req.netns, req.pod, req.port_mappings))
                    except Exhausted as e:
                        raise CniError(spec.ADDRESS_EXHAUSTED, "no free pod address on this node", str(e)) from None
            # The interface work happens outside the IPAM lock (concurrent ADDs build in parallel).
            if existing is not None:
                same = self._intact(host, pod, existing)
                if same is not None:  # ADD again for an attachment that is all there: the same result
                    with self._lock:
                        self.counters.add += 1
                    return spec.result(req.version, same)
                # Half there (e.g. the agent died in the middle of the first ADD): build it again on the
                # same address.
                self.links.delete(host, existing.host_ifname)
                rec = existing
            try:
                built = self.links.add(host, pod, fds.netns, host_name=rec.host_ifname, ifname=req.ifname,
                                       address=rec.address, mtu=mtu)
            except InterfaceExists as e:
                if existing is None:
                    self._release(rec)
                raise CniError(spec.INTERFACE_EXISTS, str(e)) from None
            except OSError as e:
                self._release(rec)
                raise CniError(spec.IO_FAILURE, f"setting up {req.ifname} failed", str(e)) from None
            except BaseException:
                self._release(rec)
                raise
        with self._lock:
            self.counters.add += 1
        self._on_change(bool(rec.port_mappings))
        return spec.result(req.version, Attachment(
            container_id=rec.container_id, ifname=rec.ifname, address=rec.address, host_ifname=rec.host_ifname,
            host_mac=built.host_mac, pod_mac=built.pod_mac, netns=req.netns, mtu=mtu, gateway=GATEWAY))

    def delete(self, req: Request, fds: Fds) -> None:
        with self._host() as host:
            with self.ipam.locked():
                rec = self.ipam.find(*req.key)
            name = rec.host_ifname if rec is not None else host_ifname(req.container_id, req.ifname)
            self.links.delete(host, name)
            if rec is not None:
                self._release(rec)
        with self._lock:
            self.counters.delete += 1
        if rec is not None:
            self._on_change(bool(rec.port_mappings))

    def check(self, req: Request, fds: Fds) -> None:
        with self.ipam.locked():
            rec = self.ipam.find(*req.key)
        if rec is None:
            raise CniError(spec.UNKNOWN_CONTAINER, f"no attachment {req.container_id}/{req.ifname} on this node")
        prev_ips = [ip.get("address") for ip in (req.prev_result or {}).get("ips", []) if isinstance(ip, dict)]
        if f"{rec.address}/32" not in prev_ips:
            raise CniError(spec.CHECK_FAILED, f"prevResult does not list {rec.address}/32", f"prevResult ips: {prev_ips}")
        pod = Rtnl(fds.netlink) if fds.netlink is not None else None
        fds.netlink = None
        try:
            with self._host() as host:
                problems = self.links.check(host, pod, host_name=rec.host_ifname, ifname=rec.ifname,
                                            address=rec.address)
        finally:
            if pod is not None:
                pod.close()
        with self._lock:
            self.counters.check += 1
        if problems:
            raise CniError(spec.CHECK_FAILED, problems[0], "; ".join(problems))

    def gc(self, valid: frozenset[tuple[str, str]]) -> list[Allocation]:
        """Release every allocation the runtime no longer lists; delete their host veths."""
        with self.ipam.locked():
            stale = [a for a in self.ipam.all() if a.key not in valid]
        with self._host() as host:
            for a in stale:
                self.links.delete(host, a.host_ifname)
                self._release(a)
        with self._lock:
            self.counters.gc += 1
            self.counters.released_by_gc += len(stale)
        if stale:
            self._on_change(any(a.port_mappings for a in stale))
        for a in stale:
            log.info("CNI GC: released %s (%s/%s)", a.address, a.container_id, a.ifname)
        return stale

    def sweep(self) -> list[Allocation]:
        """At start: allocations whose host veth is gone are released; our veths nobody owns are deleted."""
        with self._host() as host, self.ipam.locked():
            links = self.links.host_links(host)
            allocs = self.ipam.all()
            gone = [a for a in allocs if a.host_ifname not in links]
            for a in gone:
                self.ipam.release(a)
            owned = {a.host_ifname for a in allocs}
            orphans = [name for name in links if name not in owned]
            for name in orphans:
                self.links.delete(host, name)
        with self._lock:
            self.counters.released_by_sweep += len(gone)
        for a in gone:
            log.info("CNI sweep: released %s (%s/%s): its interface is gone", a.address, a.container_id, a.ifname)
        for name in orphans:
            log.info("CNI sweep: deleted %s: no allocation names it", name)
        if gone:
            self._on_change(any(a.port_mappings for a in gone))
        return gone

    # -- helpers -------------------------------------------------------------------------------------

    def _release(self, rec: Allocation) -> None:
        with self.ipam.locked():
            cur = self.ipam.holder(rec.address)
            if cur is not None and cur.key == rec.key:
                self.ipam.release(cur)

    def _intact(self, host: Rtnl, pod: Rtnl, rec: Allocation) -> Attachment | None:
        """The attachment as it is in the kernel, if everything ADD builds is there."""
        if self.links.check(host, pod, host_name=rec.host_ifname, ifname=rec.ifname, address=rec.address):
            return None
        h, p = host.link(rec.host_ifname), pod.link(rec.ifname)
        if h is None or p is None:
            return None
        return Attachment(container_id=rec.container_id, ifname=rec.ifname, address=rec.address,
                          host_ifname=rec.host_ifname, host_mac=h.mac, pod_mac=p.mac, netns=rec.netns, mtu=p.mtu,
                          gateway=GATEWAY)
