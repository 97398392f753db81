"""The agent's handle on the service proxy: one sync per call, on the agent's kernel thread.

`sync` never raises: the proxy records failures per service (and per node-level concern) with a
retry time, which `next_deadline(now)` gives the agent's runner so it wakes for the retry and not
before. A problem is logged once, when it appears or changes (one line, no traceback), and its
recovery once; `status()` lists what is failing now and when it is retried.

Two kinds of problem, kept apart in status and metrics: a **skipped** service (its object has a field
the proxy can't use: bad input, reported and not retried — the next change of the object is its next
chance) and a **failing** one (the kernel refused or did not answer: retried alone with backoff).
Only failing ones are the stage's failures (`failing()`); skipped ones are `skipped()`.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fabric.config import AgentConfig
from fabric.tracker import Changes, Store
from loadbalancer.proxy import ServiceProxy

log = logging.getLogger("fabric.services")

OWNED_FILE = "ipvs-owned"
TABLE_ROWS = 500  # virtual servers listed in status.json (counts cover all; explain shows any one)  # in paths.runDir: the IPVS virtual servers this agent made


class ServiceSync:
    def __init__(self, cfg: AgentConfig, run_dir: Path | None = None, *,
                 clock: Callable[[], float] = time.monotonic, **proxy_args: Any) -> None:
        """`run_dir`: the agent's resolved paths.runDir (default: cfg.paths.run_dir as given — the agent
        passes it absolute, since a relative one is relative to the config file)."""
        self._clock = clock
        run_dir = run_dir if run_dir is not None else Path(cfg.paths.run_dir)
        self.proxy = ServiceProxy(cfg.services, cfg.node.name, [str(cfg.node.address.ip)],
                                  state_path=run_dir / OWNED_FILE, clock=clock, **proxy_args)
        self.last_errors: dict[str, list[str]] = {}  # every standing problem, as logged (skipped or failing)
        self.kernel_ops = 0
        self._noted: str | None = None
        self._skipped_logged: dict[str, tuple[str, ...]] = {}

    def set_node_addresses(self, addresses: tuple[str, ...]) -> None:
        """The addresses NodePorts are served on changed (the next sync plans every service again)."""
        self.proxy.set_node_addresses(list(addresses))

    def sync(self, store: Store, changes: Changes, full: bool = False) -> None:
        if full:
            self.proxy.request_full()
        result = self.proxy.sync(store, changes)
        self.kernel_ops += result.kernel_ops
        standing = self._standing(result.errors)
        skipped = self.proxy.errors()
        for key, errs in sorted(standing.items()):
            if self.last_errors.get(key) != errs:
                for e in errs:
                    if key in skipped:
                        log.warning("%s skipped (not retried until the object changes): %s", _subject(key), e)
                    else:
                        log.error("%s: %s", _subject(key), e)
        for key in sorted(self.last_errors.keys() - standing.keys()):
            log.info("%s: recovered", _subject(key))
        self.last_errors = standing
        entries = self.proxy.warnings()  # malformed slice entries (an address that is not IPv4, ...): said once
        for svc, ws in sorted(entries.items()):
            for w in ws:
                if w not in self._skipped_logged.get(svc, ()):
                    log.warning("service %s: %s", svc, w)
        self._skipped_logged = entries
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

    def skipped(self) -> dict[str, str]:
        """Services not programmed because of bad input (reported, not retried)."""
        return self.proxy.errors()

    def failing(self) -> dict[str, str]:
        """What the kernel refused, retried alone with backoff: services and node-level concerns."""
        return {key: "; ".join(f["errors"]) for key, f in self.proxy.failing(self._clock()).items()}

    def errors(self) -> list[str]:
        """One line per failing service or node-level concern, and node problems not retried (a sysctl):
        the document's errors. Skipped services are not errors of the node (status `skipped`)."""
        skipped = self.proxy.errors()
        return [f"{_subject(key)}: {e}" for key, errs in sorted(self.last_errors.items()) if key not in skipped
                for e in errs]

    def metrics(self, status: dict[str, Any]) -> list[Any]:
        from fabric.stage import Gauge
        from loadbalancer.nft import TABLE

        out = [Gauge("ipvs_services", "IPVS virtual servers the agent programs", status["virtualServers"]),
               Gauge("ipvs_destinations", "IPVS destinations (real servers) of those virtual servers",
                     status["realServers"]),
               Gauge("services_skipped", "Services not programmed: a field the agent can't use",
                     len(status["skipped"])),
               Gauge("services_failing", "Services (and node-level concerns) whose kernel writes failed, retried "
                     "with backoff", len(status["failing"])),
               Gauge("nft_rules", "Rules in an nftables table of the agent", self.proxy.nft_rules(),
                     (("table", f"inet {TABLE}"),))]
        out += [Gauge("nft_elements", "Elements in a set of an nftables table of the agent", n,
                      (("table", f"inet {TABLE}"), ("set", name))) for name, n in sorted(self.proxy.nft_counts.items())]
        return out

    def status(self) -> dict[str, Any]:
        desired = self.proxy.desired()
        failing = self.proxy.failing(self._clock())
        owner = self.proxy.owner
        rows = []
        for key in heapq.nsmallest(TABLE_ROWS, desired, key=lambda k: (k[1], k[2], k[0])):
            v, svc = desired[key], owner(key)
            rows.append({"vs": f"{v.proto} {v.addr}:{v.port}", "service": svc, "scheduler": v.options_text(),
                         "destinations": len(v.reals), "ready": sum(1 for r in v.reals if r.weight > 0),
                         "state": "FAILING" if svc in failing else "ok"})
        return {"virtualServers": len(desired), "table": rows, "tableTruncated": max(0, len(desired) - TABLE_ROWS),
                "realServers": sum(len(v.reals) for v in desired.values()),
                "skipped": self.proxy.errors(), "skippedSliceEntries": self.proxy.warnings(),
                "skippedSlices": self.proxy.slice_errors(), "failing": self.proxy.failing(self._clock()),
                "errors": self.errors(), "warnings": self.proxy.node_warnings()}

    def explain(self, what: str) -> str:
        return self.proxy.explain(what)

    def close(self) -> None:
        self.proxy.close()


def _subject(key: str) -> str:
    """"service ns/name", or "services (nft)" for a node-level concern."""
    return f"services {key}" if key.startswith("(") else f"service {key}"


def make_service_proxy(cfg: AgentConfig, run_dir: Path | None = None) -> ServiceSync:
    return ServiceSync(cfg, run_dir)
