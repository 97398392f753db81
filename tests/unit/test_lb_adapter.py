"""The IPVS adapter never waits without a bound: netlink reads time out, commands are killed at a deadline."""

from __future__ import annotations

import errno
import os
import struct
import time
from pathlib import Path

import pytest

from loadbalancer import ipvs_kernel as k
from loadbalancer.types import RealServer, VirtualServer


class ScriptedSocket:
    """Stands in for a netlink socket: answers the given acks, then times out as a hung kernel would."""

    def __init__(self, ack_errnos: list[int]) -> None:
        self.ack_errnos = ack_errnos
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, n: int) -> bytes:
        if not self.ack_errnos:
            raise TimeoutError("timed out")
        # one ack per message sent so far, in order, for as many as scripted
        seqs = []
        for chunk in self.sent:
            off = 0
            while off < len(chunk):
                ln, _t, _f, seq, _p = struct.unpack_from("=IHHII", chunk, off)
                seqs.append(seq)
                off += ln
        out = b""
        for seq, err in zip(seqs, self.ack_errnos):
            out += struct.pack("=IHHII", 20 + 16, k.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -err) + b"\0" * 16
        self.ack_errnos = []
        return out

    def gettimeout(self) -> float:
        return 5.0


def _ops(n: int) -> list[tuple[bytes, int, object]]:
    v = VirtualServer("TCP", "10.96.0.1", 80, "rr")
    return [(k.encode(k.op_add_real(v.key, RealServer(f"10.244.{i // 250}.{i % 250}", 80)), 30, i + 1), i + 1, i) for i in range(n)]


def test_pipeline_reports_unanswered_requests_as_timed_out() -> None:
    sock = ScriptedSocket([0, errno.EEXIST])  # the kernel answers two requests, then nothing more
    errors = k.pipeline(sock, _ops(4))  # type: ignore[arg-type]
    assert errors == [(1, errno.EEXIST), (2, errno.ETIMEDOUT), (3, errno.ETIMEDOUT)]


def test_pipeline_does_not_send_more_chunks_after_a_timeout() -> None:
    sock = ScriptedSocket([])
    n = k.CHUNK_BYTES // 60 * 3  # several chunks' worth
    errors = k.pipeline(sock, _ops(n))  # type: ignore[arg-type]
    assert len(sock.sent) == 1 and len(errors) == n and {e for _, e in errors} == {errno.ETIMEDOUT}


def test_request_timeout_names_what_was_asked() -> None:
    with pytest.raises(TimeoutError, match="IPVS service dump: no answer from the kernel within 5 s"):
        k.request(ScriptedSocket([]), b"x" * 16, 1, "IPVS service dump")  # type: ignore[arg-type]


def test_request_returns_answers_until_the_ack_and_raises_kernel_errors() -> None:
    sock = ScriptedSocket([errno.ESRCH])
    msg = struct.pack("=IHHII", 16, 30, 1, 7, 0)
    with pytest.raises(OSError) as e:
        k.request(sock, msg, 7, "get vs TCP 10.96.0.1:80")  # type: ignore[arg-type]
    assert e.value.errno == errno.ESRCH and "get vs TCP 10.96.0.1:80" in str(e.value)


def test_run_bounded_kills_a_hung_command_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child"
    hung = tmp_path / "nft"
    # a stand-in that leaves a child holding its stdout (plain Popen.kill + communicate would wait for it)
    hung.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\nsleep 60\n")
    hung.chmod(0o755)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not finish within 0.5 s \(killed\)") as e:
        k.run_bounded([str(hung), "-f", "-"], "flush ruleset\n", 0.5)
    assert e.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - t0 < 5
    child = int(pidfile.read_text())
    for _ in range(50):  # reaped by init shortly after the kill
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"child {child} of the hung command survived")


def test_run_bounded_returns_output_and_status(tmp_path: Path) -> None:
    r = k.run_bounded(["sh", "-c", "cat; echo err >&2; exit 3"], "in\n", 5)
    assert (r.returncode, r.stdout, r.stderr) == (3, "in\n", "err\n")
    with pytest.raises(FileNotFoundError):
        k.run_bounded([str(tmp_path / "missing")], None, 5)


def test_dest_attrs_parse_like_proc() -> None:
    d = dict(k._attrs(dict(k._attrs(k.op_add_real(("TCP", "10.96.0.1", 80), RealServer("10.244.0.9", 8080, 0))
                                    .payload))[k.ATTR_DEST]))
    raw = b"".join(k._nla(t, v if t != k.DST_ADDR else v + b"\0" * 12) for t, v in d.items())
    assert k._dest_from_attrs(raw) == RealServer("10.244.0.9", 8080, 0)
    routed = raw.replace(k._nla(k.DST_FWD, struct.pack("=I", 0)), k._nla(k.DST_FWD, struct.pack("=I", 2)))
    assert k._dest_from_attrs(routed) == RealServer("10.244.0.9", 8080, -1)  # not masquerade: rewritten by a diff


def test_missing_ipvs_is_one_clear_error(tmp_path: Path) -> None:
    """This host's kernel has no IPVS (as a node without ip_vs loaded): one sentence, no traceback."""
    if os.geteuid() != 0 or os.path.exists("/proc/net/ip_vs"):
        pytest.skip("needs root and a kernel without IPVS")
    import subprocess
    import uuid

    ns = f"lbnoipvs-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with pytest.raises(k.KernelUnavailable) as e:
            k.KernelAdapter(ns, "fabric-svc")
        assert str(e.value).startswith("IPVS is not available in this kernel") and "\n" not in str(e.value)
        assert "load the ip_vs module" in str(e.value)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
