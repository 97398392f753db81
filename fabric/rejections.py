"""What each peer's routes came to, summarised (pure): rejections counted by reason with a few examples.

One misbehaving peer can send thousands of prefixes that are refused; status, logs and metrics give
one line (or one sample) per peer and reason, not one per prefix. The full list stays in
`fabric status --json` and `fabric explain PREFIX`.

Two sources of "not used": the import policy (fabric.import_policy, each rejection with its code from
bgp.policy) and the route model (a next hop that can't be used: code `next-hop-unusable`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from bgp.policy import Rejection

EXAMPLES = 3
NEXT_HOP = "next-hop-unusable"
Prefix = ipaddress.IPv4Network


def _key(p: Prefix) -> tuple[int, int]:
    return int(p.network_address), p.prefixlen


def verdicts(active: Mapping[tuple[str, Prefix], Rejection],
             unusable: Mapping[Prefix, Iterable[tuple[str, str]]]) -> dict[str, dict[Prefix, tuple[str, str]]]:
    """peer -> prefix -> (code, why) for every (peer, prefix) whose route is not used."""
    out: dict[str, dict[Prefix, tuple[str, str]]] = {}
    for (peer, prefix), r in active.items():
        out.setdefault(peer, {})[prefix] = (r.code, str(r.reason))
    for prefix, holders in unusable.items():
        for peer, why in holders:
            out.setdefault(peer, {}).setdefault(prefix, (NEXT_HOP, why))
    return out


def summarise(by_peer: Mapping[str, Mapping[Prefix, tuple[str, str]]], examples: int = EXAMPLES
              ) -> dict[str, dict[str, dict[str, Any]]]:
    """peer -> code -> {count, reason (the first one's text), examples (first prefixes by address)}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for peer, items in by_peer.items():
        groups: dict[str, list[Prefix]] = {}
        for prefix, (code, _) in items.items():
            groups.setdefault(code, []).append(prefix)
        out[peer] = {}
        for code, prefixes in sorted(groups.items()):
            prefixes.sort(key=_key)
            out[peer][code] = {"count": len(prefixes), "reason": items[prefixes[0]][1],
                               "examples": [str(p) for p in prefixes[:examples]]}
    return out


def lines(summary: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """One warning per (peer, reason). A single prefix reads as it always did (its whole reason)."""
    out = []
    for peer in sorted(summary):
        for code, g in sorted(summary[peer].items()):
            n, first = g["count"], g["examples"][0]
            if code == NEXT_HOP:
                head = f"{first} from {peer}: {g['reason']}: not installed"
            else:
                head = f"import from {peer} rejected {first}: {g['reason']}"
            if n > 1:
                more = ", ".join(g["examples"][1:])
                head = (f"peer {peer}: {n} prefixes not used ({code}), e.g. {head}"
                        + (f"; also {more}" if more else "") + " (every one: fabric status --json)")
            out.append(head)
    return out


def full(by_peer: Mapping[str, Mapping[Prefix, tuple[str, str]]]) -> dict[str, list[list[str]]]:
    """peer -> [[prefix, code, why], ...] sorted by address: the whole list for `--json`."""
    return {peer: [[str(p), *items[p]] for p in sorted(items, key=_key)] for peer, items in sorted(by_peer.items())}
