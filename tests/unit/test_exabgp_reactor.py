"""The pure parts of bgp.exabgp_reactor, and that it can still find the ExaBGP internals it replaces."""

from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import IPv4Address

import pytest

from bgp import exabgp_reactor as r
from bgp.exabgp_config import Neighbor, NeighborError, render_timers, validate


def test_keepalive_interval() -> None:
    assert r.keepalive_interval(30, None) == 30  # ExaBGP's own: hold 90 / 3
    assert r.keepalive_interval(30, 10) == 10  # ours is shorter
    assert r.keepalive_interval(3, 10) == 3  # the peer negotiated a smaller hold: never slower than hold / 3
    assert r.keepalive_interval(0, 10) == 0  # hold time 0: no keepalives at all


def test_wait_timeout() -> None:
    assert r.wait_timeout(100.0, [105.0, 103.5], urgent=False, past_due_streak=0, fallback=0.01) == (3.5, False)
    assert r.wait_timeout(100.0, [105.0], urgent=True, past_due_streak=0, fallback=0.01) == (0.0, False)
    assert r.wait_timeout(100.0, [], urgent=False, past_due_streak=0, fallback=0.01) == (None, False)
    # a deadline already passed: run at once, but if nothing consumes it, no busier than ExaBGP's 10 ms
    assert r.wait_timeout(100.0, [99.0], urgent=False, past_due_streak=0, fallback=0.01) == (0.0, True)
    assert r.wait_timeout(100.0, [99.0], urgent=False, past_due_streak=r.PAST_DUE_LIMIT,
                          fallback=0.01) == (0.01, True)


def nb(addr: str, **kw: object) -> Neighbor:
    return Neighbor(f"n{addr.rsplit('.', 1)[1]}", IPv4Address(addr), 64512, 64512, IPv4Address("10.0.0.1"),
                    IPv4Address("10.0.0.1"), 9, **kw)  # type: ignore[arg-type]


def test_timers_file_round_trip() -> None:
    text = render_timers([nb("10.0.0.3", keepalive=2, connect_retry=7), nb("10.0.0.2")])
    assert list(json.loads(text)["neighbors"]) == ["10.0.0.2", "10.0.0.3"]
    parsed = r.parse_timers(text)
    assert parsed["10.0.0.3"] == r.NeighborTimers(2, 7)
    assert parsed["10.0.0.2"] == r.NeighborTimers(None, 5)


def test_bad_timers_are_named() -> None:
    with pytest.raises(NeighborError, match=r"keepalive: 4 must be at most hold_time/3 \(3\)"):
        validate([nb("10.0.0.2", keepalive=4)])
    with pytest.raises(NeighborError, match="connect_retry: 0 must be 1..3600"):
        validate([nb("10.0.0.2", connect_retry=0)])
    with pytest.raises(ValueError, match="connectRetry"):
        r.parse_timers('{"neighbors": {"10.0.0.2": {"connectRetry": -1}}}')


def test_installs_into_this_exabgp() -> None:
    """Every ExaBGP internal we replace still exists (a fresh process: install() patches classes), and
    loading ExaBGP asks no DNS server (its hostname capability would, at import)."""
    code = ("import socket; socket.getfqdn = None; socket.gethostbyaddr = None; "
            "from bgp import exabgp_reactor as r; r.install(None); "
            "from exabgp.reactor.loop import Reactor; from exabgp.reactor.network.outgoing import Outgoing; "
            "assert Reactor._wait_for_io is r._wait_for_io and Outgoing.establish is r._establish; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_connect_outcome_tells_refused_from_unanswered_on_loopback() -> None:
    """A reset (nothing listens) is `refused`; an attempt nobody answers stays in progress until connectRetry
    ends it (`timeout`); a listener is `ok`. Loopback only."""
    import errno
    import socket
    import time

    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    s = socket.socket()
    s.setblocking(False)
    assert s.connect_ex(("127.0.0.1", port)) in (errno.EINPROGRESS, errno.ECONNREFUSED)
    deadline = time.monotonic() + 5
    while (got := r.connect_outcome(s))[0] is None and time.monotonic() < deadline:
        time.sleep(0.01)
    s.close()
    assert got == (False, errno.ECONNREFUSED) and r.outcome(*got, None) == ("refused", "Connection refused")
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    c = socket.socket()
    c.setblocking(False)
    c.connect_ex(ls.getsockname())
    deadline = time.monotonic() + 5
    while (got := r.connect_outcome(c))[0] is None and time.monotonic() < deadline:
        time.sleep(0.01)
    c.close()
    ls.close()
    assert got[0] is True and r.outcome(*got, None) == ("ok", "")
    assert r.outcome(None, 0, None) == ("timeout", "")  # connectRetry passed with no answer
    assert r.outcome(False, 0, OSError("Network is unreachable")) == ("error", "Network is unreachable")


class _Proc:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, process: str, line: str, neighbor: object) -> None:
        self.lines.append(line)


def test_a_connect_outcome_is_reported_once_per_change_to_the_api_processes() -> None:
    from bgp.messages import ConnectMsg, parse_line

    class Addr:
        def top(self) -> str:
            return "10.0.1.3"

    class Nb(dict):
        api = {"neighbor-changes": ["relay"]}

    peer = type("Peer", (), {})()
    peer.neighbor = Nb({"peer-address": Addr()})
    reactor = type("Reactor", (), {})()
    reactor.processes, reactor._peers = _Proc(), {"x": peer}
    old = r.STATE.reactor, dict(r.STATE.reported)
    r.STATE.reactor, r.STATE.reported = reactor, {}
    try:
        for _ in range(3):
            r.report_connect("10.0.1.3", "timeout", "")
        r.report_connect("10.0.1.3", "ok", "")
        r.report_connect("10.0.1.9", "refused", "")  # not a neighbor of this ExaBGP: nothing
    finally:
        r.STATE.reactor, r.STATE.reported = old[0], old[1]
    msgs = [parse_line(x) for x in reactor.processes.lines]
    assert msgs == [ConnectMsg(IPv4Address("10.0.1.3"), "timeout", ""), ConnectMsg(IPv4Address("10.0.1.3"), "ok", "")]


def test_direct_api_socket_both_ways_and_exit_when_the_agent_goes(tmp_path) -> None:
    """ExaBGP through the launcher talks to our socket itself (no relay process): a command gets its
    ack, and when our side closes ExaBGP exits at once (the agent restarts it)."""
    import os
    import socket
    import time

    from bgp import exabgp_config

    sock_path = tmp_path / "api.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(1)
    server.settimeout(60)
    conf = tmp_path / "exabgp.conf"
    conf.write_text(exabgp_config.render([], sock_path))
    env = dict(os.environ, **exabgp_config.environment(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "bgp.exabgp_launch", "--api-socket", str(sock_path), str(conf)],
                            env=env, cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        conn, _ = server.accept()  # ExaBGP itself, not a relay: nothing else was started
        conn.settimeout(60)
        conn.sendall(b"announce route 10.244.9.0/24 next-hop 10.0.0.9\n")
        got = b""
        while not got.endswith(b"\n"):
            got += conn.recv(4096)
        assert got.split(b"\n")[-2] in (b"done", b"error"), got  # the ack came back on the same socket
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert children == []  # no helper process
        t0 = time.monotonic()
        conn.close()
        assert proc.wait(30) == 1
        assert time.monotonic() - t0 < 10
        assert "API socket" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()
