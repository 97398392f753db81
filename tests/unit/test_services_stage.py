"""The services stage keeps a skipped service (bad input: reported, not retried) apart from a failing one
(the kernel refused it: retried alone with backoff) in its failures, status, the document and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabric import config as cfgmod
from fabric.services import ServiceSync
from fabric.stage import StageInput
from fabric.stages.services import ServicesStage
from fabric.tracker import Store
from tests.unit.lbfake import FakeKernel

CFG = cfgmod.parse({"node": {"name": "node-a", "address": "10.0.1.11/24", "podCIDRs": ["10.244.1.0/24"]},
                    "source": {"kind": "file", "path": "c.yaml"}})
READY = {"ready": True, "serving": True, "terminating": False}


def svc(name: str, ip: str, **md) -> dict:
    return {"metadata": {"name": name, "namespace": "d", **md},
            "spec": {"clusterIP": ip, "ports": [{"name": "tcp", "port": 80, "protocol": "TCP"}]}}


def eps(name: str, ip: str) -> dict:
    return {"metadata": {"name": f"{name}-1", "namespace": "d", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "nodeName": "node-a", "conditions": READY}]}


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Shim:
    run_dir: Path
    store: Store = field(default_factory=Store)
    cfg: Any = CFG


def test_skipped_services_are_reported_not_failing(tmp_path: Path) -> None:
    clock, fake = Clock(), FakeKernel()
    shim = Shim(tmp_path)
    stage = ServicesStage(shim, lambda a: ServiceSync(CFG, a.run_dir, clock=clock, kernel_factory=lambda: fake))
    st = shim.store
    for name, ip, md in (("ok", "10.96.0.10", {}), ("bad-input", "10.96.0.11",
                                                      {"annotations": {"bgp-fabric.io/scheduler": "nope"}})):
        st.upsert("Service", f"d/{name}", svc(name, ip, **md))
        st.upsert("EndpointSlice", f"d/{name}-1", eps(name, "10.244.1.5"))

    def run(full: bool = False) -> Any:
        return stage.run(StageInput(st.take(), full, clock.t, True), None)

    res = run(full=True)
    # the invalid service: reported with its field, not a failing key, nothing to retry
    assert res.failures == {}, res.failures
    assert res.next_deadline is None
    assert "metadata.annotations[bgp-fabric.io/scheduler]: unknown scheduler 'nope'" in res.status["skipped"]["d/bad-input"]
    assert res.status["failing"] == {} and res.status["errors"] == []
    # a service the kernel refuses: failing, retried alone, named in the errors
    fake.fail = {"add address 10.96.0.12"}
    st.upsert("Service", "d/refused", svc("refused", "10.96.0.12"))
    st.upsert("EndpointSlice", "d/refused-1", eps("refused", "10.244.1.6"))
    res = run()
    assert set(res.failures) == {"d/refused"}, res.failures
    assert "Cannot allocate memory" in res.failures["d/refused"]
    assert res.next_deadline is not None and res.next_deadline > clock.t
    assert set(res.status["skipped"]) == {"d/bad-input"} and set(res.status["failing"]) == {"d/refused"}
    assert res.status["errors"] and all(e.startswith("service d/refused: ") for e in res.status["errors"])
    gauges = {g.name: g.value for g in res.metrics}
    assert gauges["services_skipped"] == 1 and gauges["services_failing"] == 1
    # the kernel recovers: nothing failing any more; the skipped one stays skipped (and is not retried)
    fake.fail = set()
    clock.t = res.next_deadline
    res = run()
    assert res.failures == {} and res.next_deadline is None and set(res.status["skipped"]) == {"d/bad-input"}
