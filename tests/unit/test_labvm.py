"""fabric.lab.vm's pure parts: the initramfs archive, module load order, the accel choice."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fabric.lab import vm as labvm
from fabric.lab.kernel import LabKernelError


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """A minimal newc reader, independent of the writer: name -> (mode, content)."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = data[pos:pos + namesize - 1].decode()
        pos = (pos + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data[pos:pos + size])
        pos = (pos + size + 3) & ~3


def test_cpio_round_trip() -> None:
    files = [("bin", stat.S_IFDIR | 0o755, b""), ("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
             ("init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho odd-length\n")]
    got = _read_newc(labvm._cpio_newc(files))
    assert got == {name: (mode, data) for name, mode, data in files}
    assert len(labvm._cpio_newc(files)) % 4 == 0


def _moddir(tmp_path: Path) -> Path:
    d = tmp_path / "6.1.0-test"
    d.mkdir()
    (d / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko\n"
        "kernel/net/9p/9pnet.ko:\nkernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko\nkernel/fs/netfs/netfs.ko:\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n")
    (d / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    return d


def test_module_order_puts_dependencies_first_once(tmp_path: Path) -> None:
    order = labvm._module_order(_moddir(tmp_path), ["9pnet_virtio", "9p", "virtio_pci"])
    assert len(order) == len(set(order))
    for mod, deps in (("9p.ko", ["9pnet.ko", "fscache.ko", "netfs.ko"]), ("fscache.ko", ["netfs.ko"]),
                      ("9pnet_virtio.ko", ["9pnet.ko", "virtio_ring.ko"])):
        at = [Path(p).name for p in order].index(mod)
        assert all([Path(p).name for p in order].index(d) < at for d in deps), order
    assert not any("virtio_pci" in p for p in order)  # built in: nothing to load


def test_module_order_names_a_missing_module(tmp_path: Path) -> None:
    with pytest.raises(LabKernelError, match="no module nosuch"):
        labvm._module_order(_moddir(tmp_path), ["nosuch"])


def test_accel_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIC_LABVM_ACCEL", "tcg")
    assert labvm.accel() == "tcg"
    monkeypatch.setenv("FABRIC_LABVM_ACCEL", "")
    assert labvm.accel() in ("kvm", "tcg")
