"""Adapters: IPVS over generic netlink, the dummy device's addresses, nftables, conntrack, sysctls.

They apply what the plan says and report per-operation failures; they never decide.

IPVS writes are pipelined: many requests (each with its own sequence number and NLM_F_ACK) go into
one sendmsg, the kernel processes them in order and queues one ack each, and we read the acks
after. One failing request does not stop the others. The request bytes are built here with
struct because encoding through pyroute2's message classes costs ~0.35 ms per message (measured),
more than the kernel's own work; `tests/unit/test_lb_proxy.py` checks the bytes equal what
pyroute2's IPVSService/IPVSDest encode. The IPVS generic netlink family id is asked of the
generic netlink controller inside the target namespace (absent: IPVS is not in this kernel).

Reading: one read of /proc/net/ip_vs (per namespace) lists every virtual server with its real
servers, forwarding method and weight (generic netlink would need one dump per virtual server for
its destinations), plus one generic netlink service dump for schedulers, flags and persistence
timeouts. A few virtual servers (a failed service's, retried alone) are read with one get each.

Nothing here waits without a bound: every netlink socket has a receive timeout (RECV_TIMEOUT) and
every command (nft, conntrack) a deadline after which its whole process group is killed. The netlink
plumbing (sockets with deadlines, pipelined acks, single requests and dumps) is ipip.netlink, the one
module the route adapter uses too.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from ipip.netlink import CHUNK_BYTES, RECV_TIMEOUT, open_netlink, pipeline, request  # noqa: F401 (re-exported)
from ipip.netlink import attr_list as _attrs, header as _header, nla as _nla
from loadbalancer.health import HealthServers
from loadbalancer.netns import NetnsThread
from loadbalancer.types import (PROTO_NAMES, PROTOCOLS, SVC_F_OPTIONS, SVC_F_PERSISTENT, RealKey, RealServer,
                                VirtualServer, VSKey)

# linux/netlink.h, linux/genetlink.h, linux/ip_vs.h
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x300, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_GENERIC = 270, 10, 16
GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 0x10, 3, 1, 2
CMD_NEW_SERVICE, CMD_SET_SERVICE, CMD_DEL_SERVICE, CMD_GET_SERVICE = 1, 2, 3, 4
CMD_NEW_DEST, CMD_SET_DEST, CMD_DEL_DEST, CMD_GET_DEST = 5, 6, 7, 8
ATTR_SERVICE, ATTR_DEST = 1, 2
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_SCHED, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK = 1, 2, 3, 4, 6, 7, 8, 9
DST_ADDR, DST_PORT, DST_FWD, DST_WEIGHT, DST_UTHRESH, DST_LTHRESH, DST_AF = 1, 2, 3, 4, 5, 6, 11
FWD_MASQ, FWD_MASK = 0, 0x7
NFT_TIMEOUT = 30.0  # one `nft -f` transaction (a full table of 10k services loads in well under a second)
CONNTRACK_TIMEOUT = 10.0  # one `conntrack -D`


def _svc_attrs(proto: str, addr: str, port: int, full: VirtualServer | None = None) -> bytes:
    a = (_nla(SVC_AF, struct.pack("=H", socket.AF_INET)) + _nla(SVC_PROTOCOL, struct.pack("=H", PROTOCOLS[proto]))
         + _nla(SVC_ADDR, socket.inet_aton(addr)) + _nla(SVC_PORT, struct.pack("!H", port)))
    if full is not None:
        flags = full.flags | (SVC_F_PERSISTENT if full.persistence else 0)
        a += (_nla(SVC_SCHED, full.scheduler.encode() + b"\0") + _nla(SVC_FLAGS, struct.pack("=II", flags, 0xFFFFFFFF))
              + _nla(SVC_TIMEOUT, struct.pack("=I", full.persistence)) + _nla(SVC_NETMASK, b"\xff\xff\xff\xff"))
    return _nla(ATTR_SERVICE, a)


def _dest_attrs(addr: str, port: int, weight: int | None) -> bytes:
    a = _nla(DST_ADDR, socket.inet_aton(addr)) + _nla(DST_PORT, struct.pack("!H", port))
    if weight is not None:
        a += (_nla(DST_FWD, struct.pack("=I", FWD_MASQ)) + _nla(DST_WEIGHT, struct.pack("=I", weight))
              + _nla(DST_UTHRESH, struct.pack("=I", 0)) + _nla(DST_LTHRESH, struct.pack("=I", 0))
              + _nla(DST_AF, struct.pack("=H", socket.AF_INET)))
    return _nla(ATTR_DEST, a)


@dataclass(frozen=True)
class Op:
    """One IPVS request. `what` names it for error reports; `vs` says which virtual server it touches."""

    cmd: int
    vs: VSKey
    payload: bytes
    what: str


def op_add_vs(v: VirtualServer) -> Op:
    return Op(CMD_NEW_SERVICE, v.key, _svc_attrs(v.proto, v.addr, v.port, v), f"add vs {v.proto} {v.addr}:{v.port}")


def op_set_vs(v: VirtualServer) -> Op:
    return Op(CMD_SET_SERVICE, v.key, _svc_attrs(v.proto, v.addr, v.port, v), f"set vs {v.proto} {v.addr}:{v.port}")


def op_del_vs(k: VSKey) -> Op:
    return Op(CMD_DEL_SERVICE, k, _svc_attrs(*k), f"delete vs {k[0]} {k[1]}:{k[2]}")


def op_add_real(k: VSKey, r: RealServer) -> Op:
    return Op(CMD_NEW_DEST, k, _svc_attrs(*k) + _dest_attrs(r.addr, r.port, r.weight),
              f"add real {r.addr}:{r.port} to {k[0]} {k[1]}:{k[2]}")


def op_set_real(k: VSKey, r: RealServer) -> Op:
    return Op(CMD_SET_DEST, k, _svc_attrs(*k) + _dest_attrs(r.addr, r.port, r.weight),
              f"set real {r.addr}:{r.port} weight {r.weight} in {k[0]} {k[1]}:{k[2]}")


def op_del_real(k: VSKey, rk: RealKey) -> Op:
    return Op(CMD_DEL_DEST, k, _svc_attrs(*k) + _dest_attrs(rk[0], rk[1], None),
              f"delete real {rk[0]}:{rk[1]} from {k[0]} {k[1]}:{k[2]}")


def encode(op: Op, family: int, seq: int) -> bytes:
    flags = NLM_F_REQUEST | NLM_F_ACK
    if op.cmd in (CMD_NEW_SERVICE, CMD_NEW_DEST):
        flags |= NLM_F_CREATE | NLM_F_EXCL
    body = struct.pack("=BBH", op.cmd, 1, 0) + op.payload
    return struct.pack("=IHHII", 16 + len(body), family, flags, seq, 0) + body


class KernelUnavailable(RuntimeError):
    """This kernel (or namespace) can't do what the proxy needs; the message says what is missing."""


@dataclass(frozen=True)
class OpError:
    op: Op
    errno: int

    def __str__(self) -> str:
        return f"{self.op.what}: {os.strerror(self.errno)}"


class IPVSWriter:
    """A generic netlink socket for IPVS requests, opened inside the namespace, pipelining acks."""

    def __init__(self, ns: NetnsThread) -> None:
        self.ns = ns
        self.seq = 0
        self.sock = ns.call(open_netlink, NETLINK_GENERIC)
        try:
            self.family = ns.call(self._family)
        except BaseException:
            self.sock.close()
            raise

    def _next(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        return self.seq

    def _family(self) -> int:
        """The id of the "IPVS" generic netlink family in this namespace (registered by the ip_vs module)."""
        seq = self._next()
        body = struct.pack("=BBH", CTRL_CMD_GETFAMILY, 1, 0) + _nla(CTRL_ATTR_FAMILY_NAME, b"IPVS\0")
        try:
            answers = request(self.sock, _header(GENL_ID_CTRL, NLM_F_ACK, seq, body), seq, "generic netlink family IPVS")
        except TimeoutError:
            raise
        except OSError as e:
            raise KernelUnavailable(f"IPVS is not available in this kernel (generic netlink family 'IPVS': "
                                    f"{os.strerror(e.errno) if e.errno else e}); load the ip_vs module") from None
        for _typ, b in answers:
            fid = dict((t & 0x7FFF, v) for t, v in _attrs(b[4:])).get(CTRL_ATTR_FAMILY_ID)
            if fid:
                return struct.unpack_from("=H", fid)[0]
        raise KernelUnavailable("IPVS is not available in this kernel (no generic netlink family id); load the ip_vs module")

    def close(self) -> None:
        self.sock.close()

    def run(self, ops: list[Op]) -> list[OpError]:
        """Send all ops in order, in chunks of many per sendmsg; return the ones the kernel refused."""
        msgs = []
        for op in ops:
            seq = self._next()
            msgs.append((encode(op, self.family, seq), seq, op))
        return [OpError(op, e) for op, e in pipeline(self.sock, msgs)]

    def _ask(self, cmd: int, payload: bytes, flags: int, what: str) -> list[bytes]:
        seq = self._next()
        answers = request(self.sock, _header(self.family, flags, seq, struct.pack("=BBH", cmd, 1, 0) + payload), seq, what)
        return [b[4:] for typ, b in answers if typ == self.family]  # attributes after the genl header

    def dump_services(self) -> dict[VSKey, tuple[str, int, int]]:
        """One IPVS_CMD_GET_SERVICE dump: (proto, addr, port) -> (scheduler, persistence seconds, flags)."""
        out: dict[VSKey, tuple[str, int, int]] = {}
        for attrs in self._ask(CMD_GET_SERVICE, b"", NLM_F_DUMP, "IPVS service dump"):
            for t, v in _attrs(attrs):
                if t & 0x7FFF == ATTR_SERVICE and (svc := _service_from_attrs(v)):
                    out[svc[0]] = svc[1]
        return out

    def get(self, keys: Iterable[VSKey]) -> dict[VSKey, VirtualServer]:
        """These virtual servers as the kernel has them (absent ones are left out): a get and a destination
        dump each, so repairing one service costs the same with 10 or 10,000 others."""
        out: dict[VSKey, VirtualServer] = {}
        for key in sorted(set(keys)):
            proto, addr, port = key
            try:
                got = self._ask(CMD_GET_SERVICE, _svc_attrs(*key), NLM_F_ACK, f"get vs {proto} {addr}:{port}")
            except OSError as e:
                if e.errno in (errno.ESRCH, errno.ENOENT):
                    continue
                raise
            opts = next((o[1] for a in got for t, v in _attrs(a) if t & 0x7FFF == ATTR_SERVICE
                         and (o := _service_from_attrs(v))), None)
            if opts is None:
                continue
            reals = []
            for a in self._ask(CMD_GET_DEST, _svc_attrs(*key), NLM_F_DUMP, f"dump reals of {proto} {addr}:{port}"):
                for t, v in _attrs(a):
                    if t & 0x7FFF == ATTR_DEST and (r := _dest_from_attrs(v)):
                        reals.append(r)
            out[key] = VirtualServer(proto, addr, port, opts[0], opts[1], tuple(sorted(reals)), opts[2])
        return out


def _service_from_attrs(buf: bytes) -> tuple[VSKey, tuple[str, int, int]] | None:
    a = {t & 0x7FFF: v for t, v in _attrs(buf)}
    if SVC_ADDR not in a or struct.unpack("=H", a.get(SVC_AF, b"\0\0"))[0] != socket.AF_INET:
        return None  # fwmark or IPv6 services are never ours
    proto = PROTO_NAMES.get(struct.unpack("=H", a[SVC_PROTOCOL])[0])
    if proto is None:
        return None
    addr = socket.inet_ntoa(a[SVC_ADDR][:4])
    port = struct.unpack("!H", a[SVC_PORT])[0]
    sched = a.get(SVC_SCHED, b"").split(b"\0")[0].decode()
    flags = struct.unpack_from("=I", a.get(SVC_FLAGS, b"\0" * 8))[0]
    timeout = struct.unpack("=I", a[SVC_TIMEOUT])[0] if SVC_TIMEOUT in a else 0
    return (proto, addr, port), (sched, timeout if flags & SVC_F_PERSISTENT else 0, flags & SVC_F_OPTIONS)


def _dest_from_attrs(buf: bytes) -> RealServer | None:
    """A destination; one not in masquerade mode gets weight -1 so any diff rewrites it (as /proc parsing)."""
    a = {t & 0x7FFF: v for t, v in _attrs(buf)}
    if DST_ADDR not in a or DST_PORT not in a or (DST_AF in a and struct.unpack("=H", a[DST_AF])[0] != socket.AF_INET):
        return None
    fwd = struct.unpack("=I", a[DST_FWD])[0] & FWD_MASK if DST_FWD in a else FWD_MASQ
    weight = struct.unpack("=I", a[DST_WEIGHT])[0] if DST_WEIGHT in a else 0
    return RealServer(socket.inet_ntoa(a[DST_ADDR][:4]), struct.unpack("!H", a[DST_PORT])[0],
                      weight if fwd == FWD_MASQ else -1)


RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 16, 18, 20, 21, 22
IFA_ADDRESS, IFA_LOCAL, IFLA_IFNAME, IFLA_LINKINFO, IFLA_INFO_KIND, IFF_UP = 1, 2, 3, 18, 1, 1


class AddressWriter:
    """rtnetlink for the service device: pipelined RTM_NEWADDR/RTM_DELADDR for /32s on it (pyroute2
    costs a round trip + encode each), its address dump, and the few link requests the proxy needs."""

    def __init__(self, ns: NetnsThread) -> None:
        self.sock = ns.call(open_netlink, socket.NETLINK_ROUTE)
        self.seq = 0

    def _next(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        return self.seq

    def _ask(self, typ: int, flags: int, body: bytes, what: str) -> list[tuple[int, bytes]]:
        seq = self._next()
        return request(self.sock, _header(typ, flags, seq, body), seq, what)

    def link_index(self, name: str) -> int | None:
        try:
            got = self._ask(RTM_GETLINK, NLM_F_ACK, struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
                            + _nla(IFLA_IFNAME, name.encode() + b"\0"), f"get link {name}")
        except OSError as e:
            if e.errno == errno.ENODEV:
                return None
            raise
        return next((struct.unpack_from("=i", b, 4)[0] for typ, b in got if typ == RTM_NEWLINK), None)

    def add_dummy(self, name: str) -> None:
        info = _nla(IFLA_LINKINFO, _nla(IFLA_INFO_KIND, b"dummy"))
        self._ask(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
                  + _nla(IFLA_IFNAME, name.encode() + b"\0") + info, f"add dummy link {name}")

    def set_up(self, index: int) -> None:
        self._ask(RTM_NEWLINK, NLM_F_ACK, struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP),
                  f"set link {index} up")

    def addresses(self, index: int) -> set[str]:
        """IPv4 addresses on one device (one dump; other devices' entries are skipped here)."""
        out = set()
        for typ, b in self._ask(RTM_GETADDR, NLM_F_DUMP, struct.pack("=BBBBI", socket.AF_INET, 0, 0, 0, index),
                                "address dump"):
            if typ == RTM_NEWADDR and struct.unpack_from("=I", b, 4)[0] == index:
                a = {t & 0x7FFF: v for t, v in _attrs(b[8:])}
                raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
                if raw:
                    out.add(socket.inet_ntoa(raw[:4]))
        return out

    def run(self, index: int, add: Iterable[str], delete: Iterable[str]) -> list[tuple[str, str, int]]:
        """Returns (verb, address, errno) per refusal."""
        msgs = []
        for verb, typ, flags, addrs in (("del", RTM_DELADDR, 0, delete),
                                        ("add", RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, add)):
            for a in addrs:
                self._next()
                raw = socket.inet_aton(a)
                body = struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, index) + _nla(IFA_LOCAL, raw) + _nla(IFA_ADDRESS, raw)
                hdr = struct.pack("=IHHII", 16 + len(body), typ, NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, 0)
                msgs.append((hdr + body, self.seq, (verb, a)))
        return [(tag[0], tag[1], e) for tag, e in pipeline(self.sock, msgs)]  # type: ignore[index]

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------------------------
# Reading what is there


def parse_proc_ip_vs(text: str) -> dict[VSKey, VirtualServer]:
    """Parse /proc/net/ip_vs. A real server not in masquerade mode gets weight -1 so any diff fixes it."""
    out: dict[VSKey, VirtualServer] = {}
    cur: VirtualServer | None = None
    reals: list[RealServer] = []

    def flush() -> None:
        if cur is not None:
            out[cur.key] = VirtualServer(cur.proto, cur.addr, cur.port, cur.scheduler, cur.persistence,
                                         tuple(sorted(reals)))

    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] in PROTOCOLS and len(parts) >= 3 and ":" in parts[1]:
            flush()
            reals = []
            hexaddr, hexport = parts[1].split(":")
            addr = str(ipaddress.IPv4Address(int(hexaddr, 16))) if len(hexaddr) == 8 else None
            if addr is None:  # IPv6 virtual server: not ours
                cur = None
                continue
            persistence = 0
            if "persistent" in parts:
                persistence = int(parts[parts.index("persistent") + 1])
            cur = VirtualServer(parts[0], addr, int(hexport, 16), parts[2], persistence)
        elif parts[0] == "->" and cur is not None and len(parts) >= 4 and ":" in parts[1]:
            hexaddr, hexport = parts[1].split(":")
            if len(hexaddr) != 8:
                continue
            weight = int(parts[3]) if parts[2] == "Masq" else -1
            reals.append(RealServer(str(ipaddress.IPv4Address(int(hexaddr, 16))), int(hexport, 16), weight))
        elif parts[0] == "FWM":
            flush()
            cur = None
    flush()
    return out


# --------------------------------------------------------------------------------------------
# The node-side adapter used by the proxy


class KernelAdapter:
    """Everything the proxy does to one namespace's kernel. All calls run on the namespace thread."""

    def __init__(self, netns: str | None, device: str, *, nft_timeout: float = NFT_TIMEOUT,
                 conntrack_timeout: float = CONNTRACK_TIMEOUT) -> None:
        self.ns = NetnsThread(netns)
        self.device = device
        self.nft_timeout = nft_timeout
        self.conntrack_timeout = conntrack_timeout
        try:
            self.ipvs = IPVSWriter(self.ns)
        except BaseException:
            self.ns.close()
            raise
        self.addrs = AddressWriter(self.ns)

    def close(self) -> None:
        self.ipvs.close()
        self.addrs.close()
        self.ns.close()

    # IPVS ------------------------------------------------------------------------------------

    def ipvs_run(self, ops: list[Op]) -> list[OpError]:
        return self.ipvs.run(ops)

    def ipvs_dump(self) -> dict[VSKey, VirtualServer]:
        def read() -> str:
            with open("/proc/thread-self/net/ip_vs") as f:
                return f.read()

        # Real servers from /proc (one read for all of them); scheduler and persistence from one
        # generic netlink dump (/proc prints the persistence timeout in jiffies, and HZ is not known).
        vss = parse_proc_ip_vs(self.ns.call(read))
        opts = self.ipvs.dump_services()
        out = {}
        for key, v in vss.items():
            sched, persistence, flags = opts.get(key, (v.scheduler, v.persistence, v.flags))
            out[key] = VirtualServer(v.proto, v.addr, v.port, sched, persistence, v.reals, flags)
        return out

    def ipvs_get(self, keys: Iterable[VSKey]) -> dict[VSKey, VirtualServer]:
        return self.ipvs.get(keys)

    # dummy device ------------------------------------------------------------------------------

    def _index(self) -> int:
        idx = self.addrs.link_index(self.device)
        if idx is not None:
            return idx
        try:
            self.addrs.add_dummy(self.device)
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
        idx = self.addrs.link_index(self.device)
        if idx is None:
            raise OSError(errno.ENODEV, f"device {self.device} vanished after it was created")
        return idx

    def ensure_device(self) -> None:
        self.ns.call(self._index)

    def addresses(self) -> set[str]:
        return self.ns.call(lambda: self.addrs.addresses(self._index()))

    def address_change(self, add: Iterable[str], delete: Iterable[str]) -> list[tuple[str, str]]:
        """Add/remove /32s on the device (pipelined); returns (address, error) for each failure."""
        idx = self.ns.call(self._index)
        errs: list[tuple[str, str]] = []
        for verb, a, e in self.addrs.run(idx, add, delete):
            if (verb, e) in (("add", errno.EEXIST), ("del", errno.EADDRNOTAVAIL)):
                continue  # already as wanted
            errs.append((a, f"{verb} address {a}/32 on {self.device}: {os.strerror(e)}"))
        return errs

    # nftables, conntrack, sysctls ------------------------------------------------------------------

    NFT_PROBE = ("table inet bgp-fabric-probe {\n chain p { type nat hook postrouting priority srcnat; masquerade; }\n"
                 " chain i { type filter hook input priority filter; ip saddr 127.0.0.1 accept; }\n}\n")

    def nft_available(self) -> str | None:
        """None when nft can load an inet NAT table here (checked with `nft -c`), else the reason it never
        will (not installed, the kernel lacks the families). Raises TimeoutError when the probe hangs:
        that is a failure to retry, not a verdict, so it is not remembered."""
        if not hasattr(self, "_nft_probe"):
            def run() -> str | None:
                try:
                    r = run_bounded(["nft", "-c", "-f", "-"], self.NFT_PROBE, self.nft_timeout)
                except FileNotFoundError:
                    return "the nft command is not installed"
                return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["nft failed"])[0]

            self._nft_probe = self.ns.call(run)
        return self._nft_probe

    def nft(self, script: str) -> str | None:
        """Run one nft transaction; returns the error text or None (a hung nft is killed: an error)."""
        def run() -> str | None:
            try:
                r = run_bounded(["nft", "-f", "-"], script, self.nft_timeout)
            except OSError as e:  # TimeoutError included: the command hung and was killed
                return e.strerror or str(e)
            return None if r.returncode == 0 else (r.stderr.strip() or f"nft exit {r.returncode}")

        return self.ns.call(run)

    def nft_list(self) -> str:
        return self.ns.call(lambda: run_bounded(["nft", "list", "table", "inet", "bgp-fabric"], None,
                                                self.nft_timeout).stdout)

    def conntrack_flush_udp(self, entries: list[tuple[str, int, str]]) -> list[tuple[tuple[str, int, str], str]]:
        """Delete UDP conntrack entries VIP:port -> endpoint, so clients stop sending to a gone backend.
        Returns (entry, error) for each entry not flushed; after a hung conntrack the rest is not tried."""
        def run() -> list[tuple[tuple[str, int, str], str]]:
            errs: list[tuple[tuple[str, int, str], str]] = []
            for i, (cmd, (vip, port, ep)) in enumerate(zip(flush_udp_commands(entries), entries)):
                what = f"conntrack -D udp {vip}:{port} -> {ep}"
                try:
                    r = run_bounded(cmd, None, self.conntrack_timeout)
                except TimeoutError as e:
                    return errs + [(entries[i], f"{what}: {e.strerror or e}")] + [
                        (x, f"conntrack -D udp {x[0]}:{x[1]} -> {x[2]}: not tried after a hung conntrack")
                        for x in entries[i + 1:]]
                except OSError as e:
                    errs.append((entries[i], f"{what}: {e.strerror or e}"))
                    continue
                # exit 1 with "0 flow entries" just means there was nothing to delete
                if r.returncode not in (0, 1):
                    errs.append((entries[i], f"{what}: {r.stderr.strip()}"))
            return errs

        return self.ns.call(run)

    def apply_sysctls(self) -> list[str]:
        def run() -> list[str]:
            errs = []
            for path, value in sysctls(self.device, os.uname().release):
                try:
                    # Already right (e.g. set by the DaemonSet's init container): no write, which a
                    # container without privileges could not do (/proc/sys is read-only there).
                    with open(f"/proc/sys/{path}") as f:
                        if f.read().strip() == value:
                            continue
                    with open(f"/proc/sys/{path}", "w") as f:
                        f.write(value)
                except OSError as e:
                    errs.append(f"sysctl {path.replace('/', '.')}={value}: {e.strerror}")
            return errs

        def lo_up() -> None:
            # IPVS refuses masquerade destinations ("address not unicast") while lo is down (fresh namespaces)
            idx = self.addrs.link_index("lo")
            if idx is not None:
                self.addrs.set_up(idx)

        self.ensure_device()
        self.ns.call(lo_up)
        return self.ns.call(run)

    def health_servers(self, bind: str) -> HealthServers:
        """healthCheckNodePort listeners opened on the namespace thread (so inside the namespace)."""
        return HealthServers(self.call, bind)

    def call(self, fn, *args):
        """Run fn on the namespace thread (sockets it opens live in the namespace)."""
        return self.ns.call(fn, *args)


def run_bounded(cmd: list[str], stdin: str | None, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run with a deadline that holds even when the command leaves children holding its pipes:
    it runs in a session of its own and the whole group is killed at the deadline (TimeoutError)."""
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.communicate(timeout=2)
        except subprocess.TimeoutExpired:  # a grandchild left the group and holds the pipes: leave it
            p.kill()
            p.wait()
        raise TimeoutError(errno.ETIMEDOUT, f"{cmd[0]} did not finish within {timeout:g} s (killed)") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def flush_udp_commands(entries: Iterable[tuple[str, int, str]]) -> list[list[str]]:
    """conntrack(8) commands deleting UDP flows VIP:port that were NAT'ed to an endpoint (as kube-proxy)."""
    return [["conntrack", "-D", "-p", "udp", "--orig-dst", vip, "--orig-port-dst", str(port), "--dst-nat", ep]
            for vip, port, ep in entries]


def kernel_at_least(release: str, major: int, minor: int) -> bool:
    try:
        parts = release.split("-")[0].split(".")
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):
        return True


def sysctls(device: str, release: str) -> list[tuple[str, str]]:
    """The sysctls kube-proxy's IPVS mode sets (see docs/services.md for why each)."""
    out = [
        ("net/ipv4/vs/conntrack", "1"),
        ("net/ipv4/vs/expire_nodest_conn", "1"),
        ("net/ipv4/vs/expire_quiescent_template", "1"),
        ("net/ipv4/ip_forward", "1"),
        (f"net/ipv4/conf/{device}/arp_ignore", "1"),
        (f"net/ipv4/conf/{device}/arp_announce", "2"),
    ]
    if not kernel_at_least(release, 5, 9):
        # Before 5.9 conn_reuse_mode=1 dropped the first SYN of a reused port for a second (kube-proxy #81775)
        out.append(("net/ipv4/vs/conn_reuse_mode", "0"))
    return out


__all__ = ["KernelAdapter", "IPVSWriter", "Op", "OpError", "parse_proc_ip_vs", "run_bounded", "sysctls", "PROTO_NAMES"]
