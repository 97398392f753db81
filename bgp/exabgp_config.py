"""ExaBGP 5 configuration text and environment for our neighbors (pure: no I/O besides building strings).

Every neighbor gets graceful restart + route-refresh, `manual-eor` (after a restart of ExaBGP we send
End-of-RIB ourselves once the desired routes are re-announced, so peers do not flush what they kept),
ipv4 unicast, and the `relay` process with parsed JSON of updates, OPENs, notifications and state.
MD5 passwords are written base64-encoded (`md5-base64 true`) so no password text can break the syntax.
"""

from __future__ import annotations

import base64
import json
import shlex
import sys
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Literal

PROCESS_NAME = "relay"
GR_TIME_MAX = 4095  # the restart time is 12 bits on the wire (RFC 4724)


class NeighborError(ValueError):
    """A neighbor definition that can't be turned into config; the message names the peer and field."""


@dataclass(frozen=True)
class Neighbor:
    name: str
    peer_address: IPv4Address
    peer_as: int
    local_as: int
    local_address: IPv4Address
    router_id: IPv4Address
    hold_time: int
    port: int = 179  # the peer's port we connect to
    md5_password: str | None = field(default=None, repr=False)  # never in logs or tracebacks
    passive: bool = False
    multihop: int | None = None  # outgoing TTL for multihop eBGP; None: ExaBGP default (1 for eBGP)
    graceful_restart_time: int = 120
    kind: Literal["mesh", "external"] = "mesh"
    # Route reflection is ours (bgp.reflect decides what is announced to whom; the session tracker drops
    # routes that come back with cluster_id or our router ID): no part of the ExaBGP config.
    route_reflector_client: bool = False
    cluster_id: IPv4Address | None = None
    listen_port: int = 179  # where we accept this peer's connections
    # Applied by our launcher (bgp.exabgp_launch), not ExaBGP's config: see render_timers.
    keepalive: int | None = None  # seconds between keepalives; None: negotiated hold time / 3
    connect_retry: int = 5  # seconds between connection attempts

    def problems(self) -> list[str]:
        p: list[str] = []
        name = self.name
        if not name or any(c.isspace() or c in ';{}"\'' for c in name):
            p.append(f"name: {name!r} must be non-empty without spaces, quotes, ';' or braces")
        for field in ("peer_address", "local_address", "router_id"):
            if not isinstance(getattr(self, field), IPv4Address):
                p.append(f"{field}: {getattr(self, field)!r} is not an IPv4Address")
        for field in ("peer_as", "local_as"):
            v = getattr(self, field)
            if not isinstance(v, int) or not 1 <= v <= 4294967294:
                p.append(f"{field}: {v!r} must be an ASN between 1 and 4294967294")
        if not isinstance(self.hold_time, int) or not (self.hold_time == 0 or 3 <= self.hold_time <= 65535):
            p.append(f"hold_time: {self.hold_time!r} must be 0 or 3..65535")
        for field in ("port", "listen_port"):
            v = getattr(self, field)
            if not isinstance(v, int) or not 1 <= v <= 65535:
                p.append(f"{field}: {v!r} must be 1..65535")
        if self.multihop is not None and (not isinstance(self.multihop, int) or not 1 <= self.multihop <= 255):
            p.append(f"multihop: {self.multihop!r} must be 1..255")
        gr = self.graceful_restart_time
        if not isinstance(gr, int) or not 0 <= gr <= GR_TIME_MAX:
            p.append(f"graceful_restart_time: {gr!r} must be 0..{GR_TIME_MAX} (12 bits on the wire)")
        if self.md5_password is not None and not 1 <= len(self.md5_password.encode()) <= 80:
            p.append("md5_password: must be 1..80 bytes")
        if self.keepalive is not None and (not isinstance(self.keepalive, int) or not 1 <= self.keepalive <= 21845):
            p.append(f"keepalive: {self.keepalive!r} must be 1..21845")
        elif self.keepalive is not None and self.hold_time and self.keepalive * 3 > self.hold_time:
            p.append(f"keepalive: {self.keepalive} must be at most hold_time/3 ({self.hold_time // 3})")
        if not isinstance(self.connect_retry, int) or not 1 <= self.connect_retry <= 3600:
            p.append(f"connect_retry: {self.connect_retry!r} must be 1..3600")
        if self.kind not in ("mesh", "external"):
            p.append(f"kind: {self.kind!r} must be 'mesh' or 'external'")
        return [f"neighbor {name!r}: {x}" for x in p]


def validate(neighbors: list[Neighbor]) -> None:
    """Raise NeighborError listing every problem (one line each), including duplicate names/addresses."""
    problems: list[str] = []
    for n in neighbors:
        problems += n.problems()
    names = [n.name for n in neighbors]
    for dup in sorted({x for x in names if names.count(x) > 1}):
        problems.append(f"neighbor {dup!r}: duplicate name")
    addrs = [n.peer_address for n in neighbors]
    for dup in sorted({a for a in addrs if addrs.count(a) > 1}):
        problems.append(f"neighbor address {dup}: duplicate peer address")
    if problems:
        raise NeighborError("\n".join(problems))


def relay_command(socket_path: Path, python: str | None = None) -> str:
    return " ".join(shlex.quote(x) for x in (python or sys.executable, "-m", "bgp.relay", str(socket_path)))


def _neighbor_block(n: Neighbor) -> str:
    lines = [
        f"neighbor {n.peer_address} {{",
        f"    description \"{n.name}\";",
        f"    router-id {n.router_id};",
        f"    local-address {n.local_address};",
        f"    local-as {n.local_as};",
        f"    peer-as {n.peer_as};",
        f"    hold-time {n.hold_time};",
        f"    connect {n.port};",
        f"    listen {n.listen_port};",
        "    manual-eor true;",
        "    group-updates true;",
    ]
    if n.passive:
        lines.append("    passive true;")
    if n.multihop is not None:
        lines.append(f"    outgoing-ttl {n.multihop};")
    if n.md5_password is not None:
        encoded = base64.b64encode(n.md5_password.encode()).decode()
        lines += [f"    md5-password \"{encoded}\";", "    md5-base64 true;"]
    lines += [
        "    family {",
        "        ipv4 unicast;",
        "    }",
        "    capability {",
        f"        graceful-restart {n.graceful_restart_time};" if n.graceful_restart_time else "",
        "        route-refresh enable;",
        "    }",
        "    api {",
        f"        processes [ {PROCESS_NAME} ];",
        "        neighbor-changes;",
        "        receive {",
        "            parsed;",
        "            update;",
        "            open;",
        "            notification;",
        "            refresh;",
        "        }",
        "    }",
        "}",
    ]
    return "\n".join(x for x in lines if x) + "\n"


def render(neighbors: list[Neighbor], socket_path: Path, python: str | None = None) -> str:
    """The whole ExaBGP config: the relay process and one block per neighbor (sorted by address)."""
    validate(neighbors)
    out = [
        "# generated by bgp-fabric: do not edit\n",
        f"process {PROCESS_NAME} {{\n    run {relay_command(socket_path, python)};\n    encoder json;\n}}\n",
    ]
    for n in sorted(neighbors, key=lambda n: n.peer_address):
        out.append(_neighbor_block(n))
    return "\n".join(out)


def render_timers(neighbors: list[Neighbor]) -> str:
    """The timers our launcher applies per neighbor (ExaBGP's config has no keepalive or connect retry)."""
    validate(neighbors)
    doc = {"neighbors": {str(n.peer_address): {"keepalive": n.keepalive, "connectRetry": n.connect_retry}
                         for n in sorted(neighbors, key=lambda n: n.peer_address)}}
    return json.dumps(doc, indent=1) + "\n"


LOG_BYTES = 1024 * 1024  # ExaBGP's own RotatingFileHandler: 1 MiB per file, 3 backups (4 MiB at most)


def environment(run_dir: Path, log_level: str = "INFO", log_file: Path | None = None) -> dict[str, str]:
    """ExaBGP settings as env vars (exabgp.<section>.<option> written with underscores). With `log_file`,
    ExaBGP logs there through its rotating file handler (bounded size), else to stdout."""
    return {
        "exabgp_daemon_user": "root",  # else the relay runs as nobody and can't reach our socket
        "exabgp_daemon_daemonize": "false",
        "exabgp_daemon_pid": "",
        "exabgp_api_cli": "false",  # no named pipes for the CLI
        "exabgp_api_ack": "true",  # every command answered with done/error
        "exabgp_api_encoder": "json",
        "exabgp_log_enable": "true",
        "exabgp_log_level": log_level,
        "exabgp_log_destination": str(Path(log_file).resolve()) if log_file is not None else "stdout",
        "exabgp_log_all": "false",
        "exabgp_log_packets": "false",
        "exabgp_log_parser": "false",
        "exabgp_log_message": "false",
        "exabgp_log_rib": "false",
        "exabgp_log_timers": "false",
        "exabgp_log_routes": "false",
        "exabgp_log_network": "true",
        "exabgp_log_statistics": "false",  # a line per keepalive: the log would grow without bound
        "exabgp_log_reactor": "true",
        "exabgp_log_processes": "true",
        "exabgp_log_configuration": "true",
        "exabgp_log_short": "true",
        "exabgp_tcp_bind": "",  # only per-neighbor listeners (listen N)
        "exabgp_cache_attributes": "true",
    }
