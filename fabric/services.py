"""The agent's handle on the service proxy: plan + apply per sync, on the agent's kernel thread."""

from __future__ import annotations

import logging
from typing import Any

from fabric.config import AgentConfig
from fabric.tracker import Changes, Store
from loadbalancer.proxy import ServiceProxy

log = logging.getLogger("fabric.services")


class ServiceSync:
    def __init__(self, cfg: AgentConfig) -> None:
        self.proxy = ServiceProxy(cfg.services, cfg.node.name, [str(cfg.node.address.ip)])
        self.last_errors: dict[str, list[str]] = {}
        self.warnings: list[str] = []
        self.kernel_ops = 0

    def sync(self, store: Store, changes: Changes, full: bool) -> None:
        plan = self.proxy.plan(store, changes)
        if not plan and not full and not self.last_errors:
            return
        result = self.proxy.apply(plan)
        self.kernel_ops += result.kernel_ops
        self.warnings = list(result.warnings)
        new = {s: e for s, e in result.errors.items() if self.last_errors.get(s) != e}
        for svc, errs in sorted(new.items()):
            for e in errs:
                log.error("service %s: %s", svc, e)
        self.last_errors = result.errors
        if result.kernel_ops:
            log.info("services: %s", result)

    def status(self) -> dict[str, Any]:
        desired = self.proxy.desired()
        return {"virtualServers": len(desired),
                "realServers": sum(len(v.reals) for v in desired.values()),
                "skipped": self.proxy.errors(), "skippedSliceEntries": self.proxy.warnings(),
                "skippedSlices": self.proxy.slice_errors(), "errors": self.last_errors, "warnings": self.warnings}

    def explain(self, what: str) -> str:
        return self.proxy.explain(what)

    def close(self) -> None:
        self.proxy.close()


def make_service_proxy(cfg: AgentConfig) -> ServiceSync:
    return ServiceSync(cfg)
