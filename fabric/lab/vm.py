"""A second lab kernel: Debian's own kernel in a qemu VM (KVM, else TCG) booted on the host's root.

User-mode Linux (fabric.lab.kernel) has IPVS, ipip and dummy but no IPv4 nftables families and no
IPv4 NAT, so NodePort masquerade, hairpin and loadBalancerSourceRanges can't be shown there. Debian's
`linux-image-amd64` has everything as modules. `run()` boots it once for one command:

- the kernel package and `busybox-static` are fetched with the system's apt setup (`apt-get download`)
  and unpacked into `.cache/labvm/` once; a tiny initramfs (busybox + the 9p/virtio modules + /init)
  is built there too;
- /init mounts the host's root file system over virtio-9p read-write and switch_roots into it, so the
  project's venv and every installed tool are there, then our init script (on the host FS) loads the
  dataplane modules, runs the command with its output in a host file, writes the exit code and
  powers off;
- the VM has no network device at all (`-nic none`): nothing inside can reach any network.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from fabric.lab.kernel import IN_LAB_ENV, MODULES, REPO_ROOT, LabKernelError, RunResult, in_lab_kernel
from fabric.lab import kernel as labkernel

CACHE = Path(os.environ.get("FABRIC_LABVM_CACHE", REPO_ROOT / ".cache" / "labvm"))
IN_VM_ENV = "FABRIC_IN_LABVM"
QEMU = "qemu-system-x86_64"
# Modules /init needs before the host root can be mounted (load order is resolved from modules.dep).
BOOT_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "virtio_console"]
# 9p mount options: cache=loose keeps dentries/pages in the guest (python imports and exec of the
# same binaries are then close to local speed); a large msize cuts the number of round trips.
NINEP_OPTS = "trans=virtio,version=9p2000.L,msize=512000,cache=loose"
# Extra modules over labkernel.MODULES: IPv4/inet nftables NAT and the bits nft rules of ours use.
VM_MODULES = ["nf_nat", "nft_chain_nat", "nft_masq", "nft_nat", "nft_ct", "nft_reject", "nft_reject_inet",
              "nft_fib", "nft_fib_inet", "nft_fib_ipv4", "nf_conntrack", "nf_conntrack_netlink", "ip_vs_ftp",
              "xt_ipvs", "af_packet", "tun"]


# Temp files live in the VM's own tmpfs: qemu's 9p server truncates by path, so a temp file that was
# unlinked while open (pytest's output capture does that) fails with ENOENT once it has content.
VM_SETUP = "mkdir -p /dev/pts /run/tmp\nmount -t devpts devpts /dev/pts 2>/dev/null\nexport TMPDIR=/run/tmp"


def in_lab_vm() -> bool:
    return os.environ.get(IN_VM_ENV) == "1"


# ---------------------------------------------------------------------------------------------
# What this kernel can do, and what can run a VM


def capable() -> tuple[bool, list[str]]:
    """Whether this kernel can run the `nat` tests itself: ipip/IPVS/dummy plus IPv4 nftables NAT.

    Returns (ok, missing features). Probed in a throwaway namespace like labkernel.capable().
    """
    ok, missing = labkernel.capable()
    if missing == ["root"] or "netns" in missing:
        return False, missing
    if not _nft_nat_works():
        missing.append("nftables-ipv4-nat")
    return not missing, missing


def _nft_nat_works() -> bool:
    if shutil.which("nft") is None:
        return False
    ns = f"fabric-natprobe-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode != 0:
        return False
    try:
        rules = ("table inet fabric-probe {\n chain p { type nat hook postrouting priority srcnat; "
                 "ip daddr 192.0.2.1 masquerade\n }\n}\n")
        r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, capture_output=True, text=True)
        return r.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def accel() -> str:
    """"kvm" when KVM can run an ordinary kernel here, else "tcg" (qemu's emulator: slower, works anywhere).

    FABRIC_LABVM_ACCEL=kvm|tcg overrides. KVM needs /dev/kvm that creates a VM *and* hardware
    virtualisation (vmx/svm): some nested hosts offer /dev/kvm through PVM (`kvm_pvm`, page-table based,
    no vmx), which only runs kernels built as PVM guests; Debian's kernel hangs in it at boot.
    """
    forced = os.environ.get("FABRIC_LABVM_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced
    try:
        flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        flags = None
    if not flags or not {"vmx", "svm"} & set(flags.group(1).split()):
        return "tcg"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return "tcg"
    try:
        if fcntl.ioctl(fd, 0xAE00) != 12:  # KVM_GET_API_VERSION
            return "tcg"
        os.close(fcntl.ioctl(fd, 0xAE01, 0))  # KVM_CREATE_VM
        return "kvm"
    except OSError:
        return "tcg"
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Fetching the kernel and building the initramfs


def root() -> Path:
    """Where the kernel package is unpacked (`lib/modules/<version>`, `boot/vmlinuz-<version>`)."""
    return CACHE / "root"


def kernel_version() -> str:
    mods = root() / "lib" / "modules"
    versions = sorted(p.name for p in mods.iterdir()) if mods.exists() else []
    return versions[-1] if versions else "unknown"


def kernel_image() -> Path:
    return root() / "boot" / f"vmlinuz-{kernel_version()}"


def initrd() -> Path:
    return CACHE / "initrd.cpio"


def ready() -> bool:
    v = kernel_version()
    return (v != "unknown" and kernel_image().exists() and initrd().exists()
            and (root() / "lib" / "modules" / v / "modules.dep").exists())


def ensure(log=print) -> tuple[Path, Path]:
    """Fetch the kernel and build the initramfs unless already cached. Returns (kernel, initrd)."""
    if ready():
        return kernel_image(), initrd()
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "depmod"):
        if shutil.which(tool) is None:
            raise LabKernelError(f"{tool} is missing (apt-get install kmod)")
    CACHE.mkdir(parents=True, exist_ok=True)
    debs = CACHE / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir()
    image = _kernel_package()
    log(f"lab VM: fetching {image} and busybox-static with apt-get download")
    _check(["apt-get", "download", "-qq", image, "busybox-static"], "apt-get download (run apt-get update?)", cwd=debs)
    tmp_root = CACHE / "root.tmp"
    shutil.rmtree(tmp_root, ignore_errors=True)
    tmp_root.mkdir()
    for deb in sorted(debs.glob("*.deb")):
        _check(["dpkg-deb", "-x", str(deb), str(tmp_root)], f"dpkg-deb -x {deb.name}")
    versions = sorted(p.name for p in (tmp_root / "lib" / "modules").iterdir())
    if not versions:
        raise LabKernelError(f"{image} has no lib/modules")
    _check(["depmod", "-b", str(tmp_root), versions[-1]], "depmod")
    shutil.rmtree(root(), ignore_errors=True)
    tmp_root.rename(root())
    shutil.rmtree(debs, ignore_errors=True)
    _build_initrd(log)
    log(f"lab VM: ready (kernel {kernel_version()})")
    return kernel_image(), initrd()


def _kernel_package() -> str:
    """The versioned image package linux-image-amd64 depends on (e.g. linux-image-6.1.0-56-amd64)."""
    r = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True)
    m = re.search(r"Depends:\s*(linux-image-\S+-amd64)", r.stdout)
    if not m:
        raise LabKernelError("apt-cache knows no linux-image-amd64 (run apt-get update)")
    return m.group(1)


def _check(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise LabKernelError(f"{what} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")


def _module_order(moddir: Path, wanted: list[str]) -> list[str]:
    """Module files (relative to moddir) to insmod, dependencies first, each once."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.split(".ko")[0]
        by_name[name] = by_name[name.replace("-", "_")] = path
    builtin = {Path(x).name.split(".ko")[0].replace("-", "_")
               for x in (moddir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in reversed(deps.get(path, [])):  # modules.dep lists the deepest dependency last
            visit(d)
        order.append(path)

    for name in wanted:
        if name.replace("-", "_") in builtin:
            continue
        if name not in by_name:
            raise LabKernelError(f"kernel {moddir.name} has no module {name}")
        visit(by_name[name])
    return order


_RAMFS_INIT = """#!/bin/busybox sh
# initramfs of the bgp-fabric lab VM: load virtio + 9p, mount the host's root, hand over to our init.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs dev /dev
for m in $(cat /modules.list); do insmod /$m || echo "labvm: insmod $m failed"; done
init=$(sed -n 's/.*fabric_init=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
mount -t 9p -o {opts} hostroot /newroot || {{ echo "labvm: mounting the host root failed"; poweroff -f; }}
mount --move /dev /newroot/dev
umount /proc
exec switch_root /newroot "$init"
"""


def _build_initrd(log=print) -> None:
    v = kernel_version()
    moddir = root() / "lib" / "modules" / v
    busybox = root() / "bin" / "busybox"
    if not busybox.exists():
        raise LabKernelError(f"{busybox} missing after unpacking busybox-static")
    mods = _module_order(moddir, BOOT_MODULES)
    files: list[tuple[str, int, bytes]] = []  # (path, mode, content); directories have empty content
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        files.append((d, stat.S_IFDIR | 0o755, b""))
    files.append(("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    files.append(("bin/sh", stat.S_IFLNK | 0o777, b"busybox"))
    listed: list[str] = []
    for m in mods:
        dest = f"lib/modules/{Path(m).name}"
        files.append((dest, stat.S_IFREG | 0o644, (moddir / m).read_bytes()))
        listed.append(dest)
    files.append(("modules.list", stat.S_IFREG | 0o644, ("\n".join(listed) + "\n").encode()))
    files.append(("init", stat.S_IFREG | 0o755, _RAMFS_INIT.format(opts=NINEP_OPTS).encode()))
    tmp = initrd().with_suffix(".tmp")
    tmp.write_bytes(_cpio_newc(files))
    tmp.rename(initrd())


def _cpio_newc(files: list[tuple[str, int, bytes]]) -> bytes:
    """A `newc` cpio archive (what the kernel unpacks as initramfs), uncompressed."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate([*files, ("TRAILER!!!", 0, b"")], start=1):
        nb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
        out.extend(b"070701" + "".join(f"{f:08X}" for f in fields).encode())
        out.extend(nb)
        pad()
        out.extend(data)
        pad()
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Booting


def run(command: list[str], *, timeout: float = 1800, mem: str = "2G", cpus: int = 2, stream: bool = True,
        cwd: str | None = None, log=print) -> RunResult:
    """Run `command` in a kernel that can do IPVS and IPv4 nftables NAT; return its status and output.

    Runs right here when this kernel can (or we are inside a lab kernel already). Otherwise boots
    the VM once (KVM when usable, else TCG; `last_accel` says which), with the host's root as its
    root and no network device. Output is streamed while it runs when `stream` is set. On timeout
    qemu is killed.
    """
    global last_accel
    cwd = cwd or os.getcwd()
    if in_lab_kernel() or capable()[0]:
        last_accel = "host"
        return labkernel._run_here(command, timeout=timeout, stream=stream, cwd=cwd)
    if shutil.which(QEMU) is None:
        raise LabKernelError(f"{QEMU} is missing: apt-get install qemu-system-x86")
    kernel, ramfs = ensure(log=log)
    how = accel()
    last_accel = how
    work = Path(tempfile.mkdtemp(prefix="fabric-vm-"))
    try:
        init = labkernel.write_init(work, command, cwd, modules=[*MODULES, *VM_MODULES], module_prefix=root(),
                                    hostname="fabric-labvm", markers={IN_LAB_ENV: "1", IN_VM_ENV: "1"},
                                    extra_setup=VM_SETUP)
        args = [QEMU, *(["-enable-kvm", "-cpu", "host"] if how == "kvm" else ["-accel", "tcg", "-cpu", "max"]),
                "-m", mem, "-smp", str(cpus), "-nographic", "-no-reboot", "-nic", "none", "-nodefaults",
                "-serial", "stdio", "-monitor", "none",
                "-kernel", str(kernel), "-initrd", str(ramfs),
                "-fsdev", "local,id=hostroot,path=/,security_model=passthrough,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
                "-append", f"console=ttyS0 quiet panic=-1 fabric_init={init}"]
        return labkernel.boot_and_collect(args, work, timeout=timeout, stream=stream, label=f"lab VM ({how})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


last_accel: str | None = None  # how the last run() ran: "kvm", "tcg" or "host"
