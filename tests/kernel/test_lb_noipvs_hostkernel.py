"""Finding 11's last point, end to end: the agent on a kernel without IPVS (this host's) says so in one
line and keeps retrying with backoff; no traceback. Runs here, NOT marked `kernel`: the agent runs in a
network namespace this test creates (never in the host's own), with a file source and ipipMode Never
(this kernel has no ipip either). Skipped without root, or where the kernel has IPVS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or os.path.exists("/proc/net/ip_vs")
                                or os.path.exists("/sys/module/ip_vs"), reason="needs root and a kernel without IPVS")

CLUSTER = """nodes: [{name: n1, address: 10.0.1.11, podCIDRs: [10.244.1.0/24]}]
services:
- metadata: {name: web, namespace: default}
  spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, protocol: TCP}]}
endpointSlices:
- metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
  addressType: IPv4
  ports: [{name: http, port: 8080, protocol: TCP}]
  endpoints: [{addresses: [10.244.1.5], nodeName: n1}]
"""


def test_agent_without_ipvs_says_so_once_and_retries(tmp_path: Path) -> None:
    ns = f"lbnoipvs-{uuid.uuid4().hex[:6]}"
    (tmp_path / "cluster.yaml").write_text(CLUSTER)
    run = tmp_path / "run"
    (tmp_path / "agent.yaml").write_text(
        "node: {name: n1, address: 10.0.1.11/24, podCIDRs: [10.244.1.0/24]}\n"
        "pools: [{cidr: 10.244.0.0/16, ipipMode: Never}]\n"
        f"source: {{kind: file, path: {tmp_path / 'cluster.yaml'}}}\n"
        f"paths: {{runDir: {run}}}\nhealth: {{listen: null}}\n")
    for cmd in (["ip", "netns", "add", ns], ["ip", "-n", ns, "link", "set", "lo", "up"],
                ["ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                ["ip", "-n", ns, "addr", "add", "10.0.1.11/24", "dev", "v0"],
                ["ip", "-n", ns, "link", "set", "v0", "up"], ["ip", "-n", ns, "link", "set", "v1", "up"]):
        subprocess.run(cmd, check=True)
    agent = subprocess.Popen(["ip", "netns", "exec", ns, str(Path(sys.executable).parent / "fabric"), "agent", "-c",
                              str(tmp_path / "agent.yaml")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        failing: dict = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the 1 s and 2 s retries
            try:
                failing = json.loads((run / "status.json").read_text())["services"]["failing"]
            except (OSError, ValueError, KeyError, TypeError):
                failing = {}
            if failing.get("(kernel)", {}).get("attempts", 0) >= 3:
                break
            time.sleep(0.2)
        assert failing.get("(kernel)", {}).get("attempts", 0) >= 3, failing
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=30)
        subprocess.run(["ip", "netns", "del", ns], check=True)
    lines = [line for line in err.splitlines() if "IPVS" in line]
    assert len(lines) == 1 and "ERROR fabric.services: services (kernel): IPVS is not available in this kernel" \
        in lines[0] and "load the ip_vs module" in lines[0], err
    assert "Traceback" not in err, err
