"""The kernel `nat` tests run in has IPVS and IPv4 nftables NAT; the lab VM has no network device."""

from __future__ import annotations

import os

import pytest

from fabric.lab import vm as labvm

pytestmark = pytest.mark.nat


def test_kernel_has_ipvs_and_ipv4_nft_nat() -> None:
    ok, missing = labvm.capable()
    assert ok, f"missing: {missing}"


def test_lab_vm_has_no_network_device() -> None:
    if not labvm.in_lab_vm():  # decided where the test runs (a skipif mark would be judged outside the VM)
        pytest.skip("about the lab VM; this run is on a capable host kernel")
    # qemu ran with -nic none -nodefaults: every link is virtual (lo, tunl0, ...), none has a device behind it.
    links = os.listdir("/sys/class/net")
    assert "lo" in links
    assert [n for n in links if os.path.exists(f"/sys/class/net/{n}/device")] == []
