"""BGP sessions as a lab sees them, read from FRR's JSON or the agent's status.json (pure parsing)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ESTABLISHED = "established"


@dataclass(frozen=True)
class Session:
    node: str  # the lab node that reports it
    peer: str  # peer address (or interface / name when it has no address)
    state: str  # lower case: established, active, connect, idle, ...
    remote_as: str = ""
    name: str = ""  # the peer's name when the speaker knows it
    prefixes: int | None = None  # prefixes received

    @property
    def established(self) -> bool:
        return self.state == ESTABLISHED


def from_frr_summary(node: str, text: str) -> list[Session]:
    """Sessions in `vtysh -c 'show bgp summary json'` output, one per peer over all address families.

    A peer shown in several families is one session; it counts as established if any family says so.
    Raises ValueError on output that is not FRR's JSON.
    """
    try:
        data = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg}): {text.strip()[:120]!r}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    by_peer: dict[str, Session] = {}
    for family in data.values():
        if not isinstance(family, dict) or not isinstance(family.get("peers"), dict):
            continue
        for addr, p in family["peers"].items():
            if not isinstance(p, dict):
                continue
            state = str(p.get("state", "unknown")).lower()
            pfx = p.get("pfxRcd")
            s = Session(node=node, peer=str(addr), state=state, remote_as=str(p.get("remoteAs", "")),
                        name=str(p.get("desc", "") or p.get("hostname", "")),
                        prefixes=pfx if isinstance(pfx, int) else None)
            prev = by_peer.get(s.peer)
            by_peer[s.peer] = s if prev is None else _merge(prev, s)
    return sorted(by_peer.values(), key=lambda s: s.peer)


def _merge(a: Session, b: Session) -> Session:
    """One peer seen in two address families: established if either is; prefixes add up."""
    pfx = None if a.prefixes is None and b.prefixes is None else (a.prefixes or 0) + (b.prefixes or 0)
    return Session(node=a.node, peer=a.peer, state=a.state if a.established or not b.established else b.state,
                   remote_as=a.remote_as or b.remote_as, name=a.name or b.name, prefixes=pfx)


@dataclass(frozen=True)
class AgentStatus:
    node: str
    ready: bool
    sessions: tuple[Session, ...]
    warnings: tuple[str, ...]


def from_agent_status(node: str, data: Any) -> AgentStatus:
    """The agent's status.json (`{"node", "ready", "peers": [{"name", "address", "state"}], "warnings"}`)."""
    if not isinstance(data, dict):
        raise ValueError("status.json is not a JSON object")
    peers = data.get("peers") or []
    if not isinstance(peers, list):
        raise ValueError("status.json: peers is not a list")
    sessions = []
    for p in peers:
        if not isinstance(p, dict):
            continue
        routes = p.get("routes")
        sessions.append(Session(node=node, peer=str(p.get("address", p.get("name", "?"))),
                                state=str(p.get("state", "unknown")).lower(), name=str(p.get("name", "")),
                                remote_as=str(p.get("asn", p.get("remoteAs", "")) or ""),
                                prefixes=routes if isinstance(routes, int) else None))
    warnings = data.get("warnings") or []
    return AgentStatus(node=node, ready=bool(data.get("ready", False)), sessions=tuple(sessions),
                       warnings=tuple(str(w) for w in warnings) if isinstance(warnings, list) else (str(warnings),))
