"""The lab kernel (or a node kernel) really has what the dataplane needs, read back over netlink."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from pyroute2 import IPVS, IPRoute, IPVSDest, IPVSService, NetNS

pytestmark = pytest.mark.kernel


@pytest.fixture
def netns():
    name = f"t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_ipip_link_created_and_read_back(netns: str) -> None:
    with NetNS(netns) as ipr:
        ipr.link("add", ifname="tunl-test", kind="ipip", ipip_local="192.0.2.1", ipip_remote="192.0.2.2")
        (link,) = ipr.link("get", ifname="tunl-test")
        info = link.get("IFLA_LINKINFO")
        assert info.get("IFLA_INFO_KIND") == "ipip"
        data = info.get("IFLA_INFO_DATA")
        assert data.get("IFLA_IPIP_REMOTE") == "192.0.2.2"
        assert link.get("IFLA_MTU") == 1480


def test_dummy_link_holds_an_address(netns: str) -> None:
    with NetNS(netns) as ipr:
        ipr.link("add", ifname="fabric-svc", kind="dummy")
        idx = ipr.link_lookup(ifname="fabric-svc")[0]
        ipr.addr("add", index=idx, address="10.96.0.10", prefixlen=32)
        addrs = [a.get("IFA_ADDRESS") for a in ipr.addr("dump", index=idx)]
        assert "10.96.0.10" in addrs
        (link,) = ipr.link("get", index=idx)
        assert link.get("IFLA_LINKINFO").get("IFLA_INFO_KIND") == "dummy"


def test_ipvs_virtual_server_with_nat_destination(netns: str) -> None:
    # IPVS is per namespace; run this check inside the test's namespace via `ip netns exec`.
    code = (
        "from pyroute2 import IPVS, IPVSService, IPVSDest\n"
        "ipvs = IPVS()\n"
        "svc = IPVSService(addr='10.96.0.1', port=443, protocol=6, sched_name='rr')\n"
        "ipvs.service('add', service=svc)\n"
        "ipvs.dest('add', service=svc, dest=IPVSDest(addr='10.0.1.5', port=6443, fwd_method=0, weight=1))\n"
        "(s,) = [m.get('IPVS_CMD_ATTR_SERVICE') for m in ipvs.service('dump')]\n"
        "print(s.get('IPVS_SVC_ATTR_SCHED_NAME'), s.get('IPVS_SVC_ATTR_PORT'))\n"
        "(d,) = [m.get('IPVS_CMD_ATTR_DEST') for m in ipvs.dest('dump', service=svc)]\n"
        "print(d.get('IPVS_DEST_ATTR_ADDR'), d.get('IPVS_DEST_ATTR_PORT'), d.get('IPVS_DEST_ATTR_FWD_METHOD') & 7)\n"
    )
    import sys
    r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["rr", "443", "10.0.1.5", "6443", "0"]
    shown = subprocess.run(["ip", "netns", "exec", netns, "ipvsadm", "-Ln"], capture_output=True, text=True).stdout
    assert "Masq" in shown and "10.0.1.5:6443" in shown
