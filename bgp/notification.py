"""Why a BGP session is down, in words (pure): NOTIFICATION codes by name, connection failures, ASN mismatch.

Names are the RFCs' (4271 section 4.5 and 6.x; Cease subcodes RFC 4486 and 8538; FSM error subcodes
RFC 6608; OPEN subcodes 5492 / 9234; ROUTE-REFRESH RFC 7313). `down_cause` turns what the session
tracker saw into a `Cause`: a short fixed `code` (a metrics label: the set is bounded) and a sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CODES: dict[int, tuple[str, dict[int, str]]] = {
    1: ("Message Header Error", {1: "Connection Not Synchronized", 2: "Bad Message Length", 3: "Bad Message Type"}),
    2: ("OPEN Message Error", {1: "Unsupported Version Number", 2: "Bad Peer AS", 3: "Bad BGP Identifier",
                               4: "Unsupported Optional Parameter", 5: "Authentication Failure (deprecated)",
                               6: "Unacceptable Hold Time", 7: "Unsupported Capability", 11: "Role Mismatch"}),
    3: ("UPDATE Message Error", {1: "Malformed Attribute List", 2: "Unrecognized Well-known Attribute",
                                 3: "Missing Well-known Attribute", 4: "Attribute Flags Error",
                                 5: "Attribute Length Error", 6: "Invalid ORIGIN Attribute",
                                 7: "AS Routing Loop (deprecated)", 8: "Invalid NEXT_HOP Attribute",
                                 9: "Optional Attribute Error", 10: "Invalid Network Field", 11: "Malformed AS_PATH"}),
    4: ("Hold Timer Expired", {}),
    5: ("Finite State Machine Error", {1: "Receive Unexpected Message in OpenSent State",
                                       2: "Receive Unexpected Message in OpenConfirm State",
                                       3: "Receive Unexpected Message in Established State"}),
    6: ("Cease", {1: "Maximum Number of Prefixes Reached", 2: "Administrative Shutdown", 3: "Peer De-configured",
                  4: "Administrative Reset", 5: "Connection Rejected", 6: "Other Configuration Change",
                  7: "Connection Collision Resolution", 8: "Out of Resources", 9: "Hard Reset", 10: "BFD Down"}),
    7: ("ROUTE-REFRESH Message Error", {1: "Invalid Message Length"}),
}

# Cause codes (bounded: they label the bgp_fabric_bgp_peer_down_cause metric).
CAUSES = ("connection-refused", "no-answer", "connect-failed", "asn-mismatch", "hold-timer-expired",
          "notification-received", "notification-sent", "connection-closed", "speaker-restarted", "other")


def notification_name(code: int, subcode: int) -> str:
    """`OPEN Message Error / Bad Peer AS (2/2)`; unknown codes say so, numbers always shown."""
    name, subs = CODES.get(code, (f"unknown error code {code}", {}))
    if not subs and subcode == 0:
        return f"{name} ({code}/{subcode})"
    sub = subs.get(subcode, "unspecific" if subcode == 0 else f"subcode {subcode}")
    return f"{name} / {sub} ({code}/{subcode})"


@dataclass(frozen=True)
class Cause:
    code: str  # one of CAUSES
    text: str


_NOTE = re.compile(r"^notification (sent|received) \((\d+),\s*(\d+)\)\s*(.*)$")


def connect_cause(result: str, detail: str = "") -> Cause:
    """A failed outgoing connection: `refused` (RST), `timeout` (nothing came back), else the errno text."""
    if result == "refused":
        return Cause("connection-refused", "connection refused: nothing listens on the peer's BGP port, "
                                           "or it refuses this address")
    if result == "timeout":
        return Cause("no-answer", "no answer to our connection attempts (a TCP-MD5 password mismatch looks "
                                  "like this: each side drops the other's unsigned or wrongly signed segments; "
                                  "or a filter drops them, or the peer is down)")
    return Cause("connect-failed", f"connection failed: {detail or result}")


def down_cause(last_error: str | None, *, open_asn: int | None = None, expected_asn: int | None = None,
               connect: Cause | None = None) -> Cause | None:
    """Why a session that is not established is down, from what the tracker saw last. An OPEN carrying
    another AS than configured is an ASN mismatch whatever else was said."""
    if open_asn is not None and expected_asn is not None and open_asn != expected_asn:
        return Cause("asn-mismatch", f"ASN mismatch: the peer's OPEN says AS {open_asn}, configured AS "
                                     f"{expected_asn} (OPEN Message Error / Bad Peer AS)")
    if last_error:
        m = _NOTE.match(last_error.strip())
        if m:
            way, code, sub, msg = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4).strip()
            name = notification_name(code, sub)
            detail = f": {msg}" if msg else ""
            if code == 2 and sub == 2:
                return Cause("asn-mismatch", f"ASN mismatch: NOTIFICATION {way} {name}{detail}")
            if code == 4:
                who = "we stopped hearing from the peer" if way == "sent" else "the peer stopped hearing from us"
                return Cause("hold-timer-expired", f"hold timer expired ({who}): NOTIFICATION {way} {name}")
            return Cause(f"notification-{way}", f"NOTIFICATION {way}: {name}{detail}")
        if "restarted" in last_error and "ExaBGP" in last_error:
            return Cause("speaker-restarted", last_error)
    if connect is not None:
        return connect
    if last_error:
        if last_error.startswith(("closing connection", "session closed")):
            return Cause("connection-closed", f"TCP connection closed or lost ({last_error})")
        return Cause("other", last_error)
    return None
