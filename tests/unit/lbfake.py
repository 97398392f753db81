"""A stateful fake of everything the service proxy's kernel adapter touches: IPVS (decoded from the
real request bytes), the dummy device's addresses, our nft table (parsed from the real nft text),
conntrack, sysctls and healthCheckNodePort listeners — with switches to make operations fail.

Switches (operation names: an IPVS Op's `what`, "add address A" / "del address A", "nft",
"conntrack VIP:PORT -> EP", "health PORT", "sysctl", "dump", "get", "addresses"):
- fail_next: name prefixes refused once (then they work);
- fail: name prefixes refused until removed;
- hang: surfaces that stop answering — "ipvs" (a batch times out after the kernel applied part of it),
  "address", "dump", "get", "addresses", "nft", "conntrack" (each gives the adapter's timeout result);
- boom: surfaces whose call raises after doing part of its work ("address", "ipvs", "sysctl"), as an
  adapter would if a timeout struck outside a pipelined batch.
"""

from __future__ import annotations

import errno
import re
import socket
import struct
from collections.abc import Iterable, Mapping

from loadbalancer import ipvs_kernel as k
from loadbalancer.nft import element_text
from loadbalancer.types import PROTO_NAMES, HealthCheck, RealServer, VirtualServer, VSKey

FOREIGN = "foreign"


class FakeHealth:
    def __init__(self, kernel: "FakeKernel") -> None:
        self.kernel = kernel
        self.ports: dict[int, HealthCheck] = {}

    def update(self, checks: Mapping[int, HealthCheck]) -> list[str]:
        errors = []
        for p in list(self.ports):
            if p not in checks:
                del self.ports[p]
        for p, c in checks.items():
            if self.kernel.refused(f"health {p}"):
                self.ports.pop(p, None)
                errors.append(f"{c.service}: healthCheckNodePort {p}: Address already in use")
                continue
            self.ports[p] = c
        return errors

    def close(self) -> None:
        self.ports.clear()


class FakeKernel:
    def __init__(self) -> None:
        self.vs: dict[VSKey, dict] = {}  # key -> {"sched", "timeout", "flags", "reals": {(addr, port): weight}}
        self.addrs: set[str] = set()
        self.nft_sets: dict[str, set[str]] | None = None  # our table's sets; None: no table
        self.nft_scripts: list[str] = []
        self.nft_unusable: str | None = None  # a permanent reason (no nft families in this kernel)
        self.flushed: list = []
        self.ops: list[str] = []
        self.sysctl_calls = 0
        self.health = FakeHealth(self)
        self.fail_next: set[str] = set()
        self.fail: set[str] = set()
        self.hang: set[str] = set()
        self.boom: set[str] = set()
        self.calls: dict[str, int] = {}  # surface -> times used (to check nothing retries in a loop)

    # -- switches -------------------------------------------------------------------------------

    def refused(self, name: str) -> bool:
        if any(name.startswith(f) for f in self.fail):
            return True
        hit = next((f for f in sorted(self.fail_next) if name.startswith(f)), None)
        if hit is not None:
            self.fail_next.discard(hit)
            return True
        return False

    def _count(self, surface: str) -> None:
        self.calls[surface] = self.calls.get(surface, 0) + 1

    def _timeout(self, surface: str) -> None:
        if surface in self.hang:
            raise TimeoutError(errno.ETIMEDOUT, f"{surface}: no answer from the kernel within 5 s")
        if self.refused(surface):
            raise OSError(errno.ENOMEM, f"{surface}: {errno.errorcode[errno.ENOMEM]}")

    # -- the adapter surface ServiceProxy uses -----------------------------------------------------

    def _boom(self, surface: str) -> None:
        if surface in self.boom:
            raise TimeoutError(errno.ETIMEDOUT, f"get link fabric-svc: no answer from the kernel within 5 s ({surface})")

    def apply_sysctls(self) -> list[str]:
        self._count("sysctl")
        self._boom("sysctl")
        self.sysctl_calls += 1
        return ["sysctl net.ipv4.vs.conntrack=1: Read-only file system"] if self.refused("sysctl") else []

    def nft_available(self) -> str | None:
        self._count("nft_probe")
        if "nft" in self.hang:
            raise TimeoutError(errno.ETIMEDOUT, "nft did not finish within 30 s (killed)")
        return self.nft_unusable

    def nft(self, script: str) -> str | None:
        self._count("nft")
        self.nft_scripts.append(script)
        if "nft" in self.hang:
            return "nft did not finish within 30 s (killed)"
        if self.refused("nft"):
            return "Error: Could not process rule: Cannot allocate memory"
        return self._nft_apply(script)

    def _nft_apply(self, script: str) -> str | None:
        if script.startswith("table inet bgp-fabric\ndelete table inet bgp-fabric\n"):
            sets: dict[str, set[str]] = {}
            for m in re.finditer(r"^  set (\w+) \{(.*)\}$", script, re.M):
                els = re.search(r"elements = \{ (.*?) \};", m.group(2))
                sets[m.group(1)] = set(els.group(1).split(", ")) if els else set()
            self.nft_sets = sets
            return None
        if self.nft_sets is None:
            return "Error: No such file or directory; did you mean table 'bgp-fabric' in family inet?"
        new = {n: set(v) for n, v in self.nft_sets.items()}
        for line in script.splitlines():
            m = re.fullmatch(r"(add|delete) element inet bgp-fabric (\w+) \{ (.*) \}", line)
            if not m:
                return f"Error: syntax error: {line!r}"
            verb, name, els = m.group(1), m.group(2), set(m.group(3).split(", "))
            if verb == "add":
                new[name] |= els
            else:
                if not els <= new[name]:
                    return "Error: Could not process rule: No such file or directory"  # the whole batch fails
                new[name] -= els
        self.nft_sets = new
        return None

    def nft_list(self) -> str:
        return "" if self.nft_sets is None else repr(self.nft_sets)

    def conntrack_flush_udp(self, entries) -> list[tuple[tuple[str, int, str], str]]:
        self._count("conntrack")
        errs = []
        for i, e in enumerate(entries):
            what = f"conntrack -D udp {e[0]}:{e[1]} -> {e[2]}"
            if "conntrack" in self.hang:
                return errs + [(x, f"{what}: conntrack did not finish within 10 s (killed)") for x in entries[i:]]
            if self.refused(f"conntrack {e[0]}:{e[1]} -> {e[2]}"):
                errs.append((e, f"{what}: Operation not permitted"))
                continue
            self.flushed.append(e)
        return errs

    def call(self, fn, *a):
        return fn(*a)

    def health_servers(self, bind: str) -> FakeHealth:
        return self.health

    def addresses(self) -> set[str]:
        self._count("addresses")
        self._timeout("addresses")
        return set(self.addrs)

    def address_change(self, add: Iterable[str], delete: Iterable[str]) -> list[tuple[str, str]]:
        self._count("address")
        errs = []
        for i, (verb, a) in enumerate([("add", a) for a in add] + [("del", a) for a in delete]):
            if "address" in self.hang:
                if i % 2:  # the kernel did part of the batch before it stopped answering
                    errs.append((a, f"{verb} address {a}/32: Connection timed out"))
                    continue
            elif self.refused(f"{verb} address {a}"):
                errs.append((a, f"{verb} address {a}/32: Cannot allocate memory"))
                continue
            (self.addrs.add if verb == "add" else self.addrs.discard)(a)
            if i == 0:
                self._boom("address")
        return errs

    def ipvs_dump(self) -> dict[VSKey, VirtualServer]:
        self._count("dump")
        self._timeout("dump")
        return {key: self._vs(key) for key in self.vs}

    def ipvs_get(self, keys: Iterable[VSKey]) -> dict[VSKey, VirtualServer]:
        self._count("get")
        self._timeout("get")
        return {key: self._vs(key) for key in keys if key in self.vs}

    def _vs(self, key: VSKey) -> VirtualServer:
        v = self.vs[key]
        return VirtualServer(*key, v["sched"], v["timeout"],
                             tuple(sorted(RealServer(a, p, w) for (a, p), w in v["reals"].items())), v.get("flags", 0))

    def ipvs_run(self, ops: list[k.Op]) -> list[k.OpError]:
        self._count("ipvs")
        errors = []
        for i, op in enumerate(ops):
            self.ops.append(op.what)
            if "ipvs" in self.hang:
                # no acks come back; the kernel did every other request before it stopped answering
                if i % 2 == 0:
                    self._do(op)
                errors.append(k.OpError(op, errno.ETIMEDOUT))
                continue
            if self.refused(op.what):
                errors.append(k.OpError(op, errno.ENOMEM))
                continue
            e = self._do(op)
            if e:
                errors.append(k.OpError(op, e))
            if i == 0:
                self._boom("ipvs")
        return errors

    def _do(self, op: k.Op) -> int:
        top = dict(k._attrs(op.payload))
        s = {t: v for t, v in k._attrs(top[k.ATTR_SERVICE])}
        key = (PROTO_NAMES[struct.unpack("=H", s[k.SVC_PROTOCOL])[0]], socket.inet_ntoa(s[k.SVC_ADDR]),
               struct.unpack("!H", s[k.SVC_PORT])[0])
        d = {t: v for t, v in k._attrs(top[k.ATTR_DEST])} if k.ATTR_DEST in top else None
        if op.cmd in (k.CMD_NEW_SERVICE, k.CMD_SET_SERVICE):
            if (op.cmd == k.CMD_NEW_SERVICE) == (key in self.vs):
                return errno.EEXIST if key in self.vs else errno.ESRCH
            flags = struct.unpack("=II", s[k.SVC_FLAGS])[0]
            timeout = struct.unpack("=I", s[k.SVC_TIMEOUT])[0] if flags & k.SVC_F_PERSISTENT else 0
            entry = self.vs.setdefault(key, {"reals": {}})
            entry.update(sched=s[k.SVC_SCHED].rstrip(b"\0").decode(), timeout=timeout, flags=flags & k.SVC_F_OPTIONS)
            return 0
        if key not in self.vs:
            return errno.ESRCH
        if op.cmd == k.CMD_DEL_SERVICE:
            del self.vs[key]
            return 0
        assert d is not None
        rk = (socket.inet_ntoa(d[k.DST_ADDR]), struct.unpack("!H", d[k.DST_PORT])[0])
        reals = self.vs[key]["reals"]
        if op.cmd == k.CMD_DEL_DEST:
            return 0 if reals.pop(rk, None) is not None else errno.ENOENT
        assert struct.unpack("=I", d[k.DST_FWD])[0] == 0  # masquerade, never the pyroute2 default (DR)
        if (op.cmd == k.CMD_NEW_DEST) == (rk in reals):
            return errno.EEXIST if rk in reals else errno.ENOENT
        reals[rk] = struct.unpack("=I", d[k.DST_WEIGHT])[0]
        return 0

    def add_foreign(self, key: VSKey, reals: dict | None = None) -> None:
        """A virtual server someone else made (ipvsadm, another tool)."""
        self.vs[key] = {"sched": "wlc", "timeout": 0, "flags": 0, "reals": dict(reals or {}), FOREIGN: True}


def expected_nft(states: Iterable) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for st in states:
        for el in st.nft:
            out.setdefault(el[0], set()).add(element_text(el))
    return out


def expected_states(store, ctx) -> list:
    """What the store's services ask for, computed afresh (not from the proxy's cache): a proxy that
    lost a change differs from this."""
    from loadbalancer.model import build_service, slice_service_key
    from loadbalancer.types import ServiceState

    slices: dict[str, list] = {}
    for sl in store.snapshot("EndpointSlice").values():
        key, _ = slice_service_key(sl)
        if key:
            slices.setdefault(key, []).append(sl)
    out = []
    for key, svc in sorted(store.snapshot("Service").items()):
        st = build_service(svc, slices.get(key, []), ctx)
        if isinstance(st, ServiceState):
            out.append(st)
    return out


def divergence(proxy, fake: FakeKernel, store=None) -> list[str]:
    """How the fake kernel differs from what the proxy wants — or, given the store, from what the
    store's services ask for (empty: converged). Foreign virtual servers are not compared."""
    out = []
    states = list(proxy._states.values()) if store is None else expected_states(store, proxy.ctx)
    desired = {v.key: v for st in states for v in st.virtual_servers}
    ours = {key: fake._vs(key) for key, v in fake.vs.items() if not v.get(FOREIGN)}
    for key in sorted(desired.keys() | ours.keys()):
        if desired.get(key) != ours.get(key) and not fake.vs.get(key, {}).get(FOREIGN):
            out.append(f"vs {key}: want {desired.get(key)}, kernel {ours.get(key)}")
    want_addrs = {a for st in states for a in st.addresses}
    if fake.addrs != want_addrs:
        out.append(f"addresses: missing {sorted(want_addrs - fake.addrs)}, extra {sorted(fake.addrs - want_addrs)}")
    if fake.nft_unusable is None:
        have = {n: v for n, v in (fake.nft_sets or {}).items() if v and n not in ("clustercidrs", "nodeaddrs")}
        if fake.nft_sets is None or have != expected_nft(states):
            out.append(f"nft: want {expected_nft(states)}, kernel {fake.nft_sets}")
    want_hc = {h.port: h for st in states if (h := st.health_check)}
    if fake.health.ports != want_hc:
        out.append(f"health: want {sorted(want_hc)}, serving {sorted(fake.health.ports)}")
    return out
