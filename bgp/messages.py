"""Parse what ExaBGP 5 writes to its helper (JSON encoder): one line in, one typed message out. Pure.

Lines are JSON objects (`type` state/open/update/notification/refresh), plain `done`/`error` acks, or
free text (answers to `show ...` commands). Anything we don't understand becomes `Unparsed`, never an
exception: a peer-supplied odd UPDATE must not take the speaker down.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from bgp.attributes import PathAttributes, from_exabgp
from bgp.prefix import Address, Prefix


@dataclass(frozen=True)
class Ack:
    ok: bool  # `done` (True) or `error` (False)


@dataclass(frozen=True)
class StateMsg:
    peer_address: IPv4Address
    local_address: IPv4Address | None
    state: str  # connected | up | down
    reason: str


@dataclass(frozen=True)
class OpenMsg:
    peer_address: IPv4Address
    gr_time: int | None  # None: the OPEN carried no graceful-restart capability
    hold_time: int | None
    router_id: str | None
    asn: int | None


@dataclass(frozen=True)
class UpdateMsg:
    peer_address: IPv4Address
    announced: tuple[tuple[IPv4Address, tuple[IPv4Network, ...]], ...]  # (next hop, prefixes), ipv4 unicast only
    withdrawn: tuple[IPv4Network, ...]
    eor: bool  # End-of-RIB for ipv4 unicast
    attributes: dict[str, Any]
    path: PathAttributes | None = PathAttributes()  # `attributes` as we keep them; None: not understood


@dataclass(frozen=True)
class NotificationMsg:
    peer_address: IPv4Address
    code: int
    subcode: int
    message: str


@dataclass(frozen=True)
class ConnectMsg:
    """Our launcher's report of one outgoing connection attempt (bgp.exabgp_reactor): ExaBGP itself says
    nothing about attempts that fail. result: ok | refused | timeout | error (detail: the errno text)."""

    peer_address: IPv4Address
    result: str
    detail: str


@dataclass(frozen=True)
class Notice:
    """A message about ExaBGP itself, not a peer (e.g. `"notification": "shutdown"` when it stops)."""

    text: str


@dataclass(frozen=True)
class Unparsed:
    line: str
    why: str


Message = Ack | StateMsg | OpenMsg | UpdateMsg | NotificationMsg | ConnectMsg | Notice | Unparsed

_FAMILY = "ipv4 unicast"


def parse_line(line: str) -> Message:
    text = line.strip()
    if text == "done":
        return Ack(True)
    if text == "error":
        return Ack(False)
    if not text.startswith("{"):
        return Unparsed(text, "not JSON")
    try:
        doc = json.loads(text)
    except ValueError as e:
        return Unparsed(text, f"bad JSON: {e}")
    try:
        return _parse(doc, text)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return Unparsed(text, f"unexpected shape: {type(e).__name__}: {e}")


def _path(raw: dict[str, Any]) -> PathAttributes | None:
    """An attribute we can't read must not lose the routes (their next hop is all the import needs):
    None, and route reflection passes such a route on to nobody."""
    try:
        return from_exabgp(raw)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _peer(doc: dict[str, Any]) -> tuple[IPv4Address, IPv4Address | None]:
    addr = doc["neighbor"]["address"]
    local = addr.get("local")
    return IPv4Address(addr["peer"]), (IPv4Address(local) if local else None)


def _parse(doc: dict[str, Any], text: str) -> Message:
    kind = doc.get("type")
    if "neighbor" not in doc and isinstance(doc.get(kind), str):
        return Notice(f"{kind}: {doc[kind]}")
    if kind == "state":
        peer, local = _peer(doc)
        n = doc["neighbor"]
        return StateMsg(peer, local, str(n["state"]), str(n.get("reason", "")))
    if kind == "fabric-connect":
        peer, _ = _peer(doc)
        c = doc["connect"]
        return ConnectMsg(peer, str(c["result"]), str(c.get("detail", "")))
    if kind == "open":
        peer, _ = _peer(doc)
        o = doc["neighbor"]["open"]
        caps = o.get("capabilities", {})
        gr = caps.get("64")
        gr_time = int(gr["time"]) if isinstance(gr, dict) and "time" in gr else None
        return OpenMsg(peer, gr_time, o.get("hold_time"), o.get("router_id"), o.get("asn"))
    if kind == "notification":
        peer, _ = _peer(doc)
        note = doc["neighbor"]["notification"]
        return NotificationMsg(peer, int(note["code"]), int(note["subcode"]), str(note.get("message", "")))
    if kind == "update":
        peer, _ = _peer(doc)
        message = doc["neighbor"]["message"]
        if "eor" in message:
            eor = message["eor"]
            is_v4 = eor.get("afi") == "ipv4" and eor.get("safi") == "unicast"
            if not is_v4:
                return Unparsed(text, "End-of-RIB for another family")
            return UpdateMsg(peer, (), (), True, {})
        update = message["update"]
        announced: list[tuple[IPv4Address, tuple[IPv4Network, ...]]] = []
        for nh, routes in update.get("announce", {}).get(_FAMILY, {}).items():
            announced.append((Address(nh), tuple(Prefix(r["nlri"]) for r in routes)))
        withdrawn = tuple(Prefix(r["nlri"]) for r in update.get("withdraw", {}).get(_FAMILY, []))
        raw = dict(update.get("attribute", {}))
        return UpdateMsg(peer, tuple(announced), withdrawn, False, raw, _path(raw) if announced else PathAttributes())
    return Unparsed(text, f"message type {kind!r} not handled")
