"""The Speaker's supervision and command flow, with a stand-in ExaBGP (no root, no kernel needed).

The stand-in reads the generated config, runs the real relay helper from its `run` line, writes the
JSON lines of `inject.jsonl` (from the run dir) to it, answers every command with `done` (or `error`
for a `neighbor` selector it doesn't know) and records commands and SIGUSR1 reloads in `commands.log`.
The real ExaBGP is exercised by tests/kernel/test_bgp_*.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N
from pathlib import Path

import pytest

from bgp.announce import Announcement
from bgp.events import BgpEvent, PeerUp, RoutesAnnounced, SpeakerRestarted
from bgp.exabgp_config import Neighbor, NeighborError
from bgp.speaker import Speaker

FAKE = r'''
import os, re, signal, subprocess, sys, threading, shlex
conf = sys.argv[1]
here = os.path.dirname(conf)
log = open(os.path.join(here, "commands.log"), "a", buffering=1)
def reload(*_):
    log.write("RELOAD\n")
signal.signal(signal.SIGUSR1, reload)
text = open(conf).read()
run = re.search(r"^\s*run (.*);$", text, re.M).group(1)
known = set(re.findall(r"^neighbor (\S+) \{", text, re.M))
lock = threading.Lock()
def start_relay():
    return subprocess.Popen(shlex.split(run), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
relay = start_relay()
def respawn_relay(*_):  # what ExaBGP does when its helper dies
    global relay
    with lock:
        relay.kill(); relay.wait()
        relay = start_relay()
    threading.Thread(target=serve, args=(relay,), daemon=True).start()
signal.signal(signal.SIGUSR2, respawn_relay)
def send(line):
    with lock:
        relay.stdin.write(line + "\n"); relay.stdin.flush()
inject = os.path.join(here, "inject.jsonl")
if os.path.exists(inject):
    for line in open(inject):
        send(line.rstrip("\n"))
def serve(r):
    for cmd in r.stdout:
        cmd = cmd.rstrip("\n")
        log.write(cmd + "\n")
        m = re.match(r"neighbor (\S+) ", cmd)
        send("error" if m and m.group(1) not in known else "done")
serve(relay)
threading.Event().wait()  # a respawned relay is served by its own thread
'''

STATE = ('{"exabgp": "5.0.0", "type": "state", "neighbor": {"address": {"local": "10.0.0.1", "peer": "%s"}, '
         '"asn": {"local": 64512, "peer": 64512}, "state": "%s"}}')
OPEN = ('{"exabgp": "5.0.0", "type": "open", "neighbor": {"address": {"local": "10.0.0.1", "peer": "%s"}, '
        '"direction": "receive", "open": {"version": 4, "asn": 64512, "hold_time": 9, "router_id": "%s", '
        '"capabilities": {"64": {"name": "graceful restart", "time": 77}}}}}')
UPDATE = ('{"exabgp": "5.0.0", "type": "update", "neighbor": {"address": {"local": "10.0.0.1", "peer": "%s"}, '
          '"direction": "receive", "message": {"update": {"announce": {"ipv4 unicast": {"%s": [{"nlri": "%s"}]}}}}}}')


def nb(name: str, peer: str) -> Neighbor:
    return Neighbor(name, A(peer), 64512, 64512, A("10.0.0.1"), A("10.0.0.1"), 9)


def ann(p: str) -> Announcement:
    return Announcement(N(p), "self")


async def until(what: str, fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout}s (last: {v!r})")
        await asyncio.sleep(0.05)


def commands(run_dir: Path) -> list[str]:
    p = run_dir / "commands.log"
    return p.read_text().splitlines() if p.exists() else []


@pytest.fixture
def fake_exabgp(tmp_path: Path) -> str:
    script = tmp_path / "fake-exabgp"
    script.write_text(f"#!{sys.executable}\n{FAKE}")
    script.chmod(0o755)
    return str(script)


def test_speaker_flow(tmp_path: Path, fake_exabgp: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "inject.jsonl").write_text("\n".join([
        OPEN % ("10.0.0.2", "10.0.0.2"), STATE % ("10.0.0.2", "up"),
        UPDATE % ("10.0.0.2", "10.0.0.2", "10.244.2.0/24"), "garbage that is not json",
    ]) + "\n")
    events: list[BgpEvent] = []

    async def main() -> None:
        sp = Speaker(run_dir, events.append, exabgp=fake_exabgp)
        await sp.set_neighbors([nb("b", "10.0.0.2")])
        await sp.set_announcements({N("10.244.1.0/24"): ann("10.244.1.0/24")})
        await sp.start()
        try:
            # the relay's first lines reach us (kept by the relay until it connected)
            await until("PeerUp", lambda: PeerUp("b", A("10.0.0.2"), 77, A("10.0.0.2")) in events)
            await until("routes", lambda: RoutesAnnounced("b", A("10.0.0.2"), (N("10.244.2.0/24"),)) in events)
            # on connect: the whole set; on PeerUp: the set for b, then b's End-of-RIB
            await until("eor", lambda: "neighbor 10.0.0.2 announce eor ipv4 unicast" in commands(run_dir))
            cmds = commands(run_dir)
            assert cmds[0] == "announce attributes next-hop self nlri 10.244.1.0/24"
            assert cmds.index("neighbor 10.0.0.2 announce attributes next-hop self nlri 10.244.1.0/24") < \
                cmds.index("neighbor 10.0.0.2 announce eor ipv4 unicast")

            # a diff sends only the change
            n = len(commands(run_dir))
            await sp.set_announcements({N("10.244.1.0/24"): ann("10.244.1.0/24"),
                                        N("10.244.3.0/24"): ann("10.244.3.0/24")})
            await until("diff", lambda: len(commands(run_dir)) > n)
            assert commands(run_dir)[n:] == ["announce attributes next-hop self nlri 10.244.3.0/24"]

            # neighbor change: config rewritten, ExaBGP reloaded (SIGUSR1), not restarted
            await sp.set_neighbors([nb("b", "10.0.0.2"), nb("c", "10.0.0.3")])
            await until("reload", lambda: "RELOAD" in commands(run_dir))
            assert "neighbor 10.0.0.3 {" in (run_dir / "exabgp.conf").read_text()
            assert sp.status()["exabgp_starts"] == 1
            with pytest.raises(NeighborError, match="graceful_restart_time"):
                await sp.set_neighbors([Neighbor("x", A("10.0.0.4"), 1, 1, A("10.0.0.1"), A("10.0.0.1"), 9,
                                                 graceful_restart_time=9999)])

            # an `error` ack is logged and kept for status, never raised
            # (the stand-in knows only the neighbors of the config it started with: c is unknown to it)
            await sp.set_announcements({N("10.244.3.0/24"): ann("10.244.3.0/24"),
                                        N("10.244.4.0/24"): Announcement(N("10.244.4.0/24"), "self",
                                                                         neighbors=frozenset({"c"}))})
            await until("error ack", lambda: sp.status()["recent_errors"])

            # ExaBGP dies: SpeakerRestarted, respawn, and the full desired set again on the new relay
            n = len(commands(run_dir))
            pid = sp.status()["exabgp_pid"]
            assert isinstance(pid, int)
            os.kill(pid, signal.SIGKILL)
            await until("restarted", lambda: SpeakerRestarted() in events)
            await until("respawned", lambda: sp.status()["exabgp_starts"] == 2 and sp.status()["relay_connected"])
            await until("replayed", lambda: {"announce attributes next-hop self nlri 10.244.3.0/24",
                                             "neighbor 10.0.0.3 announce attributes next-hop self nlri 10.244.4.0/24"}
                        <= set(commands(run_dir)[n:]))
            st = sp.status()
            assert st["neighbors"]["b"]["state"] == "established"  # the injected `up` again, after the restart
            assert st["neighbors"]["c"]["state"] == "idle"
        finally:
            await sp.stop()
        assert not (run_dir / "relay.sock").exists()
        assert sp.status()["exabgp_pid"] is None

    asyncio.run(main())


def test_missing_exabgp_is_a_clear_error(tmp_path: Path) -> None:
    from bgp.speaker import SpeakerError

    async def main() -> None:
        sp = Speaker(tmp_path / "run", lambda ev: None, exabgp=str(tmp_path / "no-such-exabgp"))
        with pytest.raises(SpeakerError, match="paths.exabgp: .*no-such-exabgp.* is not an executable file"):
            await sp.start()

    asyncio.run(main())


def test_relay_respawned_under_running_exabgp_restarts_it(tmp_path: Path, fake_exabgp: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    events: list[BgpEvent] = []

    async def main() -> None:
        sp = Speaker(run_dir, events.append, exabgp=fake_exabgp)
        await sp.set_neighbors([nb("b", "10.0.0.2")])
        await sp.start()
        try:
            await until("relay", lambda: sp.status()["relay_connected"])
            pid = sp.status()["exabgp_pid"]
            assert isinstance(pid, int)
            os.kill(pid, signal.SIGUSR2)  # the stand-in kills and respawns its relay
            await until("restarted", lambda: SpeakerRestarted() in events)
            await until("respawned", lambda: sp.status()["exabgp_starts"] == 2 and sp.status()["relay_connected"])
            assert any("relay restarted" in e for e in sp.status()["recent_errors"])
        finally:
            await sp.stop()

    asyncio.run(main())


def test_end_of_rib_is_withheld_until_the_announced_set_is_final(tmp_path: Path, fake_exabgp: str) -> None:
    """Finding 5: a restarted agent that does not know its desired state yet sends no End-of-RIB, so a
    peer keeps every route of ours it held; the first final set releases it to every live session."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "inject.jsonl").write_text("\n".join([OPEN % ("10.0.0.2", "10.0.0.2"), STATE % ("10.0.0.2", "up")])
                                          + "\n")
    events: list[BgpEvent] = []

    async def main() -> None:
        sp = Speaker(run_dir, events.append, exabgp=fake_exabgp)
        await sp.set_neighbors([nb("b", "10.0.0.2")])
        await sp.set_announcements({N("10.244.1.0/24"): ann("10.244.1.0/24")}, final=False)
        await sp.start()
        try:
            await until("PeerUp", lambda: PeerUp("b", A("10.0.0.2"), 77, A("10.0.0.2")) in events)
            await until("replay", lambda: "neighbor 10.0.0.2 announce attributes next-hop self nlri 10.244.1.0/24"
                        in commands(run_dir))
            await asyncio.sleep(0.3)
            assert not [c for c in commands(run_dir) if "eor" in c]
            assert sp.status()["endOfRib"].startswith("withheld")
            await sp.set_announcements({N("10.244.1.0/24"): ann("10.244.1.0/24"),
                                        N("10.96.0.10/32"): ann("10.96.0.10/32")}, final=True)
            await until("eor", lambda: "neighbor 10.0.0.2 announce eor ipv4 unicast" in commands(run_dir))
            cmds = commands(run_dir)
            assert cmds.index("announce attributes next-hop self nlri 10.96.0.10/32") < \
                cmds.index("neighbor 10.0.0.2 announce eor ipv4 unicast")
            assert sp.status()["endOfRib"] == "sent"
        finally:
            await sp.stop()

    asyncio.run(main())


def test_update_announcements_sends_only_the_changed_prefixes(tmp_path: Path, fake_exabgp: str) -> None:
    """Per-prefix changes (what the BGP stage hands over for one service change): only those prefixes
    are compared and sent; None withdraws; the whole set stays right for a replay; the first final
    update releases End-of-RIB like set_announcements does."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "inject.jsonl").write_text("\n".join([OPEN % ("10.0.0.2", "10.0.0.2"), STATE % ("10.0.0.2", "up")])
                                          + "\n")
    events: list[BgpEvent] = []

    async def main() -> None:
        sp = Speaker(run_dir, events.append, exabgp=fake_exabgp)
        await sp.set_neighbors([nb("b", "10.0.0.2")])
        await sp.set_announcements({N("10.244.1.0/24"): ann("10.244.1.0/24"),
                                    N("10.96.0.10/32"): ann("10.96.0.10/32")}, final=False)
        await sp.start()
        try:
            await until("replay", lambda: "neighbor 10.0.0.2 announce attributes next-hop self nlri 10.96.0.10/32 "
                        "10.244.1.0/24" in commands(run_dir))
            n = len(commands(run_dir))
            await sp.update_announcements({N("10.96.0.10/32"): None, N("10.96.0.11/32"): ann("10.96.0.11/32"),
                                           N("10.244.1.0/24"): ann("10.244.1.0/24"),  # unchanged: nothing sent
                                           N("10.96.0.99/32"): None}, final=False)  # never announced: nothing
            await until("update", lambda: len(commands(run_dir)) >= n + 2)
            await asyncio.sleep(0.2)
            assert commands(run_dir)[n:] == ["withdraw attributes nlri 10.96.0.10/32",
                                             "announce attributes next-hop self nlri 10.96.0.11/32"]
            assert sp.status()["announced"] == 2 and sp.status()["endOfRib"].startswith("withheld")
            # an empty final update: nothing to announce, End-of-RIB goes to the live session
            n = len(commands(run_dir))
            await sp.update_announcements({}, final=True)
            await until("eor", lambda: "neighbor 10.0.0.2 announce eor ipv4 unicast" in commands(run_dir))
            assert commands(run_dir)[n:] == ["neighbor 10.0.0.2 announce eor ipv4 unicast"]
            # ExaBGP restarted: the replay is the whole set as updated
            n = len(commands(run_dir))
            pid = sp.status()["exabgp_pid"]
            assert isinstance(pid, int)
            os.kill(pid, signal.SIGKILL)
            await until("respawned", lambda: sp.status()["exabgp_starts"] == 2 and sp.status()["relay_connected"])
            await until("replayed", lambda: "neighbor 10.0.0.2 announce eor ipv4 unicast" in commands(run_dir)[n:])
            replay = [c for c in commands(run_dir)[n:] if "announce attributes" in c]
            assert replay == ["announce attributes next-hop self nlri 10.96.0.11/32 10.244.1.0/24",
                              "neighbor 10.0.0.2 announce attributes next-hop self nlri 10.96.0.11/32 10.244.1.0/24"]
        finally:
            await sp.stop()

    asyncio.run(main())


def test_run_dir_and_config_are_private_and_no_password_in_reprs(tmp_path: Path, fake_exabgp: str) -> None:
    """Finding 12: exabgp.conf holds the MD5 password: 0600 in a 0700 run dir; reprs never show it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o755)
    secret = "s3cr3t-md5"
    n = Neighbor("tor", A("10.0.0.9"), 65000, 64512, A("10.0.0.1"), A("10.0.0.1"), 9, md5_password=secret)
    assert secret not in repr(n)
    from fabric.config import parse
    cfg = parse({"node": {"name": "n1", "address": "10.0.0.1/24"}, "source": {"kind": "file", "path": "x"},
                 "peers": [{"name": "tor", "address": "10.0.0.9", "asn": 65000, "password": secret}]})
    assert secret not in repr(cfg) and secret not in str(cfg.peers)

    async def main() -> None:
        sp = Speaker(run_dir, lambda ev: None, exabgp=fake_exabgp)
        await sp.set_neighbors([n])
        await sp.start()
        try:
            await until("relay", lambda: sp.status()["relay_connected"])
            assert run_dir.stat().st_mode & 0o777 == 0o700
            conf = run_dir / "exabgp.conf"
            assert conf.stat().st_mode & 0o777 == 0o600
            await sp.set_neighbors([n, nb("b", "10.0.0.2")])  # rewritten: still private
            assert conf.stat().st_mode & 0o777 == 0o600
            env = sp._env()
            assert env["exabgp_log_destination"] == str((run_dir / "exabgp.log").resolve())  # rotating, bounded
        finally:
            await sp.stop()

    asyncio.run(main())


def test_exabgp_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """Finding 14: the death signal is set by an exec wrapper (setpriv, or bgp.deathsig), not a preexec_fn."""
    import subprocess
    import textwrap

    from bgp.speaker import die_with_parent_command

    for wrapper in ("setpriv", "python"):
        parent = textwrap.dedent(f'''
            import subprocess, sys, time, shutil
            from bgp import speaker
            if {wrapper!r} == "python":
                shutil.which = lambda name: None  # no util-linux: our own wrapper
            cmd = speaker.die_with_parent_command(["sleep", "60"])
            p = subprocess.Popen(cmd)
            print(p.pid, cmd[0], flush=True)
            time.sleep(60)
        ''')
        pr = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True,
                              cwd=str(Path(__file__).resolve().parents[2]))
        assert pr.stdout is not None
        pid_s, prog = pr.stdout.readline().split()
        child = int(pid_s)
        time.sleep(0.5)  # the wrapper has exec'd sleep
        assert ("setpriv" in prog) == (wrapper == "setpriv")
        pr.kill()
        pr.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
                with open(f"/proc/{child}/stat") as f:
                    if f.read().split(") ")[1].startswith("Z"):
                        break  # a zombie: dead, waiting for init to reap it
            except (ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            raise AssertionError(f"{wrapper}: the child outlived its parent")
    assert die_with_parent_command(["x"])[-1] == "x"


def test_exabgp_is_spawned_without_preexec_fn(tmp_path: Path, fake_exabgp: str, monkeypatch) -> None:
    """Finding 14: a preexec_fn in a multi-threaded process can deadlock between fork and exec."""
    seen: list[dict] = []
    real = asyncio.create_subprocess_exec

    async def spy(*args, **kwargs):
        seen.append(kwargs)
        return await real(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)

    async def main() -> None:
        sp = Speaker(tmp_path / "run", lambda ev: None, exabgp=fake_exabgp)
        await sp.start()
        await sp.stop()

    asyncio.run(main())
    assert seen and all("preexec_fn" not in kw for kw in seen)


def test_exabgp_runs_ahead_of_the_agent_or_as_the_agent_without_the_privilege(tmp_path: Path, fake_exabgp: str,
                                                                               monkeypatch, caplog) -> None:
    from bgp import speaker as speaker_mod

    async def run(expect_nice: int) -> None:
        sp = Speaker(tmp_path / "run", lambda ev: None, exabgp=fake_exabgp)
        await sp.start()
        try:
            assert sp._proc is not None
            assert os.getpriority(os.PRIO_PROCESS, sp._proc.pid) == expect_nice
        finally:
            await sp.stop()

    ours = os.getpriority(os.PRIO_PROCESS, 0)
    if os.geteuid() == 0:  # may raise its priority: EXABGP_NICE ahead of ours
        asyncio.run(run(max(ours + speaker_mod.EXABGP_NICE, -20)))

    def refused(which: int, who: int, prio: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(speaker_mod.os, "setpriority", refused)
    with caplog.at_level("DEBUG", logger="bgp.speaker"):
        asyncio.run(run(ours))  # not allowed: it still starts, at our priority
    assert "keeps our scheduling priority" in caplog.text
