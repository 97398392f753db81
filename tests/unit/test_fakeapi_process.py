"""The fake API server as a process (what the kernel e2e runs in a namespace), on the host's loopback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.config import KubernetesSource as KubernetesSourceConfig
from fabric.sources.kubernetes import KubernetesSource
from fabric.tracker import KINDS, Store
from tests.fakeapi.control import ControlError, FakeApiControl

ROOT = Path(__file__).resolve().parents[2]


def wait_until(cond, what: str, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.02)


class Proc:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.p: subprocess.Popen | None = None
        self.url = ""

    def start(self, listen: str = "127.0.0.1:0") -> str:
        self.p = subprocess.Popen(
            [sys.executable, "-m", "tests.fakeapi", "--listen", listen, "--control", str(self.tmp / "c.sock"),
             "--state", str(self.tmp / "state.json"), "--kubeconfig", str(self.tmp / "kubeconfig")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        assert line.startswith("ready http://127.0.0.1:"), line + (self.p.stderr.read() if self.p.stderr else "")
        self.url = line.split()[1]
        return self.url

    def stop(self) -> int:
        assert self.p is not None
        self.p.send_signal(signal.SIGTERM)
        return self.p.wait(timeout=10)


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[Proc]:
    p = Proc(tmp_path)
    try:
        yield p
    finally:
        if p.p is not None and p.p.poll() is None:
            p.p.kill()
            p.p.wait()


def node(name: str, ip: str, cidr: str) -> dict:
    return {"metadata": {"name": name}, "spec": {"podCIDRs": [cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def test_process_serves_kubeconfig_clients_survives_restart_with_same_objects(proc: Proc, tmp_path: Path) -> None:
    url = proc.start()
    ctl = FakeApiControl(str(tmp_path / "c.sock"))
    ctl.apply("Node", node("n1", "10.0.1.11", "10.244.1.0/24"))
    ctl.apply("IPPool", {"metadata": {"name": "default"}, "spec": {"cidr": "10.244.0.0/16"}})
    with pytest.raises(ControlError, match="400"):
        ctl.delete("Node", "no-such-node")

    store = Store()
    src = KubernetesSource(store, KubernetesSourceConfig(kubeconfig=str(tmp_path / "kubeconfig")),
                           backoff=(0.05, 0.2), namespace="bgp-fabric")
    src.start()
    try:
        wait_until(src.synced, "the first list")
        wait_until(lambda: all(ctl.stats()["watchers"][k] == 1 for k in KINDS), "watches open")
        assert set(store.snapshot("Node")) == {"n1"}
        assert src.report_problem(dict(store.get("IPPool", "default")), "IPPool/default: spec.cidr: test")
        assert [e["involvedObject"]["name"] for e in ctl.events()] == ["default"]

        # stopped: the source keeps everything; restarted on the same port from the state file
        assert proc.stop() == 0
        assert not ctl.alive()
        lists = src.reflectors["Node"].lists
        wait_until(lambda: src.reflectors["Node"].failures > 0, "the source to notice the outage")
        assert set(store.snapshot("Node")) == {"n1"}
        store.take()
        assert proc.start(url.rsplit("//", 1)[1]) == url
        # no watch history after a restart: the old resourceVersion gets 410 and the source relists
        wait_until(lambda: src.reflectors["Node"].lists > lists, "a relist after the restart")
        wait_until(lambda: all(ctl.stats()["watchers"][k] == 1 for k in KINDS), "watches open again")
        assert not store.take(), "the relist found the same objects: nothing changed"
        assert [e["involvedObject"]["name"] for e in ctl.events()] == ["default"]  # events kept too
        ctl.delete("Node", "n1")
        wait_until(lambda: not store.snapshot("Node"), "the delete to reach the source")
    finally:
        src.stop()


def test_bad_listen_address_is_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "tests.fakeapi", "--listen", "nowhere", "--control",
                        str(tmp_path / "c.sock")], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "'nowhere': expected ADDRESS:PORT" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "tests.fakeapi", "--listen", "192.0.2.1:6443", "--control",
                        str(tmp_path / "c.sock")], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "cannot listen on 192.0.2.1:6443" in r.stderr, r.stderr


def test_agent_without_api_credentials_exits_with_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("node: {name: n1, address: 10.0.1.11/24}\n"
                   "source: {kind: kubernetes, kubeconfig: /nonexistent/kubeconfig}\n"
                   f"paths: {{runDir: {tmp_path / 'run'}}}\nhealth: {{listen: null}}\n")
    r = subprocess.run([str(Path(sys.executable).parent / "fabric"), "agent", "-c", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "source.kubeconfig: cannot load kubeconfig /nonexistent/kubeconfig" in r.stderr
    assert "Traceback" not in r.stderr
