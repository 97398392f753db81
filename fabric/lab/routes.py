"""Route expectations of a checks file against a node's kernel table (pure: `ip -j -d` JSON in, verdict out)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass
from typing import Any

from fabric.lab.checks import Route

IP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Hop:
    gateway: str | None
    dev: str | None


@dataclass(frozen=True)
class KernelRoute:
    prefix: ipaddress.IPv4Network
    type: str  # unicast, blackhole, unreachable, ...
    hops: tuple[Hop, ...]
    protocol: str

    def kind(self, link_kinds: dict[str, str]) -> str:
        if self.type != "unicast":
            return self.type
        if len(self.hops) > 1:
            return "ecmp"
        if self.hops and all(link_kinds.get(h.dev or "") == "ipip" for h in self.hops):
            return "ipip"
        return "direct"

    def describe(self, link_kinds: dict[str, str]) -> str:
        hops = ", ".join(" ".join(x for x in (f"via {h.gateway}" if h.gateway else "", f"dev {h.dev}" if h.dev else "")
                                  if x) for h in self.hops)
        return f"{self.prefix} {hops} ({self.kind(link_kinds)}, proto {self.protocol})".replace("  ", " ")


def _prefix(dst: str) -> ipaddress.IPv4Network | None:
    if dst == "default":
        return ipaddress.IPv4Network("0.0.0.0/0")
    try:
        return ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32")
    except ValueError:
        return None  # IPv6 or something this checker does not judge


def parse_routes(data: Any) -> list[KernelRoute]:
    """`ip -j -d route show table main` output."""
    out: list[KernelRoute] = []
    for r in data if isinstance(data, list) else []:
        if not isinstance(r, dict) or not isinstance(r.get("dst"), str):
            continue
        prefix = _prefix(r["dst"])
        if prefix is None:
            continue
        nh = r.get("nexthops")
        if isinstance(nh, list) and nh:
            hops = tuple(Hop(h.get("gateway"), h.get("dev")) for h in nh if isinstance(h, dict))
        elif r.get("gateway") or r.get("dev"):
            hops = (Hop(r.get("gateway"), r.get("dev")),)
        else:
            hops = ()
        out.append(KernelRoute(prefix, str(r.get("type", "unicast")), hops, str(r.get("protocol", ""))))
    return out


def parse_link_kinds(data: Any) -> dict[str, str]:
    """Interface name -> link kind (ipip, veth, bridge, dummy, ...) from `ip -j -d link show`."""
    out: dict[str, str] = {}
    for link in data if isinstance(data, list) else []:
        if isinstance(link, dict) and isinstance(link.get("ifname"), str):
            out[link["ifname"]] = str((link.get("linkinfo") or {}).get("info_kind", link.get("link_type", "")))
    return out


def verdict(expect: Route, routes: list[KernelRoute], link_kinds: dict[str, str]) -> tuple[bool, str]:
    """Whether the table meets `expect`, and what the table holds for that prefix."""
    want = ipaddress.IPv4Network(expect.prefix)
    have = [r for r in routes if r.prefix == want]
    shown = "; ".join(r.describe(link_kinds) for r in have) or f"no route to {want}"
    if expect.absent:
        return not have, shown
    for r in have:
        if expect.kind is not None and r.kind(link_kinds) != expect.kind:
            continue
        if expect.via is not None and not any(h.gateway == expect.via for h in r.hops):
            continue
        if expect.dev is not None and not any(h.dev == expect.dev for h in r.hops):
            continue
        if expect.kind is None and r.type != "unicast" and (expect.via or expect.dev):
            continue
        return True, shown
    return False, shown


class TableReader:
    """Reads each namespace's routes and link kinds once per `refresh()` (many expectations, one dump)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[list[KernelRoute], dict[str, str]]] = {}

    def refresh(self) -> None:
        self._cache.clear()

    def table(self, ns: str) -> tuple[list[KernelRoute], dict[str, str]]:
        if ns not in self._cache:
            self._cache[ns] = (parse_routes(_ip_json(ns, "route", "show", "table", "main")),
                               parse_link_kinds(_ip_json(ns, "link", "show")))
        return self._cache[ns]


def _ip_json(ns: str, *args: str) -> Any:
    try:
        r = subprocess.run(["ip", "-n", ns, "-j", "-d", *args], capture_output=True, text=True, timeout=IP_TIMEOUT)
        return json.loads(r.stdout or "[]") if r.returncode == 0 else []
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        return []


def check(expect: Route, ns: str, reader: TableReader) -> tuple[bool, str]:
    routes, kinds = reader.table(ns)
    return verdict(expect, routes, kinds)
