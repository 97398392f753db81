"""`Prefix` and `Address`: an IPv4Network and an IPv4Address whose hash is computed once (pure).

A learned prefix is a key in a dozen dicts and sets on its way to the kernel (the RIB, the dirty set,
the import filter, the route model, the desired routes, the reconciler's keys); the stdlib recomputes
an IPv4Network's hash at every lookup (two int conversions and a Python call each time): about 40
hashes per prefix, the largest single cost of taking 10,000 prefixes from a peer (docs/benchmarks.md).
The speaker builds the prefixes and next hops it learns as `Prefix` and `Address`. Each equals, and hashes
like, the stdlib object of the same value, so both mix freely as keys.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network


class Prefix(IPv4Network):
    def __init__(self, address: object, strict: bool = True) -> None:
        super().__init__(address, strict)  # type: ignore[arg-type]
        self._hash = IPv4Network.__hash__(self)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"{self.__class__.__bases__[0].__name__}('{self}')"  # reads as the stdlib's


class Address(IPv4Address):
    """An IPv4Address whose hash is computed once (the stdlib's formats a hex string at every lookup):
    a learned route's next hop sits in the holder sets, the import filter's and the route model's keys
    of every one of its prefixes."""

    def __init__(self, address: object) -> None:
        super().__init__(address)  # type: ignore[arg-type]
        self._hash = IPv4Address.__hash__(self)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"{self.__class__.__bases__[0].__name__}('{self}')"  # reads as the stdlib's
