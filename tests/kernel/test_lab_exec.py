"""`fabric lab exec` against a running lab (`fabric lab run --keep`): from this host into the lab kernel
(through the lab kernel's serial line and the host relay), and inside a capable kernel (the exec server's
own socket). Commands with their exit status, stdin, stdout and stderr kept apart, an interactive shell
on a pty (size, ^C, exit status), FRR's vtysh and `fabric status` that need no options, a session whose
client dies is killed, unknown nodes are refused — and after Ctrl-C nothing is left."""

from __future__ import annotations

import os
import pty
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import fcntl
import pytest
import termios
import yaml

from fabric.lab.relay import SOCKET_DIR

REPO = Path(__file__).resolve().parents[2]
FABRIC = [sys.executable, "-m", "fabric.cli"]


def exec_lab(tmp_path: Path, agent: bool) -> Path:
    """h1 - h2 - r (FRR, one peer that never answers); optionally an agent node `n` with no peers."""
    (tmp_path / "frr.conf").write_text("hostname r\nrouter bgp 64512\n neighbor 10.9.1.2 remote-as 64513\n")
    nodes: dict = {
        "h1": {"image": "alpine", "exec": ["ip addr add 10.9.0.1/24 dev eth1"]},
        "h2": {"image": "alpine", "exec": ["ip addr add 10.9.0.2/24 dev eth1", "ip addr add 10.9.1.2/24 dev eth2"]},
        "r": {"image": "quay.io/frrouting/frr:10.2.1", "binds": ["frr.conf:/etc/frr/frr.conf"],
              "exec": ["ip addr add 10.9.1.1/24 dev eth1"]},
    }
    links = [{"endpoints": ["h1:eth1", "h2:eth1"]}, {"endpoints": ["r:eth1", "h2:eth2"]}]
    if agent:
        (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({"nodes": [
            {"name": "n", "address": "10.9.2.1", "podCIDRs": ["10.244.1.0/24"]}]}))
        (tmp_path / "n.yaml").write_text(yaml.safe_dump({
            "node": {"name": "n", "address": "10.9.2.1/24", "podCIDRs": ["10.244.1.0/24"]},
            "pools": [{"cidr": "10.244.0.0/16"}], "services": {"enabled": False},
            "source": {"kind": "file", "path": "cluster.yaml"}, "paths": {"runDir": "run-n"}}))
        nodes["n"] = {"image": "bgp-fabric:dev", "binds": ["n.yaml:/etc/bgp-fabric/config.yaml"],
                      "exec": ["ip addr add 10.9.2.1/24 dev eth1"]}
        links.append({"endpoints": ["n:eth1", "h1:eth2"]})
    (tmp_path / "ex.clab.yml").write_text(yaml.safe_dump({"name": "ex", "topology": {"nodes": nodes, "links": links}}))
    (tmp_path / "ex.checks.yml").write_text(yaml.safe_dump({"timeout": 3}))  # r's session never comes up
    return tmp_path / "ex.clab.yml"


def fabric(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*FABRIC, *args], input=stdin, capture_output=True, text=True, timeout=timeout, cwd=REPO)


class Pty:
    """`fabric lab exec NODE` on a terminal of our own, as a person would type into it."""

    def __init__(self, *args: str, rows: int = 33, cols: int = 101) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.chdir(REPO)
            os.execv(sys.executable, [*FABRIC, "lab", "exec", *args])
        self.seen = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))  # the client gets SIGWINCH

    def expect(self, token: bytes, timeout: float = 20) -> bytes:
        end = time.monotonic() + timeout
        while token not in self.seen:
            left = end - time.monotonic()
            assert left > 0, f"no {token!r} on the terminal; it shows: {self.seen[-400:]!r}"
            if select.select([self.fd], [], [], min(left, 0.2))[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                assert chunk, f"terminal closed before {token!r}: {self.seen[-400:]!r}"
                self.seen += chunk
        before, _, self.seen = self.seen.partition(token)
        return before

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def exit_status(self, timeout: float = 20) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:
                    pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"`fabric lab exec` did not end: {self.seen[-400:]!r}")


def run_scenario(tmp_path: Path, agent: bool) -> str:
    lab = exec_lab(tmp_path, agent)
    before = set(SOCKET_DIR.glob("*")) if SOCKET_DIR.is_dir() else set()
    proc = subprocess.Popen([*FABRIC, "lab", "run", str(lab), "--keep", "--report-dir", str(tmp_path / "report")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "--keep: lab is up" in line:
                break
        assert proc.poll() is None, "".join(lines)
        assert "exec: `fabric lab exec NODE" in "".join(lines)
        check_exec(agent)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.terminate()  # tears the lab down (a SIGKILL would too, through the lab kernel's death signal)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    text = "".join(lines)
    assert "teardown: done" in text or "the lab kernel and the lab in it are gone" in text, text
    assert proc.returncode == 1, text  # after the report, Ctrl-C keeps the verdict (r's session never came up)
    after = set(SOCKET_DIR.glob("*")) if SOCKET_DIR.is_dir() else set()
    assert after <= before, f"sockets left behind: {after - before}"
    assert "no running lab" in fabric("lab", "exec", "--lab", "ex", "h1", "--", "true").stderr
    return text


def check_exec(agent: bool) -> None:
    listing = fabric("lab", "ls")
    assert listing.returncode == 0 and "(lab ex, run " in listing.stdout and "h1 h2" in listing.stdout, listing
    assert fabric("lab", "exec", "--lab", listing.stdout.split()[0], "h1", "--", "true").returncode == 0
    # a command: its exit status, stdout and stderr apart, stdin passed through
    r = fabric("lab", "exec", "--lab", "ex", "h1", "--", "sh", "-c", "read x; echo out $x; echo err >&2; exit 7",
               stdin="hello\n")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out hello\n", "err\n"), r
    # really inside the node: h1 reaches h2 over the lab's link, and has the lab's address
    r = fabric("lab", "exec", "h1", "--", "ping", "-c", "1", "-W", "2", "10.9.0.2")
    assert r.returncode == 0 and "1 received" in r.stdout, r
    assert "10.9.0.1/24" in fabric("lab", "exec", "h1", "--", "ip", "-br", "addr").stdout
    # FRR's vtysh on an FRR node talks to that node's daemons, with no options and no warnings
    r = fabric("lab", "exec", "r", "--", "vtysh", "-c", "show bgp summary json")
    assert r.returncode == 0 and '"10.9.1.2"' in r.stdout and r.stderr == "", r
    if agent:
        r = fabric("lab", "exec", "n", "--", "fabric", "status")
        assert r.returncode == 0 and "n" in r.stdout, r
    # unknown node / unknown lab: exit 125 and a reason
    r = fabric("lab", "exec", "nope", "--", "true")
    assert r.returncode == 125 and "no node 'nope'" in r.stderr and "h1, h2" in r.stderr, r
    assert fabric("lab", "exec", "--lab", "other", "h1", "--", "true").returncode == 125
    # a client that dies: its command is killed in the lab
    c = subprocess.Popen([*FABRIC, "lab", "exec", "h2", "--", "sleep", "313"], cwd=REPO, stdin=subprocess.DEVNULL)
    probe = ["lab", "exec", "h2", "--", "pgrep", "-f", "^sleep 313$"]  # not our own command lines
    deadline = time.monotonic() + 20
    while fabric(*probe).returncode != 0:
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.2)
    c.kill()
    c.wait()
    deadline = time.monotonic() + 20
    while fabric(*probe).returncode == 0:
        assert time.monotonic() < deadline, "the command outlived its client"
        time.sleep(0.2)
    # an interactive shell on a pty: prompt names the node, the terminal's size, ^C, exit status
    t = Pty("h2")
    t.expect(b"h2:/# ")
    t.send(b"echo $((6*7)); stty size\r")
    t.expect(b"42")
    t.expect(b"33 101")
    t.expect(b"h2:/# ")
    t.resize(40, 120)
    time.sleep(0.5)
    t.send(b"stty size\r")
    t.expect(b"40 120")
    t.expect(b"h2:/# ")
    t.send(b"sleep 300\r")
    time.sleep(1)
    t.send(b"\x03")
    t.expect(b"h2:/# ")
    t.send(b"exit 3\r")
    assert t.exit_status() == 3


@pytest.mark.kernel
def test_lab_exec_in_a_capable_kernel(tmp_path: Path) -> None:
    run_scenario(tmp_path, agent=True)


@pytest.mark.kernel
@pytest.mark.bootslab
def test_lab_exec_from_the_host_into_the_lab_kernel(tmp_path: Path) -> None:
    """On a host without ipip/IPVS/dummy, `fabric lab run` boots the lab kernel: exec goes through its serial
    line and the relay. (On a capable host this is the same as the test above.)"""
    text = run_scenario(tmp_path, agent=False)
    from fabric.lab import kernel as labkernel

    if not labkernel.capable()[0]:
        assert "running the lab inside the lab kernel" in text and "through the host's relay" in text, text
