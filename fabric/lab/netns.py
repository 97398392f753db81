"""Network namespaces and veth pairs through `ip` (adapter: does what it is told, decides nothing)."""

from __future__ import annotations

import os
import signal
import subprocess
import time


class NetnsError(RuntimeError):
    pass


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {(r.stderr or r.stdout).strip()}")


def exec_cmd(ns: str, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def add(ns: str) -> None:
    """Create `ns` with lo up; on failure nothing is left (and an existing `ns` is never touched)."""
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
    except NetnsError:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        raise


def exists(ns: str) -> bool:
    return os.path.exists(f"/run/netns/{ns}")


def list_all() -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def veth(ns_a: str, if_a: str, ns_b: str, if_b: str, mtu: int | None = None) -> None:
    """A veth pair created straight inside both namespaces (never visible in the root namespace), up."""
    extra = ["mtu", str(mtu)] if mtu else []
    _ip("link", "add", if_a, "netns", ns_a, *extra, "type", "veth", "peer", "name", if_b, "netns", ns_b, *extra)
    _ip("-n", ns_a, "link", "set", if_a, "up")
    _ip("-n", ns_b, "link", "set", if_b, "up")


def bridge(ns: str, name: str, ports: list[str]) -> None:
    _ip("-n", ns, "link", "add", name, "type", "bridge")
    for port in ports:
        _ip("-n", ns, "link", "set", port, "master", name)
    _ip("-n", ns, "link", "set", name, "up")


def sysctl(ns: str, key: str, value: str) -> None:
    r = subprocess.run(exec_cmd(ns, ["sysctl", "-q", "-w", f"{key}={value}"]), capture_output=True, text=True)
    if r.returncode != 0:
        raise NetnsError(f"sysctl {key}={value}: {(r.stderr or r.stdout).strip()}")


def pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def delete(ns: str) -> None:
    """Kill whatever still runs inside `ns` (its veths go with it), then remove it. Never raises."""
    if not exists(ns):
        return
    for pid in pids(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 5
    while pids(ns) and time.monotonic() < deadline:
        time.sleep(0.05)  # teardown only: let the kernel reap what we killed
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
