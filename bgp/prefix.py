"""`Prefix`: an IPv4Network whose hash is computed once (pure).

A learned prefix is a key in a dozen dicts and sets on its way to the kernel (the RIB, the dirty set,
the import filter, the route model, the desired routes, the reconciler's keys); the stdlib recomputes
an IPv4Network's hash at every lookup (two int conversions and a Python call each time): about 40
hashes per prefix, the largest single cost of taking 10,000 prefixes from a peer (docs/benchmarks.md).
The speaker builds the prefixes it learns as `Prefix`. It equals, and hashes like, the IPv4Network of
the same network, so both mix freely as keys.
"""

from __future__ import annotations

from ipaddress import IPv4Network


class Prefix(IPv4Network):
    def __init__(self, address: object, strict: bool = True) -> None:
        super().__init__(address, strict)  # type: ignore[arg-type]
        self._hash = IPv4Network.__hash__(self)

    def __hash__(self) -> int:
        return self._hash
