"""The effective agent configuration: the config file overlaid with cluster objects (pure).

IPPool, BGPPeer and BGPConfiguration objects (Kubernetes custom resources, or the same shapes in a
lab's cluster file) replace the file's pools / peers / cluster settings when present. A bad object
is reported (`Kind/name: field: reason`) and its last good version is kept, so a typo in one object
never flushes working routes.
"""

from __future__ import annotations

from typing import Any

from fabric.config import AgentConfig


def effective_config(base: AgentConfig, bgp_configurations: dict[str, Any], bgp_peers: dict[str, Any],
                     ip_pools: dict[str, Any], previous: AgentConfig | None = None) -> tuple[AgentConfig, list[str]]:
    try:
        from fabric import crds
    except ImportError:
        crds = None  # type: ignore[assignment]
    if crds is not None and hasattr(crds, "effective_config"):
        return crds.effective_config(base, bgp_configurations, bgp_peers, ip_pools, previous=previous)
    return _pools_only(base, ip_pools, previous)


def _pools_only(base: AgentConfig, ip_pools: dict[str, Any], previous: AgentConfig | None
                ) -> tuple[AgentConfig, list[str]]:
    from pydantic import ValidationError

    from fabric.config import Pool, format_errors

    if not ip_pools:
        return base, []
    last_good = {str(p.cidr): p for p in (previous.pools if previous else [])}
    pools: list[Pool] = []
    problems: list[str] = []
    for name, obj in sorted(ip_pools.items()):
        spec = (obj or {}).get("spec") or {}
        try:
            pools.append(Pool.model_validate({k: v for k, v in spec.items() if k != "blockSize"}))
        except ValidationError as e:
            problems += [f"IPPool/{name}: spec.{line}" for line in format_errors(e)]
            keep = last_good.get(str(spec.get("cidr")))
            if keep is not None:
                pools.append(keep)
    return base.model_copy(update={"pools": pools}), problems
