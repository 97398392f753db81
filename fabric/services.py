"""The agent's handle on the service proxy: one sync per call, on the agent's kernel thread.

`sync` never raises: the proxy records failures per service (and per node-level concern) with a
retry time, which `next_deadline(now)` gives the agent's runner so it wakes for the retry and not
before. A problem is logged once, when it appears or changes (one line, no traceback), and its
recovery once; `status()` lists what is failing now and when it is retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fabric.config import AgentConfig
from fabric.tracker import Changes, Store
from loadbalancer.proxy import ServiceProxy

log = logging.getLogger("fabric.services")

OWNED_FILE = "ipvs-owned"  # in paths.runDir: the IPVS virtual servers this agent made


class ServiceSync:
    def __init__(self, cfg: AgentConfig, run_dir: Path | None = None, *,
                 clock: Callable[[], float] = time.monotonic, **proxy_args: Any) -> None:
        """`run_dir`: the agent's resolved paths.runDir (default: cfg.paths.run_dir as given — the agent
        passes it absolute, since a relative one is relative to the config file)."""
        self._clock = clock
        run_dir = run_dir if run_dir is not None else Path(cfg.paths.run_dir)
        self.proxy = ServiceProxy(cfg.services, cfg.node.name, [str(cfg.node.address.ip)],
                                  state_path=run_dir / OWNED_FILE, clock=clock, **proxy_args)
        self.last_errors: dict[str, list[str]] = {}
        self.kernel_ops = 0
        self._noted: str | None = None

    def sync(self, store: Store, changes: Changes, full: bool = False) -> None:
        if full:
            self.proxy.request_full()
        result = self.proxy.sync(store, changes)
        self.kernel_ops += result.kernel_ops
        standing = self._standing(result.errors)
        for key, errs in sorted(standing.items()):
            if self.last_errors.get(key) != errs:
                for e in errs:
                    log.error("%s: %s", _subject(key), e)
        for key in sorted(self.last_errors.keys() - standing.keys()):
            log.info("%s: recovered", _subject(key))
        self.last_errors = standing
        for w in result.warnings:
            log.warning("services: %s", w)
        note = self.proxy.ownership_note()
        if note and note != self._noted:
            log.info("services: %s", note)
            self._noted = note
        if result.kernel_ops:
            log.info("services: %s", result)

    def _standing(self, errors: dict[str, list[str]]) -> dict[str, list[str]]:
        """What is wrong now: skipped services, failing ones (until their retry succeeds), node problems."""
        out = {s: [why] for s, why in self.proxy.errors().items()}
        out.update({s: f["errors"] for s, f in self.proxy.failing(self._clock()).items()})
        seen = {e for es in out.values() for e in es}
        node = [e for e in errors.get(ServiceProxy.ERROR_NODE, []) if e not in seen]
        if node:
            out[ServiceProxy.ERROR_NODE] = node
        return out

    def next_deadline(self, now: float) -> float | None:
        return self.proxy.next_deadline(now)

    def status(self) -> dict[str, Any]:
        desired = self.proxy.desired()
        return {"virtualServers": len(desired),
                "realServers": sum(len(v.reals) for v in desired.values()),
                "skipped": self.proxy.errors(), "skippedSliceEntries": self.proxy.warnings(),
                "skippedSlices": self.proxy.slice_errors(), "failing": self.proxy.failing(self._clock()),
                "errors": self.last_errors, "warnings": self.proxy.node_warnings()}

    def explain(self, what: str) -> str:
        return self.proxy.explain(what)

    def close(self) -> None:
        self.proxy.close()


def _subject(key: str) -> str:
    """"service ns/name", or "services (nft)" for a node-level concern."""
    return f"services {key}" if key.startswith("(") else f"service {key}"


def make_service_proxy(cfg: AgentConfig, run_dir: Path | None = None) -> ServiceSync:
    return ServiceSync(cfg, run_dir)
