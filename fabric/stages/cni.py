"""The CNI stage: the plugin's agent side (cni/) and the conflist the runtime reads.

On its own worker. Its first run sweeps the IPAM state (allocations whose pod interface is gone are
released; our veths that no allocation names are deleted) and then serves the plugin's unix socket;
every run brings the node's facts up to date for the CNI service and writes the conflist when it
changes. Decisions:

- the node's pod CIDRs: the config's `node.podCIDRs`, else the Node object's `spec.podCIDRs` — also a
  remembered last-good Node, so pods can start while the API server is away after an agent restart;
- the pod MTU: the underlay MTU (the routes stage's facts) − 20 when any enabled pool uses IPIP
  (Always or CrossSubnet), else the underlay MTU — the tunnel's rule;
- the conflist is written once both are known (kubelet reports the node NotReady until then, and the
  plugin's STATUS says why), atomically, and only when its content changes.

It does not wait for the source's first list: DEL and GC must work during an API outage. It runs when
the Node changes, when the effective config or the underlay MTU changes (the agent wakes it), and
when a pod comes or goes (the CNI service wakes it: its status lists the node's pods).
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

from cni import conflist
from cni.ipam import IpamStore
from cni.server import CniServer
from cni.service import CniService, NodeNetwork
from fabric.bgp_desired import local_pod_cidrs
from fabric.config import AgentConfig
from fabric.stage import Stage, StageInput, StageResult
from ipip.model import IPIP_OVERHEAD, IPIPMode

log = logging.getLogger("fabric.stages.cni")


def pod_mtu(cfg: AgentConfig, underlay_mtu: int) -> int:
    ipip = any(p.ipip_mode is not IPIPMode.NEVER and not p.disabled for p in cfg.pools)
    return underlay_mtu - IPIP_OVERHEAD if ipip else underlay_mtu


class CniStage(Stage):
    name = "cni"
    kinds = frozenset({"Node"})
    on_worker = True
    needs_source = False

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.service: CniService | None = None
        self.server: CniServer | None = None
        self.mtu: int | None = None  # the underlay MTU of the last run (the agent wakes us when it changes)
        self._node: NodeNetwork | None = None
        self._written: str | None = None
        self._released = 0

    def prepare(self, inp: StageInput) -> Any:
        a = self.agent
        rs = a.routes_stage
        facts = rs.view.facts if rs is not None and rs.view is not None else None
        me = a.store.last_good("Node", a.cfg.node.name)
        return a.cfg, local_pod_cidrs(a.cfg, me), facts.mtu if facts is not None else None

    def hostports(self) -> list[tuple[ipaddress.IPv4Address, Any]]:
        """(pod address, port mapping) of every pod on this node (any thread)."""
        if self.service is None:
            return []
        return [(a.address, m) for a in self.service.allocations() for m in a.port_mappings]

    def _changed(self, hostports: bool) -> None:  # from the CNI service's threads
        runner = self.agent.runner
        if runner is not None:
            runner.wake_threadsafe("cni")
            if hostports and "podnat" in runner.states:
                runner.wake_threadsafe("podnat")

    def run(self, inp: StageInput, prepared: Any) -> StageResult:
        cfg, pod_cidrs, underlay_mtu = prepared
        c = cfg.cni
        self.mtu = underlay_mtu
        if self.service is None:
            svc = CniService(IpamStore(self.agent._path(c.state_dir), c.network), network=c.network,
                             route_protocol=c.route_protocol, on_change=self._changed)
            gone = svc.sweep()
            self._released = len(gone)
            if gone:
                log.info("CNI: %d address(es) of pods that are gone released at start", len(gone))
            self.service = svc
        if self.server is None:
            srv = CniServer(self.agent._path(c.socket), self.service.handle)
            srv.start()  # an OSError (folder, socket) fails the run: retried with backoff, reported
            self.server = srv
        node = NodeNetwork(tuple(pod_cidrs), pod_mtu(cfg, underlay_mtu)) if pod_cidrs and underlay_mtu else None
        if node != self._node:
            self._node = node
            self.service.set_network(node)
            log.info("CNI: pod CIDRs %s, pod MTU %s", ", ".join(map(str, pod_cidrs)) or "not known yet",
                     node.mtu if node else "not known yet")
        warnings = []
        path = self.agent._path(c.conf_dir) / c.conf_file
        if node is None:
            warnings.append("CNI: this node's pod CIDRs (or its underlay MTU) are not known yet: no conflist, "
                            "pods can't start")
        else:
            conf = conflist.render(network=c.network, socket_path=str(self.server.path), mtu=node.mtu)
            text = conflist.text(conf)
            if text != self._written:
                if conflist.write(path, conf):
                    log.info("CNI: wrote %s", path)
                self._written = text
        return StageResult(status=self._status(path, warnings))

    def _status(self, path: Path, warnings: list[str]) -> dict[str, Any]:
        assert self.service is not None
        k = self.service.counters
        allocs = self.service.allocations()
        cidrs = ", ".join(str(c) for c in (self._node.pod_cidrs if self._node else ())) or "pod CIDRs not known yet"
        return {
            "summary": f"{len(allocs)} pod(s) on {cidrs}, pod MTU {self._node.mtu if self._node else '?'}, conflist "
                       f"{path if self._written else 'not written yet'}; ADD {k.add}, DEL {k.delete}, errors {k.errors}",
            "conflist": str(path) if self._written else None,
            "socket": str(self.server.path) if self.server else None,
            "podCIDRs": [str(c) for c in (self._node.pod_cidrs if self._node else ())],
            "mtu": self._node.mtu if self._node else None,
            "pods": [{"address": str(a.address), "containerID": a.container_id, "ifname": a.ifname,
                      "hostIfname": a.host_ifname, "pod": a.pod, "hostPorts": [m.to_json() for m in a.port_mappings]}
                     for a in allocs],
            "counters": {"add": k.add, "del": k.delete, "check": k.check, "gc": k.gc, "errors": k.errors,
                         "releasedBySweep": k.released_by_sweep, "releasedByGC": k.released_by_gc},
            **({"lastError": k.last_error} if k.last_error else {}),
            **({"warnings": warnings} if warnings else {}),
        }

    def close(self) -> None:
        # The conflist stays: running pods keep working, and a new ADD fails with "try again" until the
        # agent is back (the plugin can't reach the socket).
        if self.server is not None:
            self.server.stop()
