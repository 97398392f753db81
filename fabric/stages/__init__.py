"""The agent's stages (each runs on its own; see fabric.stage for the protocol).

`build(agent)` is the registry: a new concern of the node (a CNI conflist writer, a pod NAT table, a
NetworkPolicy table, metrics) is one more Stage appended here.
"""

from __future__ import annotations

from typing import Any

from fabric.stage import Stage
from fabric.stages.bgp import BgpStage
from fabric.stages.config import ConfigStage
from fabric.stages.routes import RoutesStage


def build(agent: Any, config: ConfigStage | None = None) -> list[Stage]:
    """`config`: the config stage the agent already made (it computes the config ExaBGP starts with)."""
    # The stages outside BGP and routing are imported only here, after the agent has started ExaBGP: their
    # modules (CNI server, nft policy, IPVS proxy: ~0.1-0.15 s in the lab kernel) load while ExaBGP
    # starts, not before it is spawned (start-up: the sessions are what a starting node waits for).
    from fabric.stages.cni import CniStage
    from fabric.stages.podnat import PodNatStage
    from fabric.stages.policy import PolicyStage
    from fabric.stages.services import ServicesStage

    stages: list[Stage] = [
        config if config is not None else ConfigStage(agent, agent.effective, agent.remembered),
        BgpStage(agent),
        RoutesStage(agent, agent.kernel_factory, sysctls=agent.sysctls),
    ]
    if agent.services_factory is not None:
        stages.append(ServicesStage(agent, agent.services_factory))
    if agent.policy_factory is not None:
        stages.append(PolicyStage(agent, agent.policy_factory(agent)))
    if agent.cfg.cni.enabled:
        stages.append(CniStage(agent))
    stages.append(PodNatStage(agent))  # natOutgoing is a pool property: with or without the CNI part
    return stages
