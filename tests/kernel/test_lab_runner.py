"""`fabric lab run` for real in the lab kernel: the default lab passes twice in a row, a failing check fails
the run, SIGTERM tears down — and every time no namespace, process, veth, FRR state or temp dir is left."""

from __future__ import annotations

import html
import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fabric.lab import runner

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
DEFAULT_LAB = REPO / "labs" / "two-racks.clab.yml"


def snapshot() -> dict[str, set[str]]:
    """What a lab could leave behind: namespaces, root-namespace veths, FRR state, lab dirs, daemons."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    veths = subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True).stdout
    procs = subprocess.run(["pgrep", "-a", "-f", r"/usr/lib/frr/|fabric.cli agent|socket.SO_REUSEADDR"],
                           capture_output=True, text=True).stdout
    return {
        "netns": {line.split()[0] for line in ns.splitlines() if line.strip()},
        "veth": {line.split(":")[1].strip() for line in veths.splitlines() if line.strip()},
        "frr-state": {p.name for p in Path("/run/frr").glob("*")} if Path("/run/frr").exists() else set(),
        "lab-dirs": {str(p) for base in ("/run", "/tmp") for p in Path(base).glob("fabric-lab-*")},
        "procs": {line for line in procs.splitlines() if "pgrep" not in line},
    }


def assert_nothing_left(before: dict[str, set[str]]) -> None:
    after = snapshot()
    for key, items in after.items():
        assert items <= before[key], f"left behind ({key}): {sorted(items - before[key])}"


def test_default_lab_passes_twice_in_a_row_and_leaves_nothing(tmp_path: Path) -> None:
    """First run: the default checks (routes, commands, three faults) and the picture; second run: the same lab
    again with a short checks file (the point is that nothing of the first run is in the way)."""
    before = snapshot()
    again = tmp_path / "again.checks.yml"
    again.write_text(yaml.safe_dump({"timeout": 90, "pings": [{"from": "pod-a1", "to": "pod-b1"}]}))
    for attempt, checks_path in ((1, None), (2, again)):
        out = io.StringIO()
        reports = tmp_path / f"report-{attempt}"
        rc = runner.run(DEFAULT_LAB, timeout=300, out=out, checks_path=checks_path, report_dir=reports)
        text = out.getvalue()
        assert rc == 0, f"run {attempt} failed:\n{text}"
        assert "verdict: PASS" in text
        # every session of every FRR node, as FRR's JSON reported it
        assert text.count(" established ") >= 8
        for node in ("tor", "node-a1", "node-a2", "node-b1", "node-b2"):
            assert re.search(rf"bgp {node}: every session Established +pass", text), node
        assert "ping pod-a1 -> pod-b1" in text
        # pods got their network through the CNI path: the first address of their node's pod CIDR
        for pod, ip in (("pod-a1", "10.244.1.1"), ("pod-a2", "10.244.2.1"), ("pod-b1", "10.244.3.1"),
                        ("pod-b2", "10.244.4.1")):
            assert re.search(rf"{pod}: {re.escape(ip)} from node-{pod[4:]}'s CNI plugin", text), (pod, text)
        assert "teardown: done" in text
        assert (reports / "report.txt").read_text() in text
        svg = html.unescape((reports / "topology.svg").read_text())
        assert f"picture: {reports / 'topology.svg'}" in text
        assert all(f">{n}</text>" in svg for n in ("tor", "node-a1", "pod-b2", "client")), svg[:400]
        if attempt == 1:
            assert "ping pod-b1 -> pod-a1" in text
            assert re.search(r"route node-a1: 10\.244\.3\.0/24 via 10\.0\.2\.11 kind ipip +pass .*\(ipip, proto 80\)",
                             text), text
            # node-a1's /metrics, scraped and parsed during the lab, against the lab's sessions, routes, services
            for m in (r"bgp_fabric_bgp_peer_up == 4", r"bgp_fabric_routes_programmed\{kind=ipip\} == 2",
                      r"bgp_fabric_routes_programmed\{kind=direct\} == 2", r"bgp_fabric_ipvs_services == 3",
                      r"bgp_fabric_ipvs_destinations == 4"):
                assert re.search(rf"metric node-a1: {m} +pass", text), (m, text)
            # three faults, each with its probe's loss and the time to converge
            rows = [ln for ln in text.split("faults (")[1].splitlines() if ln.strip().endswith(("pass", "FAIL"))]
            assert len(rows) == 3 and all(ln.endswith("pass") for ln in rows), text
            kill = rows[0].split()
            assert kill[:5] == ["kill", "-9", "agent", "on", "node-b1"] and kill[10].startswith("0/"), rows[0]
            assert re.search(r"link rack-a:eth3 down 2s .* [1-9]\d*/\d+ +\d+ ms", rows[1]), rows[1]  # it did cut
            # sessions coloured by state, IPIP pairs dashed, direct pairs solid
            assert svg.count('stroke="#2e9e44"') >= 10 and 'stroke-dasharray="5,2"' in svg
        assert_nothing_left(before)


def small_lab(tmp_path: Path, checks: dict, frr_peer: bool = False) -> Path:
    """Two hosts on one link (10.9.0.0/24); optionally an FRR node whose only peer never answers."""
    nodes: dict = {
        "h1": {"kind": "linux", "image": "alpine", "exec": ["ip addr add 10.9.0.1/24 dev eth1"]},
        "h2": {"kind": "linux", "image": "alpine", "exec": ["ip addr add 10.9.0.2/24 dev eth1"]},
    }
    links = [{"endpoints": ["h1:eth1", "h2:eth1"]}]
    if frr_peer:
        (tmp_path / "frr.conf").write_text(
            "router bgp 64512\n neighbor 10.9.1.2 remote-as 64513\n neighbor 10.9.1.2 timers connect 1\n")
        nodes["r"] = {"image": "quay.io/frrouting/frr:10.2.1", "binds": ["frr.conf:/etc/frr/frr.conf"],
                      "exec": ["ip addr add 10.9.1.1/24 dev eth1"]}
        links.append({"endpoints": ["r:eth1", "h2:eth2"]})
    (tmp_path / "small.clab.yml").write_text(yaml.safe_dump({"name": "small", "topology": {"nodes": nodes,
                                                                                           "links": links}}))
    (tmp_path / "small.checks.yml").write_text(yaml.safe_dump(checks))
    return tmp_path / "small.clab.yml"


def test_a_failing_check_fails_the_run_and_still_cleans_up(tmp_path: Path) -> None:
    lab = small_lab(tmp_path, {"pings": [{"from": "h1", "to": "10.9.0.2"},
                                         {"from": "h1", "to": "10.9.0.99", "timeout": 2}]})
    before = snapshot()
    out = io.StringIO()
    rc = runner.run(lab, timeout=60, out=out, report_dir=tmp_path / "report")
    text = out.getvalue()
    assert rc == 1, text
    assert "ping h1 -> 10.9.0.2 " in text and "ping h1 -> 10.9.0.99" in text
    lines = {line.split("  ")[1].strip(): line for line in text.splitlines() if line.startswith("  ping")}
    assert " pass " in lines["ping h1 -> 10.9.0.2"] and " FAIL " in lines["ping h1 -> 10.9.0.99"]
    assert "verdict: FAIL (1/2 checks passed)" in text
    assert_nothing_left(before)


def test_a_failing_exec_command_fails_the_build_and_cleans_up(tmp_path: Path) -> None:
    lab = small_lab(tmp_path, {})
    data = yaml.safe_load(lab.read_text())
    data["topology"]["nodes"]["h2"]["exec"].append("ip route add 10.99.0.0/16 via 10.8.8.8")
    lab.write_text(yaml.safe_dump(data))
    before = snapshot()
    out = io.StringIO()
    assert runner.run(lab, timeout=60, out=out, report_dir=tmp_path / "report") == 1
    assert "build failed: h2: exec[1] 'ip route add 10.99.0.0/16 via 10.8.8.8' exited" in out.getvalue()
    assert_nothing_left(before)


def test_sigterm_while_waiting_tears_everything_down(tmp_path: Path) -> None:
    lab = small_lab(tmp_path, {"timeout": 120}, frr_peer=True)
    before = snapshot()
    proc = subprocess.Popen([sys.executable, "-m", "fabric.cli", "lab", "run", str(lab),
                             "--report-dir", str(tmp_path / "report")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "waiting up to" in line:
                # the FRR daemons are up now; the lab waits for a session that never comes
                assert any("frr: configuration loaded" in ln for ln in lines)
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "interrupted (SIGTERM); tearing down" in text and "teardown: done" in text
    assert_nothing_left(before)


def agent_lab(tmp_path: Path) -> Path:
    """Two bgp-fabric agent nodes on one link (10.0.1.0/24), a pod on each created through its CNI plugin."""
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({
        "nodes": [{"name": f"n{i}", "address": f"10.0.1.1{i}", "podCIDRs": [f"10.244.{i}.0/24"]} for i in (1, 2)],
        "ipPools": [{"metadata": {"name": "default"}, "spec": {"cidr": "10.244.0.0/16", "ipipMode": "CrossSubnet"}}],
    }))
    nodes: dict = {}
    for i in (1, 2):
        (tmp_path / f"n{i}").mkdir()
        (tmp_path / f"n{i}" / "config.yaml").write_text(yaml.safe_dump({
            "node": {"name": f"n{i}", "address": f"10.0.1.1{i}/24", "podCIDRs": [f"10.244.{i}.0/24"]},
            "pools": [{"cidr": "10.244.0.0/16", "ipipMode": "CrossSubnet"}],
            "timers": {"holdTime": 9}, "services": {"enabled": False},
            "source": {"kind": "file", "path": "../cluster.yaml"}, "paths": {"runDir": "run"},
            "cni": {"enabled": True, "confDir": "run/net.d", "stateDir": "run/ipam", "socket": "run/cni.sock"}}))
        nodes[f"n{i}"] = {"image": "bgp-fabric:dev", "binds": [f"n{i}/config.yaml:/etc/bgp-fabric/config.yaml"],
                          "exec": [f"ip addr add 10.0.1.1{i}/24 dev eth1", "sysctl -w net.ipv4.ip_forward=1"]}
        nodes[f"p{i}"] = {"image": "alpine", "labels": {"bgp-fabric.io/node": f"n{i}"},
                          "exec": ["ip -o addr show dev eth0"]}  # pod commands run after the CNI ADD
    links = [{"endpoints": ["n1:eth1", "n2:eth1"]}]
    (tmp_path / "agents.clab.yml").write_text(yaml.safe_dump({"name": "ag", "topology": {"nodes": nodes,
                                                                                         "links": links}}))
    probe = {"rate": 50}
    (tmp_path / "agents.checks.yml").write_text(yaml.safe_dump({
        "pings": [{"from": "p1", "to": "p2"}, {"from": "p2", "to": "10.244.1.1"}],
        "routes": [{"node": "n1", "prefix": "10.244.2.0/24", "via": "10.0.1.12", "kind": "direct"},
                   {"node": "n2", "prefix": "10.244.2.0/24", "kind": "blackhole"}],
        # graceful restart both ways: neither fault may lose a packet (nor may the pods: their veths,
        # addresses and host routes don't depend on the agent running)
        "faults": [{"kill": {"node": "n2", "process": "exabgp"},
                    "probe": dict(probe, **{"from": "p1", "to": "p2"}), "maxLoss": 0},
                   {"restart": {"node": "n1"}, "probe": dict(probe, **{"from": "p2", "to": "p1"}),
                    "maxLoss": 0}]}))
    return tmp_path / "agents.clab.yml"


def test_agent_nodes_run_report_their_status_and_clean_up(tmp_path: Path) -> None:
    lab = agent_lab(tmp_path)
    before = snapshot()
    out = io.StringIO()
    rc = runner.run(lab, timeout=120, out=out, report_dir=tmp_path / "report")
    text = out.getvalue()
    assert rc == 0, text
    assert re.search(r"bgp n1: every session Established +pass +\S+ +1/1 established", text), text
    assert re.search(r"n2 +10\.0\.1\.11 +n1 +64512 +established", text), text  # from n2's status.json
    assert "p1: 10.244.1.1 from n1's CNI plugin" in text and "ping p1 -> p2" in text, text
    assert re.search(r"route n1: 10\.244\.2\.0/24 via 10\.0\.1\.12 kind direct +pass", text), text
    assert re.search(r"kill -9 exabgp on n2 +p1 -> p2 @ 50/s +0/\d+ +0 .* pass", text), text
    assert re.search(r"restart n1 +p2 -> p1 @ 50/s +0/\d+ +0 .* pass", text), text
    assert not (tmp_path / "n1" / "run").exists() and not (tmp_path / "n2" / "run").exists()
    assert_nothing_left(before)


def test_keep_holds_the_lab_until_ctrl_c_and_keeps_the_verdict(tmp_path: Path) -> None:
    lab = small_lab(tmp_path, {"pings": [{"from": "h1", "to": "10.9.0.2"}]})
    before = snapshot()
    proc = subprocess.Popen([sys.executable, "-m", "fabric.cli", "lab", "run", str(lab), "--keep",
                             "--report-dir", str(tmp_path / "report")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "--keep: lab is up" in line:
                up = snapshot()["netns"] - before["netns"]
                assert len(up) == 2 and all(ns.startswith("small-") for ns in up), up
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    assert "verdict: PASS" in text and "interrupted (SIGINT); tearing down" in text, text
    assert proc.returncode == 0, text
    assert_nothing_left(before)
