"""The services stage: Services/EndpointSlices -> IPVS + the service nftables table (loadbalancer/).

On its own worker: a failing or hung service proxy (a stuck `nft`, an IPVS that refuses) never
delays routes. Waits for the source's first complete list (an empty Store would mean "delete every
service"). The proxy reports per-service failures and their retry deadlines; if it raises, the runner
puts the changes back and retries with backoff. The stage's failures (its failing keys) are only what
the kernel refused and is retried; a service skipped for bad input is reported in status (`skipped`),
not counted as failing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fabric.node_addresses import nodeport_addresses, read_local_addresses
from fabric.stage import Stage, StageInput, StageResult
from fabric.tracker import Changes


class ServicesStage(Stage):
    name = "services"
    kinds = frozenset({"Service", "EndpointSlice"})
    on_worker = True
    needs_source = True

    def __init__(self, agent: Any, factory: Callable[[Any], Any],
                 read_addresses: Callable[[], list[tuple[str, Any]]] = read_local_addresses) -> None:
        self.agent = agent
        self._factory = factory
        self.sync: Any = None
        self._read_addresses = read_addresses
        self._addresses_changed = True  # set on the loop by the agent's address monitor
        self.node_port_addresses: tuple[str, ...] | None = None

    def addresses_changed(self) -> None:
        """An IPv4 address came or went on this node: re-read them at the next run (nodePortAddresses)."""
        self._addresses_changed = True

    def _follow_addresses(self, full: bool) -> None:
        """The addresses NodePorts are served on (fabric.node_addresses), read again on a full run or
        after an address event, only when `services.nodePortAddresses` asks for interface addresses."""
        if not hasattr(self.sync, "set_node_addresses"):
            return
        cfg = self.agent.cfg
        cidrs = cfg.services.node_port_addresses
        if cidrs and (full or self._addresses_changed or self.node_port_addresses is None):
            self._addresses_changed = False
            try:
                local = self._read_addresses()
            except OSError:
                self._addresses_changed = True  # the run fails; its retry reads again
                raise
        elif cidrs:
            return
        else:
            local = []
        want = nodeport_addresses(cfg.node.address.ip, cidrs, local,
                                  (cfg.services.device, cfg.dataplane.tunnel_device))
        if want != self.node_port_addresses:
            self.node_port_addresses = want
            self.sync.set_node_addresses(want)

    def run(self, inp: StageInput, prepared: Any) -> StageResult:
        if self.sync is None:
            self.sync = self._factory(self.agent)
        try:
            self._follow_addresses(inp.full)
        except OSError as e:
            return StageResult(error=f"reading the node's addresses for NodePorts: {e}")
        changes = Changes(inp.changes.keys, inp.changes.full or inp.full)
        self.sync.sync(self.agent.store, changes, inp.full)
        status = dict(self.sync.status()) if hasattr(self.sync, "status") else {}
        if self.node_port_addresses is not None:
            status["nodePortAddresses"] = list(self.node_port_addresses)
        failures = dict(self.sync.failing()) if hasattr(self.sync, "failing") else {}
        deadline = self.sync.next_deadline(inp.now) if hasattr(self.sync, "next_deadline") else None
        if getattr(self.sync, "warnings", None):
            status.setdefault("warnings", list(self.sync.warnings))
        metrics = self.sync.metrics(status) if hasattr(self.sync, "metrics") else []
        bad = {("Service", k): v for k, v in self.sync.skipped().items()} if hasattr(self.sync, "skipped") else {}
        proxy = getattr(self.sync, "proxy", None)
        if proxy is not None and hasattr(proxy, "slice_errors"):
            bad.update({("EndpointSlice", k): v for k, v in proxy.slice_errors().items()})
        return StageResult(failures=failures, next_deadline=deadline, status=status, metrics=metrics,
                           bad_objects=bad)

    def close(self) -> None:
        if self.sync is not None and hasattr(self.sync, "close"):
            self.sync.close()
