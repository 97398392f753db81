"""The pod NAT stage: table `ip bgp-fabric-pods` — natOutgoing of the pools, and the pods' hostPorts.

On its own worker (it runs `nft`, which can hang: bounded by a timeout, and a hung run never delays
another stage). Desired state (cni.podnft, pure) = the pools with `natOutgoing`, every pool and the
service ranges (`advertise.serviceClusterIPs/ExternalIPs/LoadBalancerIPs`: traffic to them is not
masqueraded), and the hostPorts of this node's pods (from the CNI stage). natOutgoing is a pool
property: applied whether or not the CNI part is on, as Calico's.

O(change): a pod's hostPorts are element deltas in one transaction; a pool or service-range change,
the periodic full resync and a failed delta rewrite the table whole in one transaction. A failed
`nft` run fails the run (the runner retries it with backoff and shows the error); a kernel without
IPv4 nftables NAT (the user-mode-Linux lab kernel) is a node fact, not an error: a warning, tried
again at the next full resync. Waits for the source's first complete list (the pools come from
IPPool objects). Woken by effective-config changes (the agent) and hostPort changes (the CNI stage).
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Callable
from typing import Any

from cni import podnft
from fabric.config import AgentConfig
from fabric.stage import Stage, StageInput, StageResult

log = logging.getLogger("fabric.stages.podnat")

NFT_TIMEOUT = 10.0
UNSUPPORTED = ("Operation not supported", "Protocol not supported")


def service_ranges(cfg: AgentConfig) -> list[ipaddress.IPv4Network]:
    a = cfg.advertise
    return [*a.service_cluster_ips, *a.service_external_ips, *a.service_load_balancer_ips]


def run_nft(script: str) -> str | None:
    """Apply an nft script in one transaction; returns an error text or None."""
    try:
        r = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=NFT_TIMEOUT)
    except FileNotFoundError:
        return "nft is not installed"
    except subprocess.TimeoutExpired:
        return f"nft did not finish within {NFT_TIMEOUT:.0f}s"
    if r.returncode != 0:
        text = (r.stderr or r.stdout).strip()
        return text.splitlines()[0] if text else f"nft exit {r.returncode}"
    return None


class PodNatStage(Stage):
    name = "podnat"
    kinds: frozenset[str] = frozenset()
    on_worker = True
    needs_source = True

    def __init__(self, agent: Any, *, nft: Callable[[str], str | None] = run_nft) -> None:
        self.agent = agent
        self._nft = nft
        self.applied: podnft.Desired | None = None
        self.unsupported: str | None = None  # this kernel has no IPv4 nftables NAT

    def prepare(self, inp: StageInput) -> Any:
        return self.agent.cfg, getattr(self.agent, "cni_stage", None)

    def run(self, inp: StageInput, prepared: Any) -> StageResult:
        cfg, cni_stage = prepared
        hostports = [podnft.HostPort(ip, m) for ip, m in (cni_stage.hostports() if cni_stage is not None else [])]
        want, conflicts = podnft.desired([p.cidr for p in cfg.pools if p.nat_outgoing and not p.disabled],
                                         [p.cidr for p in cfg.pools], service_ranges(cfg), hostports)
        for c in conflicts:
            log.warning("hostPort conflict: %s", c)
        warnings = [f"hostPort conflict: {c}" for c in conflicts]
        if self.unsupported and not inp.full:
            return self._result(want, warnings)
        if not inp.full and self.applied is not None and want == self.applied:
            return self._result(want, warnings)
        a = self.applied
        if inp.full or a is None or (want.natsrc, want.natskip) != (a.natsrc, a.natskip):
            err = self._nft(podnft.render_full(want))
        else:
            err = self._nft(podnft.render_delta(want.elements - a.elements, a.elements - want.elements))
            if err:  # the table drifted or is gone: rewrite it whole
                err = self._nft(podnft.render_full(want))
        if err and any(u in err for u in UNSUPPORTED):
            if err != self.unsupported:
                log.warning("this kernel has no IPv4 nftables NAT (%s): natOutgoing and hostPorts are not applied", err)
            self.unsupported, self.applied = err, None
            return self._result(want, warnings)
        if err:
            self.applied = None
            return StageResult(error=f"nft table ip {podnft.TABLE}: {err}", status=self._status(want, warnings))
        self.unsupported, self.applied = None, want
        return self._result(want, warnings)

    def _result(self, want: podnft.Desired, warnings: list[str]) -> StageResult:
        return StageResult(status=self._status(want, warnings))

    def _status(self, want: podnft.Desired, warnings: list[str]) -> dict[str, Any]:
        if self.unsupported:
            warnings = [*warnings, f"nftables table ip {podnft.TABLE} not programmed: this kernel has no IPv4 "
                                   f"nftables NAT ({self.unsupported}); natOutgoing and hostPorts are not applied"]
        hostports = sum(1 for n, _ in want.elements if n != "hairpin")
        return {"summary": f"table {podnft.FAMILY} {podnft.TABLE} "
                           f"{'programmed' if self.applied is not None else 'NOT programmed'}: natOutgoing from "
                           f"{', '.join(map(str, want.natsrc)) or 'no pool'}, {hostports} hostPort(s)",
                "table": f"{podnft.FAMILY} {podnft.TABLE}", "programmed": self.applied is not None,
                "natSources": [str(n) for n in want.natsrc],
                "hostPorts": sum(1 for n, _ in want.elements if n != "hairpin"),
                **({"warnings": warnings} if warnings else {})}
