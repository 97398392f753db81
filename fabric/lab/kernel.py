"""A kernel that can run the dataplane: the host's own, or user-mode Linux booted on the host's root.

The test machines' kernel lacks ipip, IPVS and dummy links and loads no modules. A node kernel has
all three. `capable()` tells which case we are in; `run()` runs a command in a capable kernel: right
here when the host is capable, else inside a UML kernel (Debian testing's `user-mode-linux`, patched
to use a newer glibc kept beside it; see docs/lab-kernel.md), booted once for the whole command.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# Modules a node kernel needs for the dataplane, loaded inside UML before the command runs.
MODULES = [
    "ipip", "tunnel4", "ip_tunnel", "dummy", "veth", "bridge",
    "ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_wlc", "ip_vs_sh", "ip_vs_mh",
    "ip_vs_sed", "ip_vs_nq", "ip_vs_dh", "ip_vs_lblc", "ip_vs_lblcr", "ip_vs_fo", "ip_vs_ovf",
    "nf_conntrack", "nf_conntrack_netlink", "nf_tables", "nft_chain_nat", "nft_masq", "nft_nat",
    "nft_ct", "nft_fib_inet", "nft_fib_ipv4", "nft_reject_inet", "nf_nat", "tcp_diag", "inet_diag",
    "sch_netem", "xt_ipvs",
    "overlay",  # CNI tests: /etc/cni exists only in an overlay over /etc inside a private mount namespace
]

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FABRIC_LABKERNEL_CACHE", REPO_ROOT / ".cache" / "labkernel"))
SUITE = "forky"
IN_LAB_ENV = "FABRIC_IN_LABKERNEL"


class LabKernelError(RuntimeError):
    """The lab kernel could not be prepared or booted; the message says which step failed."""


@dataclass(frozen=True)
class RunResult:
    returncode: int
    output: str
    timed_out: bool = False


def in_lab_kernel() -> bool:
    return os.environ.get(IN_LAB_ENV) == "1"


def capable() -> tuple[bool, list[str]]:
    """Whether this kernel can create an ipip link, an IPVS service and a dummy link.

    Probed by creating each in a throwaway network namespace (and removing it): /proc/config.gz is
    not always there, and "module exists" is not "module loads". Returns (ok, missing features).
    """
    if os.geteuid() != 0:
        return False, ["root"]
    missing: list[str] = []
    ns = f"fabric-probe-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        return False, ["netns"]
    try:
        def ok(*cmd: str) -> bool:
            return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True).returncode == 0

        if not ok("ip", "link", "add", "probe-ipip", "type", "ipip", "local", "192.0.2.1", "remote", "192.0.2.2"):
            missing.append("ipip")
        if not ok("ip", "link", "add", "probe-dummy", "type", "dummy"):
            missing.append("dummy")
        if not _ipvs_works(ns):
            missing.append("ipvs")
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return not missing, missing


def _ipvs_works(ns: str) -> bool:
    # /proc/net/ip_vs exists in every netns once IPVS is in the kernel (built in or loaded).
    r = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/ip_vs"], capture_output=True)
    return r.returncode == 0


# ---------------------------------------------------------------------------------------------
# Fetching and preparing UML


def _debian_mirror() -> str:
    """The Debian mirror this machine already uses (first `URIs:`/`deb` line naming /debian)."""
    candidates: list[str] = []
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if not f.is_file() or f.suffix not in ("", ".list", ".sources"):
            continue
        for line in f.read_text(errors="replace").splitlines():
            line = line.strip()
            m = re.match(r"URIs:\s*(\S+)", line) or re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line)
            if m:
                candidates.append(m.group(1).rstrip("/"))
    for uri in candidates:
        if uri.endswith("/debian"):
            return uri
    raise LabKernelError("no Debian mirror found in /etc/apt sources (need a line ending in /debian)")


def uml_binary() -> Path:
    return CACHE / "linux.uml"


def prefix() -> Path:
    return CACHE / "root"


def ensure(log=print) -> Path:
    """Fetch and prepare UML into the project cache unless it is already there. Returns the binary."""
    binary = uml_binary()
    if binary.exists() and (prefix() / "lib" / "modules").exists():
        return binary
    for tool in ("patchelf", "dpkg-deb", "apt-get", "modprobe"):
        if shutil.which(tool) is None:
            raise LabKernelError(f"{tool} is missing: apt-get install patchelf kmod")
    CACHE.mkdir(parents=True, exist_ok=True)
    apt = CACHE / "apt"
    (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    sources = apt / "sources.list"
    sources.write_text(f"deb {_debian_mirror()} {SUITE} main\n")
    opts = [
        "-o", f"Dir::Etc::sourcelist={sources}", "-o", "Dir::Etc::sourceparts=-",
        "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", "APT::Get::List-Cleanup=0", "-o", "Debug::NoLocking=1",
    ]
    log(f"lab kernel: fetching user-mode-linux and libc6 from Debian {SUITE}")
    _check(["apt-get", *opts, "update", "-qq"], "apt-get update (private lists)")
    debs = CACHE / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir()
    _check(["apt-get", *opts, "download", "-qq", "user-mode-linux", "libc6"], "apt-get download", cwd=debs)
    root = prefix()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    for deb in sorted(debs.glob("*.deb")):
        _check(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")
    src = root / "usr" / "bin" / "linux.uml"
    if not src.exists():
        raise LabKernelError(f"{src} missing after unpacking user-mode-linux")
    lib = root / "usr" / "lib" / "x86_64-linux-gnu"
    tmp = binary.with_suffix(".tmp")
    shutil.copy2(src, tmp)
    _check(["patchelf", "--set-interpreter", str(lib / "ld-linux-x86-64.so.2"), "--set-rpath", str(lib), str(tmp)],
           "patchelf")
    (root / "lib").mkdir(exist_ok=True)
    link = root / "lib" / "modules"
    if not link.exists():
        link.symlink_to("../usr/lib/uml/modules")
    tmp.rename(binary)
    log(f"lab kernel: ready ({kernel_version()})")
    return binary


def kernel_version() -> str:
    mods = prefix() / "usr" / "lib" / "uml" / "modules"
    versions = sorted(p.name for p in mods.iterdir()) if mods.exists() else []
    return versions[-1] if versions else "unknown"


def _check(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise LabKernelError(f"{what} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")


# ---------------------------------------------------------------------------------------------
# Booting

_INIT = """#!/bin/sh
# init of a bgp-fabric lab kernel (UML or the qemu VM, on the host's root): mount the basics, load
# modules, run one command with its output and exit status in host files, power off.
export PATH={path}
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmpfs /run
mkdir -p /run/netns /run/frr /run/bird /var/run /dev/shm
{extra_setup}
mount -t tmpfs tmpfs /dev/shm 2>/dev/null
mkdir -p /run/pts && mount -t devpts -o newinstance,ptmxmode=0666 devpts /run/pts 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null
chown frr:frr /run/frr 2>/dev/null
ip link set lo up
hostname {hostname}
for m in {modules}; do modprobe -d {prefix} $m 2>/dev/null; done
cd {cwd}
{env}
( {command} ) > {out} 2>&1 < /dev/null
echo $? > {rc}
sync
poweroff -f
"""

# Environment passed from the host into the lab kernel (the rest is the host session's own).
_KEEP_ENV = ("FABRIC_", "PYTEST", "HYPOTHESIS", "CI", "VIRTUAL_ENV", "PYTHON", "HOME", "LANG", "LC_")


def write_init(work: Path, command: list[str], cwd: str, *, modules: list[str], module_prefix: Path,
               hostname: str, markers: dict[str, str], extra_setup: str = "") -> Path:
    """The init script both lab kernels boot with; output goes to work/out, the status to work/rc."""
    keep = {k: v for k, v in os.environ.items() if k.startswith(_KEEP_ENV) and k != "PYTEST_CURRENT_TEST"}
    keep.update(markers)
    (work / "out").touch()
    init = work / "init.sh"
    init.write_text(_INIT.format(
        path=shlex.quote(os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin") + ":/usr/sbin:/sbin"),
        extra_setup=extra_setup, hostname=hostname, modules=" ".join(dict.fromkeys(modules)),
        prefix=shlex.quote(str(module_prefix)), cwd=shlex.quote(cwd),
        env="\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(keep.items())),
        command=shlex.join(command), out=shlex.quote(str(work / "out")), rc=shlex.quote(str(work / "rc")),
    ))
    init.chmod(0o755)
    return init


def run(command: list[str], *, timeout: float = 1800, mem: str = "2G", stream: bool = True,
        cwd: str | None = None, log=print, console_fd: int | None = None, tee: list[str] | None = None) -> RunResult:
    """Run `command` in a capable kernel and return its status and output.

    On a capable host it just runs. Otherwise UML boots with the host's root as its root (so the
    venv and every tool are there), runs the command once and powers off. Output is streamed to our
    stdout while it runs when `stream` is set. On timeout the whole UML process group is killed.
    fabric.lab.vm.run() is the same for the qemu VM (a kernel that also has IPv4 nftables NAT).
    `console_fd` (a socket) becomes the lab kernel's serial line ssl0, named to the command by
    FABRIC_LAB_CONSOLE=ssl0 (`fabric lab exec` from the host; fabric.lab.relay). `tee` collects the
    output as it streams (what the command said before a Ctrl-C killed the kernel).
    """
    cwd = cwd or os.getcwd()
    if in_lab_kernel() or capable()[0]:
        return _run_here(command, timeout=timeout, stream=stream, cwd=cwd)
    binary = ensure(log=log)
    work = Path(tempfile.mkdtemp(prefix="fabric-uml-"))
    try:
        markers = {IN_LAB_ENV: "1"}
        if console_fd is not None:
            markers["FABRIC_LAB_CONSOLE"] = "ssl0"
        init = write_init(work, command, cwd, modules=MODULES, module_prefix=prefix(), hostname="fabric-lab",
                          markers=markers)
        args = [str(binary), f"mem={mem}", "seccomp=on", "rootfstype=hostfs", "rootflags=/", "rw",
                f"init={init}", "con=null", "con0=null,fd:2", "ssl=null", "quiet"]
        if console_fd is not None:
            args.insert(-1, f"ssl0=fd:{console_fd},fd:{console_fd}")
        env = dict(os.environ, TMPDIR=str(work))
        return boot_and_collect(args, work, timeout=timeout, stream=stream, label="lab kernel", env=env,
                                pass_fds=() if console_fd is None else (console_fd,), tee=tee)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def boot_and_collect(args: list[str], work: Path, *, timeout: float, stream: bool, label: str,
                     env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = (),
                     tee: list[str] | None = None) -> RunResult:
    """Boot a lab kernel (UML or the qemu VM) whose init runs one command with its output in
    `work/out` and its exit status in `work/rc` (both on the host's file system), stream that output
    while it runs, and kill the whole process group on timeout or Ctrl-C."""
    out, rc = work / "out", work / "rc"
    kernel_log = open(work / "kernel.log", "wb")
    if shutil.which("setpriv"):  # the kernel (and the lab in it) dies with us, even when we are SIGKILLed
        args = ["setpriv", "--pdeathsig", "KILL", *args]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=kernel_log, stderr=kernel_log,
                            env=env, start_new_session=True, pass_fds=pass_fds)
    stop = threading.Event()
    tail = threading.Thread(target=_tail, args=(out, stop, stream, tee), daemon=True)
    tail.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    except KeyboardInterrupt:
        _kill_group(proc)
        raise
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        stop.set()
        tail.join(timeout=5)
        kernel_log.close()
    output = out.read_text(errors="replace")
    if timed_out:
        return RunResult(124, output + f"\n[{label}: timed out after {timeout:.0f}s, killed]\n", True)
    if not rc.exists():
        klog = (work / "kernel.log").read_text(errors="replace")[-2000:]
        return RunResult(125, output + f"\n[{label}: exited without a status; console/kernel log tail:]\n{klog}")
    return RunResult(int(rc.read_text().strip() or 125), output)


def _run_here(command: list[str], *, timeout: float, stream: bool, cwd: str) -> RunResult:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, cwd=cwd, start_new_session=True)
    chunks: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            chunks.append(line)
            if stream:
                sys.stdout.write(line)
                sys.stdout.flush()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        t.join(timeout=5)
        return RunResult(124, "".join(chunks), True)
    t.join(timeout=5)
    return RunResult(proc.returncode, "".join(chunks))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, stop: threading.Event, stream: bool, tee: list[str] | None = None) -> None:
    """Copy what the command inside writes to our stdout as it comes (the file lives on hostfs)."""
    with open(path, "r", errors="replace") as f:
        while True:
            chunk = f.read()
            if chunk and tee is not None:
                tee.append(chunk)
            if chunk and stream:
                sys.stdout.write(chunk)
                sys.stdout.flush()
            if stop.is_set() and not chunk:
                return
            if not chunk:
                time.sleep(0.2)  # progress display only; not on any route's path
