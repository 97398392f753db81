"""Adapters: IPVS over generic netlink, the dummy device's addresses, nftables, conntrack, sysctls.

They apply what the plan says and report per-operation failures; they never decide.

IPVS writes are pipelined: many requests (each with its own sequence number and NLM_F_ACK) go into
one sendmsg, the kernel processes them in order and queues one ack each, and we read the acks
after. One failing request does not stop the others. The request bytes are built here with
struct because encoding through pyroute2's message classes costs ~0.35 ms per message (measured),
more than the kernel's own work; `tests/unit/test_lb_netlink.py` checks the bytes equal what
pyroute2's IPVSService/IPVSDest encode. The IPVS generic netlink family id comes from pyroute2's
`IPVS` socket opened inside the target namespace.

Reading: one read of /proc/net/ip_vs (per namespace) lists every virtual server with its real
servers, forwarding method and weight (generic netlink would need one dump per virtual server for
its destinations), plus one generic netlink service dump for schedulers and persistence timeouts.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from loadbalancer.netns import NetnsThread
from loadbalancer.types import PROTO_NAMES, PROTOCOLS, RealKey, RealServer, VirtualServer, VSKey

# linux/netlink.h, linux/ip_vs.h
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x300, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_GENERIC = 270, 10, 16
CMD_NEW_SERVICE, CMD_SET_SERVICE, CMD_DEL_SERVICE, CMD_GET_SERVICE = 1, 2, 3, 4
CMD_NEW_DEST, CMD_SET_DEST, CMD_DEL_DEST = 5, 6, 7
ATTR_SERVICE, ATTR_DEST = 1, 2
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_SCHED, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK = 1, 2, 3, 4, 6, 7, 8, 9
DST_ADDR, DST_PORT, DST_FWD, DST_WEIGHT, DST_UTHRESH, DST_LTHRESH, DST_AF = 1, 2, 3, 4, 5, 6, 11
SVC_F_PERSISTENT = 0x1
FWD_MASQ = 0
CHUNK_BYTES = 32 * 1024  # one sendmsg; far below the socket's send buffer


def _nla(t: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, t) + payload + b"\0" * ((4 - n % 4) % 4)


def _svc_attrs(proto: str, addr: str, port: int, full: VirtualServer | None = None) -> bytes:
    a = (_nla(SVC_AF, struct.pack("=H", socket.AF_INET)) + _nla(SVC_PROTOCOL, struct.pack("=H", PROTOCOLS[proto]))
         + _nla(SVC_ADDR, socket.inet_aton(addr)) + _nla(SVC_PORT, struct.pack("!H", port)))
    if full is not None:
        flags = SVC_F_PERSISTENT if full.persistence else 0
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
        self.family, self.sock = ns.call(self._open)
        self.seq = 0

    @staticmethod
    def _open() -> tuple[int, socket.socket]:
        from pyroute2 import IPVS

        try:
            with IPVS() as ipvs:  # resolves the "IPVS" generic netlink family in this namespace
                family = ipvs.prid
        except Exception as e:  # NetlinkError ENOENT when the family is not registered
            raise KernelUnavailable(f"IPVS is not available in this kernel (generic netlink family 'IPVS': {e}); "
                                    "load the ip_vs module") from None
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # acks carry only the header, not our request
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((0, 0))
        return family, s

    def close(self) -> None:
        self.sock.close()

    def run(self, ops: list[Op]) -> list[OpError]:
        """Send all ops in order, in chunks of many per sendmsg; return the ones the kernel refused."""
        msgs = []
        for op in ops:
            self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
            msgs.append((encode(op, self.family, self.seq), self.seq, op))
        return [OpError(op, e) for op, e in pipeline(self.sock, msgs)]

    def dump_services(self) -> dict[VSKey, tuple[str, int]]:
        """One IPVS_CMD_GET_SERVICE dump: (proto, addr, port) -> (scheduler, persistence seconds)."""
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        seq = self.seq
        body = struct.pack("=BBH", CMD_GET_SERVICE, 1, 0)
        self.sock.sendto(struct.pack("=IHHII", 16 + len(body), self.family, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body,
                         (0, 0))
        out: dict[VSKey, tuple[str, int]] = {}
        while True:
            data = self.sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                ln, typ, _fl, mseq, _pid = struct.unpack_from("=IHHII", data, off)
                if mseq == seq:
                    if typ == NLMSG_DONE:
                        return out
                    if typ == NLMSG_ERROR:
                        (err,) = struct.unpack_from("=i", data, off + 16)
                        raise OSError(-err, f"IPVS service dump: {os.strerror(-err)}")
                    if typ == self.family:
                        for t, v in _attrs(data[off + 20:off + ln]):
                            if t & 0x7FFF == ATTR_SERVICE:
                                svc = _service_from_attrs(v)
                                if svc:
                                    out[svc[0]] = svc[1]
                off += (ln + 3) & ~3 if ln else len(data)


def _attrs(buf: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 0
    while off + 4 <= len(buf):
        n, t = struct.unpack_from("=HH", buf, off)
        if n < 4:
            break
        out.append((t, buf[off + 4:off + n]))
        off += (n + 3) & ~3
    return out


def _service_from_attrs(buf: bytes) -> tuple[VSKey, tuple[str, int]] | None:
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
    return (proto, addr, port), (sched, timeout if flags & SVC_F_PERSISTENT else 0)


def pipeline(sock: socket.socket, msgs: list[tuple[bytes, int, object]]) -> list[tuple[object, int]]:
    """Send netlink requests (bytes, seq, tag) many per sendmsg and collect their acks after each chunk.

    Returns (tag, errno) for every request the kernel refused; the others went through.
    """
    errors: list[tuple[object, int]] = []
    i = 0
    while i < len(msgs):
        buf: list[bytes] = []
        pending: dict[int, object] = {}
        size = 0
        while i < len(msgs) and size < CHUNK_BYTES:
            data, seq, tag = msgs[i]
            buf.append(data)
            pending[seq] = tag
            size += len(data)
            i += 1
        sock.sendto(b"".join(buf), (0, 0))
        while pending:
            data = sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                ln, typ, _fl, seq, _pid = struct.unpack_from("=IHHII", data, off)
                if typ == NLMSG_ERROR and seq in pending:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    tag = pending.pop(seq)
                    if err:
                        errors.append((tag, -err))
                off += (ln + 3) & ~3 if ln else len(data)
    return errors


RTM_NEWADDR, RTM_DELADDR, IFA_ADDRESS, IFA_LOCAL = 20, 21, 1, 2


class AddressWriter:
    """Pipelined RTM_NEWADDR/RTM_DELADDR for /32s on one device (pyroute2 costs a round trip + encode each)."""

    def __init__(self, ns: NetnsThread) -> None:
        self.sock = ns.call(self._open)
        self.seq = 0

    @staticmethod
    def _open() -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((0, 0))
        return s

    def run(self, index: int, add: Iterable[str], delete: Iterable[str]) -> list[tuple[str, str, int]]:
        """Returns (verb, address, errno) per refusal."""
        msgs = []
        for verb, typ, flags, addrs in (("del", RTM_DELADDR, 0, delete),
                                        ("add", RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, add)):
            for a in addrs:
                self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
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

    def __init__(self, netns: str | None, device: str) -> None:
        self.ns = NetnsThread(netns)
        self.device = device
        try:
            self.ipvs = IPVSWriter(self.ns)
        except BaseException:
            self.ns.close()
            raise
        self.addrs = AddressWriter(self.ns)
        self._ipr = self.ns.call(self._open_iproute)

    @staticmethod
    def _open_iproute():
        from pyroute2 import IPRoute

        return IPRoute()

    def close(self) -> None:
        self.ipvs.close()
        self.addrs.close()
        self.ns.call(self._ipr.close)
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
            sched, persistence = opts.get(key, (v.scheduler, v.persistence))
            out[key] = VirtualServer(v.proto, v.addr, v.port, sched, persistence, v.reals)
        return out

    # dummy device ------------------------------------------------------------------------------

    def _index(self) -> int:
        idx = self._ipr.link_lookup(ifname=self.device)
        if idx:
            return idx[0]
        self._ipr.link("add", ifname=self.device, kind="dummy")
        return self._ipr.link_lookup(ifname=self.device)[0]

    def ensure_device(self) -> None:
        self.ns.call(self._index)

    def addresses(self) -> set[str]:
        def get() -> set[str]:
            return {a.get("IFA_ADDRESS") for a in self._ipr.addr("dump", index=self._index())}

        return self.ns.call(get)

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
        """None when nft can load an inet NAT table here (checked with `nft -c`), else the reason."""
        if not hasattr(self, "_nft_probe"):
            def run() -> str | None:
                try:
                    r = subprocess.run(["nft", "-c", "-f", "-"], input=self.NFT_PROBE, capture_output=True, text=True)
                except FileNotFoundError:
                    return "the nft command is not installed"
                return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["nft failed"])[0]

            self._nft_probe = self.ns.call(run)
        return self._nft_probe

    def nft(self, script: str) -> str | None:
        """Run one nft transaction; returns the error text or None."""
        def run() -> str | None:
            r = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
            return None if r.returncode == 0 else (r.stderr.strip() or f"nft exit {r.returncode}")

        return self.ns.call(run)

    def nft_list(self) -> str:
        return self.ns.call(lambda: subprocess.run(["nft", "list", "table", "inet", "bgp-fabric"],
                                                   capture_output=True, text=True).stdout)

    def conntrack_flush_udp(self, entries: list[tuple[str, int, str]]) -> list[str]:
        """Delete UDP conntrack entries VIP:port -> endpoint, so clients stop sending to a gone backend."""
        def run() -> list[str]:
            errs = []
            for cmd, (vip, port, ep) in zip(flush_udp_commands(entries), entries):
                r = subprocess.run(cmd, capture_output=True, text=True)
                # exit 1 with "0 flow entries" just means there was nothing to delete
                if r.returncode not in (0, 1):
                    errs.append(f"conntrack -D udp {vip}:{port} -> {ep}: {r.stderr.strip()}")
            return errs

        return self.ns.call(run)

    def apply_sysctls(self) -> list[str]:
        def run() -> list[str]:
            errs = []
            for path, value in sysctls(self.device, os.uname().release):
                try:
                    with open(f"/proc/sys/{path}", "w") as f:
                        f.write(value)
                except OSError as e:
                    errs.append(f"sysctl {path.replace('/', '.')}={value}: {e.strerror}")
            return errs

        def lo_up() -> None:
            # IPVS refuses masquerade destinations ("address not unicast") while lo is down (fresh namespaces)
            idx = self._ipr.link_lookup(ifname="lo")
            if idx:
                self._ipr.link("set", index=idx[0], state="up")

        self.ensure_device()
        self.ns.call(lo_up)
        return self.ns.call(run)

    def call(self, fn, *args):
        """Run fn on the namespace thread (sockets it opens live in the namespace)."""
        return self.ns.call(fn, *args)


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


__all__ = ["KernelAdapter", "IPVSWriter", "Op", "OpError", "parse_proc_ip_vs", "sysctls", "PROTO_NAMES"]
