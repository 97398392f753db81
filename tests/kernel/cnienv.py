"""A CNI runtime environment for kernel tests: `/etc/cni` and `/opt/cni/bin` that exist nowhere else.

The lab kernels boot on the host's own root file system, so creating /etc/cni or /opt/cni there would
create them on the host. Instead one long-lived process holds a private mount namespace (slave of the
root one, so network namespaces created later still appear in it) where:

- /etc is an overlay with a tmpfs upper layer: /etc/cni/net.d and /etc/netns/<node>/cni/net.d exist
  only there. `ip netns exec <node>` binds /etc/netns/<node>/cni over /etc/cni, so each lab node's
  agent writes, and each node's runtime reads, its own /etc/cni/net.d — the product's default path;
- /opt is a tmpfs holding /opt/cni/bin: our plugin and the reference plugins (Debian's
  containernetworking-plugins, for `loopback` which `ctr run --cni` wants, and for the comparison);
- containerd runs there, with its root, state and socket under /run (the lab kernel's tmpfs).

Commands enter it with `nsenter --mount=/proc/<holder>/ns/mnt` (`cmd()`); nothing changes the test
process's own mount namespace, and closing the holder undoes every mount.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cni.build import plugin as build_plugin

REFERENCE_PLUGINS = Path("/usr/lib/cni")
BUSYBOX = Path("/usr/bin/busybox")
APPLETS = ("sh", "ip", "ping", "sleep", "cat", "nc", "wget", "httpd", "echo", "hostname")


def have_tools() -> list[str]:
    missing = [t for t in ("containerd", "ctr", "runc", "unshare", "nsenter") if shutil.which(t) is None]
    if not (REFERENCE_PLUGINS / "loopback").exists():
        missing.append("containernetworking-plugins")
    if not BUSYBOX.exists():
        missing.append("busybox-static")
    return missing


@dataclass
class Pod:
    """A container started with `ctr run --rm --cni` (ctr does ADD now and DEL when the task ends)."""

    name: str
    node_ns: str
    proc: subprocess.Popen
    pid: int

    @property
    def netns(self) -> str:
        return f"/proc/{self.pid}/ns/net"


class CniEnv:
    def __init__(self, base: Path | None = None) -> None:
        self.base = Path(base or tempfile.mkdtemp(prefix="fabric-cnienv-", dir="/run"))
        self.holder: subprocess.Popen | None = None
        self.containerd: subprocess.Popen | None = None
        self.plugin = build_plugin()
        self.pods: list[Pod] = []

    # -- the mount namespace ---------------------------------------------------------------------

    def start(self) -> "CniEnv":
        os.makedirs("/run/netns", exist_ok=True)
        # /run/netns must be a shared mount before the holder copies it, so namespaces created later
        # propagate into the holder's (slave) copy. `ip netns add` sets that up on its first use.
        probe = f"cnienv-probe-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True)
        subprocess.run(["ip", "netns", "del", probe], check=True, capture_output=True)
        ov = self.base / "etc-overlay"
        setup = f"""set -e
mkdir -p {ov}/upper {ov}/work
mount -t overlay bgp-fabric-test-etc -o lowerdir=/etc,upperdir={ov}/upper,workdir={ov}/work /etc
mkdir -p /etc/cni/net.d /etc/netns
mount -t tmpfs bgp-fabric-test-opt /opt
mkdir -p /opt/cni/bin
cp {self.plugin} /opt/cni/bin/bgp-fabric
cp {REFERENCE_PLUGINS}/* /opt/cni/bin/
echo ready
exec sleep 1000000
"""
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sh", "-c", setup],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            err = self.holder.stderr.read() if self.holder.stderr else ""
            raise RuntimeError(f"CNI test environment setup failed: {err.strip()}")
        return self

    def cmd(self, argv: list[str], netns: str | None = None) -> list[str]:
        assert self.holder is not None
        inner = ["ip", "netns", "exec", netns, *argv] if netns else argv
        return ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", *inner]

    def run(self, argv: list[str], netns: str | None = None, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(self.cmd(argv, netns), **kw)

    def node_conf_dir(self, node_ns: str) -> str:
        """The folder that is /etc/cni/net.d for processes in `node_ns` (made now, inside the overlay)."""
        d = f"/etc/netns/{node_ns}/cni/net.d"
        r = self.run(["mkdir", "-p", d])
        assert r.returncode == 0, r.stderr
        return d

    def read(self, path: str) -> str:
        r = self.run(["cat", path])
        return r.stdout if r.returncode == 0 else ""

    # -- containerd and ctr ----------------------------------------------------------------------

    def start_containerd(self) -> None:
        root = self.base / "containerd"
        for d in ("root", "state"):
            (root / d).mkdir(parents=True, exist_ok=True)
        rootfs = self.rootfs = self.base / "rootfs"
        for d in ("bin", "proc", "sys", "dev", "etc", "tmp"):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
        for a in APPLETS:
            link = rootfs / "bin" / a
            if not link.exists():
                link.symlink_to("busybox")
        self.sock = str(root / "containerd.sock")
        log = open(root / "containerd.log", "ab")
        self.containerd = subprocess.Popen(
            self.cmd(["containerd", "--root", str(root / "root"), "--state", str(root / "state"), "--address", self.sock]),
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while not os.path.exists(self.sock):
            if self.containerd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("containerd did not start: " + (root / "containerd.log").read_text()[-500:])
            time.sleep(0.1)  # test setup only

    def ctr(self, *args: str, netns: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(["ctr", "-a", self.sock, *args], netns=netns, timeout=timeout, stdin=subprocess.DEVNULL)

    def pod(self, name: str, node_ns: str, argv: tuple[str, ...] = ("/bin/sleep", "100000"), timeout: float = 60) -> Pod:
        """Start a pod on `node_ns` with `ctr run --rm --cni` (as the node's runtime: in its netns, with
        its /etc/cni/net.d); returns once its task runs (the CNI ADD is done before the task starts)."""
        log = open(self.base / f"ctr-{name}.log", "ab")
        proc = subprocess.Popen(self.cmd(["ctr", "-a", self.sock, "run", "--rm", "--cni", "--rootfs", str(self.rootfs),
                                          name, *argv], node_ns),
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            r = self.ctr("task", "ls")
            for line in r.stdout.splitlines()[1:]:
                parts = line.split()
                if parts and parts[0] == name and parts[-1] == "RUNNING":
                    pod = Pod(name, node_ns, proc, int(parts[1]))
                    self.pods.append(pod)
                    return pod
            if proc.poll() is not None or time.monotonic() > deadline:
                text = (self.base / f"ctr-{name}.log").read_text(errors="replace")[-800:]
                raise RuntimeError(f"ctr run {name} did not start (exit {proc.poll()}): {text}")
            time.sleep(0.2)  # test setup only

    def stop_pod(self, pod: Pod, timeout: float = 60) -> int:
        """Kill the pod's task: `ctr run --rm` then does the CNI DEL and removes the container."""
        self.ctr("task", "kill", "-s", "KILL", pod.name)
        try:
            rc = pod.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pod.proc.kill()
            rc = pod.proc.wait()
        if pod in self.pods:
            self.pods.remove(pod)
        return rc

    def pod_log(self, pod: Pod) -> str:
        return (self.base / f"ctr-{pod.name}.log").read_text(errors="replace")

    # -- teardown ----------------------------------------------------------------------------------

    def close(self) -> None:
        for pod in list(self.pods):
            try:
                self.stop_pod(pod, timeout=20)
            except Exception:  # noqa: BLE001 - teardown must go on
                pass
        # containerd-shim processes run in their own sessions; ours name our containerd socket.
        if self.containerd is not None:
            for pid in os.listdir("/proc"):
                try:
                    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if args and b"containerd-shim" in args[0] and self.sock.encode() in args:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for p in (self.containerd, self.holder):
            if p is not None and p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        shutil.rmtree(self.base, ignore_errors=True)
