"""Pod address management from this node's pod CIDRs: one file per address on disk, locked.

Layout of `<stateDir>/<network>/`:

- `<address>`: one allocation, JSON (container ID, interface, host veth, netns, pod, hostPorts).
  Created whole or not at all (written to a temporary file, fsynced, then `link()`ed to its name,
  which fails if the address is taken), removed by `unlink()`. So a crash never leaves half a record,
  and the files alone are the truth after an agent restart or a node reboot.
- `last`: the last address handed out. The next search starts after it, so a released address is
  not given again at once (stale conntrack/ARP of the old pod must not reach the new one).
- `generation`: bumped by every writer; a reader re-reads the folder only when it changed.
- `lock`: `flock()`ed for every operation (several agents or tools on one node stay consistent);
  threads of one process are serialised by a lock as well.

Never handed out: each CIDR's network and broadcast address (for prefixes up to /30). The gateway
pods use is link-local (169.254.1.1) and not in any pod CIDR.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni.spec import PortMapping


class Exhausted(Exception):
    """No free address in the node's pod CIDRs."""


@dataclass(frozen=True)
class Allocation:
    address: ipaddress.IPv4Address
    container_id: str
    ifname: str
    host_ifname: str
    netns: str = ""
    pod: str = ""
    port_mappings: tuple[PortMapping, ...] = ()
    created: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return self.container_id, self.ifname

    def to_json(self) -> dict[str, Any]:
        return {"containerID": self.container_id, "ifname": self.ifname, "hostIfname": self.host_ifname,
                "netns": self.netns, "pod": self.pod, "portMappings": [p.to_json() for p in self.port_mappings],
                "created": self.created}

    @staticmethod
    def from_json(address: ipaddress.IPv4Address, d: dict[str, Any]) -> "Allocation":
        return Allocation(address=address, container_id=str(d["containerID"]), ifname=str(d["ifname"]),
                          host_ifname=str(d["hostIfname"]), netns=str(d.get("netns", "")), pod=str(d.get("pod", "")),
                          port_mappings=tuple(PortMapping.from_json(p, "portMappings") for p in d.get("portMappings", [])),
                          created=float(d.get("created", 0.0)))


def usable(cidr: ipaddress.IPv4Network) -> tuple[int, int]:
    """First and last usable address (as ints) of a pod CIDR: not its network or broadcast address."""
    first, last = int(cidr.network_address), int(cidr.broadcast_address)
    if cidr.prefixlen <= 30:
        first, last = first + 1, last - 1
    return first, last


def pick(cidrs: Iterable[ipaddress.IPv4Network], used: set[ipaddress.IPv4Address],
         after: ipaddress.IPv4Address | None) -> ipaddress.IPv4Address | None:
    """The first free address after `after` (wrapping around all CIDRs in order), or None. Pure."""
    ranges = [usable(c) for c in cidrs]
    ranges = [(a, b) for a, b in ranges if a <= b]
    if not ranges:
        return None
    start_range, start = 0, ranges[0][0]
    if after is not None:
        a = int(after)
        for i, (lo, hi) in enumerate(ranges):
            if lo <= a <= hi:
                start_range, start = (i, a + 1) if a < hi else ((i + 1) % len(ranges), ranges[(i + 1) % len(ranges)][0])
                break
    used_int = {int(u) for u in used}
    n = len(ranges)
    for k in range(n + 1):  # the starting range twice: its tail first, its head at the end
        i = (start_range + k) % n
        lo, hi = ranges[i]
        if k == 0:
            lo = start
        elif k == n:
            hi = start - 1
        for v in range(lo, hi + 1):
            if v not in used_int:
                return ipaddress.IPv4Address(v)
    return None


class IpamStore:
    """Allocations of one CNI network, on disk under `state_dir/network`."""

    def __init__(self, state_dir: Path, network: str) -> None:
        self.dir = Path(state_dir) / network
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._thread_lock = threading.Lock()
        self._index: dict[ipaddress.IPv4Address, Allocation] = {}
        self._by_key: dict[tuple[str, str], Allocation] = {}
        self._generation: str | None = None

    # -- locking and reading -------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator["IpamStore"]:
        with self._thread_lock:
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._refresh()
                yield self
            finally:
                os.close(fd)  # releases the flock

    def _read_generation(self) -> str:
        try:
            return (self.dir / "generation").read_text()
        except FileNotFoundError:
            return ""

    def _refresh(self) -> None:
        gen = self._read_generation()
        if gen == self._generation and self._generation is not None:
            return
        index: dict[ipaddress.IPv4Address, Allocation] = {}
        for name in os.listdir(self.dir):
            try:
                addr = ipaddress.IPv4Address(name)
            except ValueError:
                continue  # lock, last, generation, temporary files
            try:
                index[addr] = Allocation.from_json(addr, json.loads((self.dir / name).read_text()))
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError, OSError):
                # An unreadable record still holds its address (never hand it out twice).
                index[addr] = Allocation(addr, container_id="", ifname="", host_ifname="")
        self._index = index
        self._by_key = {a.key: a for a in index.values() if a.container_id}
        self._generation = gen

    def _bump(self) -> None:
        gen = f"{time.time_ns()}-{os.getpid()}-{threading.get_ident()}"
        _write_atomic(self.dir / "generation", gen.encode(), durable=False)  # only for this boot's readers
        self._generation = gen

    # -- queries (call inside `locked()`) --------------------------------------------------------------

    def all(self) -> list[Allocation]:
        return sorted(self._index.values(), key=lambda a: int(a.address))

    def find(self, container_id: str, ifname: str) -> Allocation | None:
        return self._by_key.get((container_id, ifname))

    def holder(self, address: ipaddress.IPv4Address) -> Allocation | None:
        return self._index.get(address)

    # -- changes (call inside `locked()`) --------------------------------------------------------------

    def allocate(self, cidrs: Iterable[ipaddress.IPv4Network], alloc: Allocation) -> Allocation:
        """Record `alloc` at the next free address of `cidrs` (its `address` field is replaced)."""
        cidrs = list(cidrs)
        last = None
        try:
            last = ipaddress.IPv4Address((self.dir / "last").read_text().strip())
        except (FileNotFoundError, ValueError):
            pass
        used = set(self._index)
        while True:
            addr = pick(cidrs, used, last)
            if addr is None:
                total = sum(max(0, b - a + 1) for a, b in map(usable, cidrs))
                raise Exhausted(f"no free address in this node's pod CIDRs {', '.join(map(str, cidrs)) or '(none)'}: "
                                f"{len(self._index)} allocated, {total} usable")
            rec = Allocation(addr, alloc.container_id, alloc.ifname, alloc.host_ifname, alloc.netns, alloc.pod,
                             alloc.port_mappings, alloc.created or time.time())
            if _create_exclusive(self.dir / str(addr), json.dumps(rec.to_json()).encode()):
                break
            used.add(addr)  # another writer took it between our read and now: try the next
        _write_atomic(self.dir / "last", str(addr).encode(), durable=False)  # a hint, not the truth
        self._index[addr] = rec
        self._by_key[rec.key] = rec
        self._bump()
        return rec

    def release(self, rec: Allocation) -> None:
        # Not fsynced: a release lost in a crash leaves a record whose host veth is gone, which the
        # start-up sweep releases again.
        try:
            os.unlink(self.dir / str(rec.address))
        except FileNotFoundError:
            pass
        self._index.pop(rec.address, None)
        if self._by_key.get(rec.key) is rec or (rec.key in self._by_key and self._by_key[rec.key].address == rec.address):
            self._by_key.pop(rec.key, None)
        self._bump()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_file(final: Path, data: bytes, durable: bool = True) -> Path:
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _create_exclusive(final: Path, data: bytes) -> bool:
    """Create `final` with `data`, whole, only if it does not exist. Returns False if it exists."""
    tmp = _tmp_file(final, data)
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    _fsync_dir(final.parent)
    return True


def _write_atomic(final: Path, data: bytes, durable: bool = True) -> None:
    os.replace(_tmp_file(final, data, durable), final)
    if durable:
        _fsync_dir(final.parent)
