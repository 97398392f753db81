"""Turn ExaBGP's messages into the speaker's events, tracking each session's state. Pure (time is an argument).

ExaBGP reports `connected` / `down` for connection attempts that never reached `up` (collisions, refused
OPENs): only a session that was `up` produces PeerDown. The graceful-restart time of a PeerUp comes
from the last OPEN received before `up`. A drop is graceful (GR applies) unless a NOTIFICATION was
sent or received (ExaBGP's reason then starts with "notification", which covers hold-timer expiry
and administrative shutdown) or we tore the session down ourselves.
A route that came back to us (ORIGINATOR_ID = our router ID, or our cluster ID in its CLUSTER_LIST when
we reflect; RFC 4456 8) is dropped here, before anything uses it, and counted per neighbor (`looped`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from bgp.events import BgpEvent, EndOfRib, PeerDown, PeerUp, RoutesAnnounced, RoutesWithdrawn
from bgp.messages import ConnectMsg, Message, NotificationMsg, OpenMsg, StateMsg, UpdateMsg
from bgp.reflect import looped

# ExaBGP's reason when *we* tear down a session that negotiated GR (it closes TCP without NOTIFICATION).
_OUR_TEARDOWN = "graceful restarted negotiated"


@dataclass
class Session:
    name: str
    address: IPv4Address
    state: str = "idle"  # idle | connect | established
    since: float | None = None
    gr_time: int | None = None
    open_gr_time: int | None = None
    open_router_id: IPv4Address | None = None
    last_error: str | None = None
    notified: bool = False
    received: set[IPv4Network] = field(default_factory=set)
    ups: int = 0
    router_id: IPv4Address | None = None  # ours on this session, and our cluster ID when we reflect:
    cluster_id: IPv4Address | None = None  # a route carrying either came back to us (RFC 4456 8)
    looped: int = 0  # prefixes dropped for that
    open_asn: int | None = None  # the AS in the peer's last OPEN
    connect: tuple[str, str] | None = None  # the last outgoing attempt failed: (result, detail)


class SessionTracker:
    def __init__(self) -> None:
        self.sessions: dict[IPv4Address, Session] = {}

    def set_neighbors(self, names: dict[IPv4Address, str], now: float,
                      ids: dict[IPv4Address, tuple[IPv4Address | None, IPv4Address | None]] | None = None
                      ) -> list[BgpEvent]:
        """Adopt a new neighbor set; a removed neighbor that was up yields a non-graceful PeerDown.
        `ids`: per neighbor (our router ID, our cluster ID or None), for dropping routes that came back."""
        events: list[BgpEvent] = []
        for addr in list(self.sessions):
            if addr not in names:
                s = self.sessions.pop(addr)
                if s.state == "established":
                    events.append(PeerDown(s.name, addr, "removed from configuration", False))
        for addr, name in names.items():
            s = self.sessions.get(addr)
            if s is None:
                s = self.sessions[addr] = Session(name, addr, since=now)
            elif s.name != name:
                s.name = name
            s.router_id, s.cluster_id = (ids or {}).get(addr, (None, None))
        return events

    def speaker_restarted(self, now: float) -> None:
        """Our ExaBGP died: every session is gone on our side (the RIB handles it via SpeakerRestarted)."""
        for s in self.sessions.values():
            if s.state == "established":
                s.last_error = "our ExaBGP restarted"
            s.state, s.since, s.notified, s.open_gr_time = "idle", now, False, None
            s.received.clear()

    def feed(self, msg: Message, now: float) -> list[BgpEvent]:
        """Events for one message. Messages about unconfigured addresses (a neighbor just removed, whose
        `down` ExaBGP reports after we already said PeerDown) are ignored."""
        addr = getattr(msg, "peer_address", None)
        if addr is None or addr not in self.sessions:
            return []
        return self._feed(msg, self.sessions[addr], now)

    def _feed(self, msg: Message, s: Session, now: float) -> list[BgpEvent]:
        if isinstance(msg, OpenMsg):
            s.open_gr_time = msg.gr_time
            try:
                s.open_router_id = IPv4Address(msg.router_id) if msg.router_id else None
            except ValueError:
                s.open_router_id = None
            s.open_asn = msg.asn if isinstance(msg.asn, int) else s.open_asn
            return []
        if isinstance(msg, ConnectMsg):
            s.connect = None if msg.result == "ok" or s.state == "established" else (msg.result, msg.detail)
            return []
        if isinstance(msg, NotificationMsg):
            s.notified = True
            s.last_error = f"notification received ({msg.code},{msg.subcode}) {msg.message}".strip()
            return []
        if isinstance(msg, StateMsg):
            return self._state(msg, s, now)
        if isinstance(msg, UpdateMsg):
            if s.state != "established":
                return []
            if msg.eor:
                return [EndOfRib(s.name)]
            events: list[BgpEvent] = []
            withdrawn = msg.withdrawn
            announced = msg.announced
            if msg.path is not None and s.router_id is not None and announced and \
                    looped(msg.path, s.cluster_id, s.router_id) is not None:
                # ignored (RFC 4456 8): as if never sent, so it also replaces what this peer sent before
                dropped = tuple(p for _, prefixes in announced for p in prefixes)
                s.looped += len(dropped)
                withdrawn, announced = withdrawn + tuple(p for p in dropped if p in s.received), ()
            if withdrawn:
                s.received.difference_update(withdrawn)
                events.append(RoutesWithdrawn(s.name, withdrawn))
            for nh, prefixes in announced:
                s.received.update(prefixes)
                events.append(RoutesAnnounced(s.name, nh, prefixes, msg.path))
            return events
        return []

    def _state(self, msg: StateMsg, s: Session, now: float) -> list[BgpEvent]:
        if msg.state == "up":
            if s.state == "established":
                return []
            s.state, s.since, s.notified, s.ups = "established", now, False, s.ups + 1
            s.connect = None
            s.gr_time = s.open_gr_time
            s.received.clear()
            return [PeerUp(s.name, s.address, s.gr_time, s.open_router_id)]
        if msg.state == "down":
            was_up = s.state == "established"
            hard = s.notified or msg.reason.startswith("notification") or msg.reason.startswith(_OUR_TEARDOWN)
            # A received NOTIFICATION's text says more than the reason; a failed attempt's generic
            # "closing connection" (e.g. a connection collision) is not worth reporting.
            if msg.reason and not s.notified and (was_up or msg.reason != "closing connection"):
                s.last_error = msg.reason
            s.state, s.since, s.notified = "idle", now, False
            s.received.clear()
            if was_up:
                return [PeerDown(s.name, s.address, msg.reason or "session closed", not hard)]
            return []
        if msg.state == "connected" and s.state != "established":
            s.state = "connect"
            s.connect = None
        return []

    def status(self) -> dict[str, dict[str, object]]:
        return {s.name: {"address": str(s.address), "state": s.state, "since": s.since,
                         "received": len(s.received), "last_error": s.last_error, "gr_time": s.gr_time,
                         "established_count": s.ups, "looped": s.looped,
                         "open_asn": s.open_asn, "connect_error": list(s.connect) if s.connect else None}
                for s in self.sessions.values()}
