"""Metrics, status summaries and logs of the agent loop (fakes for kernel, speaker and services; the real
file source): /metrics parsed with Prometheus' own text parser against the state the test built; a peer
sending a thousand refused prefixes is a few lines in status and logs; a down session's cause in words;
the cluster file's refusal in status at once; passwords in no log line, status, metrics or plan."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
from ipaddress import IPv4Address as A, IPv4Network as N
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bgp.events import RoutesAnnounced
from bgp.notification import connect_cause, down_cause, notification_name
from fabric import logs, status as status_mod
from fabric.agent import Agent
from fabric.metrics import stage_families
from fabric.stage import Gauge
from tests.unit.fakes import FakeSpeaker
from tests.unit.test_agent_loop import Harness, cluster, learn, run_agent, until

PASSWORD = "Md5-pa55word-xyzzy"
TOR = {"name": "tor", "address": "10.0.1.1", "asn": 65000, "password": PASSWORD,
       "import": {"allow": ["10.0.9.0/24"]}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http_get(port: int, path: str) -> tuple[int, str, str]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await w.drain()
    data = await r.read()
    w.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    ctype = next((ln.split(":", 1)[1].strip() for ln in head.splitlines() if ln.lower().startswith("content-type")), "")
    return int(head.split()[1]), ctype, body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by (name, sorted labels), through Prometheus' own parser."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def test_metrics_scraped_and_parsed_match_the_agents_state(tmp_path: Path) -> None:
    cluster(tmp_path / "cluster.yaml")
    port = free_port()
    h = Harness(tmp_path, node={"name": "a1", "address": "10.0.1.11/24", "podCIDRs": ["10.244.1.0/24"]},
                peers=[TOR], health={"listen": f"127.0.0.1:{port}", "stageTimeout": 5})
    out: dict[str, Any] = {}

    async def body(agent: Agent) -> None:
        learn(agent, "a2", "10.0.1.12", "10.244.2.0/24")       # same subnet: direct
        learn(agent, "b1", "10.0.2.21", "10.244.3.0/24")       # other subnet: IPIP
        learn(agent, "tor", "10.0.1.1", "10.0.9.0/24", eor=False)  # allowed by the import filter
        agent._on_bgp_event(RoutesAnnounced("tor", A("10.0.1.1"), tuple(N(f"10.99.{i}.0/24") for i in range(5))))
        await until("routes", lambda: {"10.244.2.0/24", "10.244.3.0/24", "10.0.9.0/24"} <= h.ours())
        await until("rejections counted", lambda: (agent.runner.states["routes"].result.status.get("rejected") or {})
                    .get("tor", {}).get("filter-not-allowed", {}).get("count") == 5)
        await until("running", lambda: agent.lifecycle.phase.value == "running")
        # every stage's first run over (the services stage's may still be going when routes are in: failed once
        # under a loaded full suite)
        await until("every stage ran", lambda: all(agent.runner.done_once(s) for s in ("config", "bgp", "routes",
                                                                                          "services")))
        code, ctype, text = await http_get(port, "/metrics")
        out.update(code=code, ctype=ctype, text=text, status=agent.snapshot())

    run_agent(h.agent(), body)
    assert out["code"] == 200 and out["ctype"].startswith("text/plain"), out["code"]
    m = samples(out["text"])
    assert value(m, "bgp_fabric_routes_programmed", kind="direct") == 2  # a2's pods and the tor's prefix
    assert value(m, "bgp_fabric_routes_programmed", kind="ipip") == 1
    assert value(m, "bgp_fabric_routes_programmed", kind="blackhole") == 1  # our own pod CIDR
    assert value(m, "bgp_fabric_routes_programmed", kind="ecmp") == 0
    assert value(m, "bgp_fabric_routes_pending") == 0
    assert value(m, "bgp_fabric_bgp_prefixes_received", peer="tor") == 6
    assert value(m, "bgp_fabric_bgp_prefixes_accepted", peer="tor") == 1
    assert value(m, "bgp_fabric_bgp_prefixes_rejected", peer="tor", reason="filter-not-allowed") == 5
    assert value(m, "bgp_fabric_bgp_prefixes_accepted", peer="b1") == 1
    assert value(m, "bgp_fabric_bgp_peer_up", peer="tor", address="10.0.1.1", asn="65000", kind="external") == 1
    assert value(m, "bgp_fabric_bgp_peer_state", peer="a2", state="established") == 1
    assert value(m, "bgp_fabric_bgp_peer_state", peer="a2", state="idle") == 0
    assert value(m, "bgp_fabric_ready") == 1 and value(m, "bgp_fabric_phase", phase="running") == 1
    assert value(m, "bgp_fabric_source_synced") == 1
    for stage in ("config", "bgp", "routes", "services"):  # every stage, no stage-specific code
        assert value(m, "bgp_fabric_stage_syncs_total", stage=stage, result="ok") >= 1
        assert value(m, "bgp_fabric_stage_sync_duration_seconds_count", stage=stage) >= 1
        assert value(m, "bgp_fabric_stage_last_success_timestamp_seconds", stage=stage) > 1.7e9
        assert value(m, "bgp_fabric_stage_stalled", stage=stage) == 0
    assert PASSWORD not in out["text"] and PASSWORD not in json.dumps(out["status"], default=str)
    tor = next(p for p in out["status"]["peers"] if p["name"] == "tor")
    assert tor["accepted"] == 1 and tor["rejected"]["filter-not-allowed"]["count"] == 5


def test_a_thousand_refused_prefixes_are_a_few_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cluster(tmp_path / "cluster.yaml")
    h = Harness(tmp_path, peers=[TOR])
    out: dict[str, Any] = {}
    bad = tuple(N(f"10.{100 + i // 256}.{i % 256}.0/24") for i in range(1000))

    async def body(agent: Agent) -> None:
        learn(agent, "tor", "10.0.1.1", "10.0.9.0/24", eor=False)
        agent._on_bgp_event(RoutesAnnounced("tor", A("10.0.1.1"), bad))
        await until("started", lambda: agent.runner is not None)
        await until("counted", lambda: (agent.runner.states["routes"].result.status.get("rejected") or {})
                    .get("tor", {}).get("filter-not-allowed", {}).get("count") == 1000, timeout=10)
        agent.runner.wake("routes", full=True)  # a resync logs nothing new
        runs = agent.runner.states["routes"].runs
        await until("a resync", lambda: agent.runner.states["routes"].runs > runs)
        out["status"] = agent.snapshot()

    with caplog.at_level(logging.INFO):
        run_agent(h.agent(), body)
    about = [r for r in caplog.records if "10.1" in r.getMessage() and "tor" in r.getMessage()]
    assert len(about) == 1, [r.getMessage() for r in about][:5]
    assert "1000 prefix(es) not used (filter-not-allowed)" in about[0].getMessage()
    st = out["status"]
    text = status_mod.render(st)
    assert len(text.splitlines()) < 40, text
    assert "not used: 1000 (filter-not-allowed) not inside an allowed prefix; e.g. 10.100.0.0/24" in text
    assert "and 997 more" in text
    warnings = [w for w in st["warnings"] if "tor" in w]
    assert len(warnings) == 1 and "1000 prefixes not used" in warnings[0], warnings
    assert len(st["stages"]["routes"]["rejectedAll"]["tor"]) == 1000  # every one in --json


class CausesSpeaker(FakeSpeaker):
    """Sessions as the real tracker reports them: one refused, one silent, one with another AS, one timed out."""

    STATES = {
        "a2": {"state": "idle", "connect_error": ["refused", ""]},
        "b1": {"state": "connect", "connect_error": ["timeout", ""]},
        "tor": {"state": "idle", "open_asn": 65099, "last_error": "notification sent (2,2)"},
    }

    def status(self) -> dict:
        return {"exabgp_starts": 3, "exabgp_pid": 42, "neighbors": {
            n.name: {"address": str(n.peer_address), **self.STATES.get(n.name, {"state": "established"})}
            for n in self.neighbors}}


def test_down_causes_in_status_and_metrics(tmp_path: Path) -> None:
    cluster(tmp_path / "cluster.yaml")
    port = free_port()
    h = Harness(tmp_path, peers=[TOR], health={"listen": f"127.0.0.1:{port}", "stageTimeout": 5})
    h.speaker_factory = lambda run_dir, on_event: CausesSpeaker(run_dir, on_event)  # type: ignore[method-assign]
    out: dict[str, Any] = {}

    async def body(agent: Agent) -> None:
        await until("neighbors", lambda: len(agent.neighbors) == 3)
        out["text"] = (await http_get(port, "/metrics"))[2]
        out["status"] = agent.snapshot()

    run_agent(h.agent(), body)
    m = samples(out["text"])
    assert value(m, "bgp_fabric_bgp_peer_down_cause", peer="a2", cause="connection-refused") == 1
    assert value(m, "bgp_fabric_bgp_peer_down_cause", peer="b1", cause="no-answer") == 1
    assert value(m, "bgp_fabric_bgp_peer_down_cause", peer="tor", cause="asn-mismatch") == 1
    assert value(m, "bgp_fabric_bgp_peer_up", peer="tor", address="10.0.1.1", asn="65000", kind="external") == 0
    assert value(m, "bgp_fabric_exabgp_restarts_total") == 2
    text = status_mod.render(out["status"])
    assert "down: connection refused" in text
    assert "down: no answer to our connection attempts (a TCP-MD5 password mismatch looks like this" in text
    assert "down: ASN mismatch: the peer's OPEN says AS 65099, configured AS 65000" in text


@pytest.mark.parametrize("last,kw,code,words", [
    ("notification received (6,2) shutdown", {}, "notification-received",
     "NOTIFICATION received: Cease / Administrative Shutdown (6/2): shutdown"),
    ("notification sent (4,0)", {}, "hold-timer-expired", "hold timer expired (we stopped hearing from the peer)"),
    ("notification received (4,0)", {}, "hold-timer-expired", "the peer stopped hearing from us"),
    ("notification received (2,2)", {}, "asn-mismatch", "OPEN Message Error / Bad Peer AS (2/2)"),
    ("notification received (6,7)", {}, "notification-received", "Connection Collision Resolution (6/7)"),
    (None, {"open_asn": 65001, "expected_asn": 65000}, "asn-mismatch", "the peer's OPEN says AS 65001"),
    (None, {"connect": connect_cause("timeout")}, "no-answer", "TCP-MD5 password mismatch"),
    ("closing connection", {}, "connection-closed", "TCP connection closed or lost"),
    ("notification received (9,1)", {}, "notification-received", "unknown error code 9 / subcode 1 (9/1)"),
])
def test_down_cause_in_words(last: str | None, kw: dict, code: str, words: str) -> None:
    c = down_cause(last, **kw)
    assert c is not None and c.code == code and words in c.text, c


def test_notification_names_are_the_rfcs() -> None:
    assert notification_name(6, 1) == "Cease / Maximum Number of Prefixes Reached (6/1)"
    assert notification_name(3, 11) == "UPDATE Message Error / Malformed AS_PATH (3/11)"
    assert notification_name(5, 3) == "Finite State Machine Error / Receive Unexpected Message in Established State (5/3)"
    assert notification_name(4, 0) == "Hold Timer Expired (4/0)"
    assert notification_name(2, 0) == "OPEN Message Error / unspecific (2/0)"


def test_a_refused_cluster_file_is_in_status_at_once_with_the_error_of_now(tmp_path: Path) -> None:
    cluster(tmp_path / "cluster.yaml")
    h = Harness(tmp_path)
    run_dir = tmp_path / "run"

    async def body(agent: Agent) -> None:
        await until("status written", lambda: (run_dir / "status.json").exists())
        await asyncio.sleep(0.2)
        (tmp_path / "cluster.yaml").write_text("nodes: [\n")  # a YAML error
        agent.source.reload()
        await until("the refusal in status.json", lambda: "REFUSED" in status_mod.render(status_mod.read(run_dir)),
                    timeout=0.5)  # no stage runs: nothing changed in the Store; the source's change writes it
        assert "yaml line" in json.dumps(status_mod.read(run_dir)["source"]["error"])
        (tmp_path / "cluster.yaml").write_text("nodes: 5\n")  # another error: status says this one, not the last
        agent.source.reload()
        await until("the new error", lambda: "must be a list" in json.dumps(status_mod.read(run_dir)["source"]),
                    timeout=0.5)
        assert "yaml line" not in json.dumps(status_mod.read(run_dir)["source"])
        cluster(tmp_path / "cluster.yaml")
        agent.source.reload()
        await until("accepted again", lambda: not status_mod.read(run_dir)["source"]["error"], timeout=1.5)

    run_agent(h.agent(), body)


def test_stage_gauges_become_families_and_a_bad_one_does_not_break_the_scrape() -> None:
    fams = stage_families([("cni", [Gauge("cni_pods", "pods", 3), Gauge("x_by", "x", 1, (("a", "1"),)),
                                    Gauge("x_by", "x", 2, (("b", "2"),))])])
    by = {f.name: f for f in fams}
    assert by["bgp_fabric_cni_pods"].samples[0].value == 3
    assert [s.value for s in by["bgp_fabric_x_by"].samples] == [1]  # the sample with other labels is dropped


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_logs_text_or_json_and_secrets_masked(fmt: str) -> None:
    buf = io.StringIO()
    handler = logs.setup("info", fmt, stream=buf)
    try:
        logs.register_secret(PASSWORD)
        log = logging.getLogger("fabric.test")
        log.warning("peer tor password is %s", PASSWORD)
        try:
            raise ValueError(f"bad {PASSWORD}")
        except ValueError:
            log.exception("failed")
        import base64
        log.info("b64 %s", base64.b64encode(PASSWORD.encode()).decode())
    finally:
        logging.getLogger().removeHandler(handler)
    text = buf.getvalue()
    assert PASSWORD not in text and "***" in text
    assert base64.b64encode(PASSWORD.encode()).decode() not in text
    if fmt == "json":
        docs = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert docs[0]["level"] == "warning" and docs[0]["logger"] == "fabric.test"
        assert docs[0]["msg"] == "peer tor password is ***" and docs[0]["time"].endswith("Z")
        assert "ValueError: bad ***" in docs[1]["exc"]
    else:
        assert " WARNING fabric.test: peer tor password is ***" in text


ROOT = Path(__file__).resolve().parents[2]


def exported(text: str) -> set[str]:
    """Family names of a scrape as Prometheus stores them (counters with _total)."""
    return {f.name + ("_total" if f.type == "counter" else "") for f in text_string_to_metric_families(text)}


def test_every_family_is_catalogued_and_documented(tmp_path: Path) -> None:
    from fabric.metrics import CATALOG
    from fabric.services import ServiceSync
    from loadbalancer.nft import TABLE

    cluster(tmp_path / "cluster.yaml")
    port = free_port()
    h = Harness(tmp_path, health={"listen": f"127.0.0.1:{port}", "stageTimeout": 5})
    out: dict[str, str] = {}

    async def body(agent: Agent) -> None:
        learn(agent, "a2", "10.0.1.12", "10.244.2.0/24")
        agent._on_bgp_event(RoutesAnnounced("a2", A("10.0.1.12"), (N("192.168.7.0/24"),)))  # outside the pools
        await until("a rejection", lambda: agent.runner is not None
                    and agent.runner.states["routes"].result.status.get("rejected"))
        out["text"] = (await http_get(port, "/metrics"))[2]

    run_agent(h.agent(), body)
    names = exported(out["text"])
    # the services stage's own gauges (the harness fakes the proxy) and the Kubernetes source's counters
    sync = ServiceSync.__new__(ServiceSync)
    sync.proxy = type("P", (), {"nft_rules": lambda self: 8, "nft_counts": {"masq": 1}})()
    status = {"virtualServers": 1, "realServers": 2, "skipped": {}, "failing": {}}
    names |= {"bgp_fabric_" + g.name for g in ServiceSync.metrics(sync, status)}
    names |= {"bgp_fabric_kubernetes_relists_total", "bgp_fabric_kubernetes_watch_restarts_total",
              "bgp_fabric_kubernetes_errors_total"}  # checked against a real source in test_k8s_source
    assert names <= set(CATALOG), names - set(CATALOG)
    assert set(CATALOG) - names == set(), set(CATALOG) - names
    ops = (ROOT / "docs" / "operations.md").read_text()
    assert [n for n in CATALOG if f"`{n}" not in ops] == []


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    import re

    from fabric.metrics import CATALOG

    dash = json.loads((ROOT / "manifests" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [dash["templating"]["list"][1]["definition"]]
    assert len(exprs) >= 20
    used = set()
    for e in exprs:
        names = re.findall(r"\bbgp_fabric_[a-z0-9_]+", e)
        assert names, e  # every panel shows a metric of the agent
        for n in names:
            base = re.sub(r"_(bucket|count|sum)$", "", n) if CATALOG.get(re.sub(r"_(bucket|count|sum)$", "", n)) \
                == "histogram" else n
            assert base in CATALOG, f"{n} in {e!r} is not a metric the agent exports"
            used.add(base)
    # the dashboard covers every family (a new metric gets a panel)
    assert set(CATALOG) - used == set(), set(CATALOG) - used
    assert {p["id"] for p in dash["panels"]} == set(range(1, len(dash["panels"]) + 1))


def test_the_session_tracker_keeps_the_last_failed_attempt_and_the_open_asn() -> None:
    from bgp.messages import ConnectMsg, OpenMsg, StateMsg
    from bgp.sessions import SessionTracker

    t = SessionTracker()
    t.set_neighbors({A("10.0.1.3"): "bird"}, 0.0)
    t.feed(ConnectMsg(A("10.0.1.3"), "timeout", ""), 1.0)
    assert t.status()["bird"]["connect_error"] == ["timeout", ""]
    t.feed(StateMsg(A("10.0.1.3"), None, "connected", ""), 2.0)  # TCP is up: the attempt problem is gone
    assert t.status()["bird"]["connect_error"] is None
    t.feed(OpenMsg(A("10.0.1.3"), None, 9, "10.0.1.3", 65001), 2.1)
    t.feed(StateMsg(A("10.0.1.3"), None, "down", "notification sent (2,2)"), 2.2)
    s = t.status()["bird"]
    assert s["open_asn"] == 65001 and s["last_error"] == "notification sent (2,2)"
    c = down_cause(s["last_error"], open_asn=s["open_asn"], expected_asn=65099)
    assert c is not None and c.code == "asn-mismatch" and "AS 65001, configured AS 65099" in c.text


def test_a_password_from_a_secret_reaches_no_log_status_metrics_or_explain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Kubernetes source: a BGPPeer's password read from a Secret, and the config file's own peer
    password; neither appears in a log line (even one that tries), status.json, /metrics or explain."""
    from fabric import cli
    from tests.fakeapi import FakeApiServer
    from tests.fakeapi.__main__ import KUBECONFIG

    secret_pw = "From-A-Secret-9z"
    with FakeApiServer() as api:
        (tmp_path / "kubeconfig").write_text(KUBECONFIG.format(url=api.url))
        api.apply("Node", {"metadata": {"name": "a1"}, "spec": {"podCIDRs": ["10.244.1.0/24"]},
                           "status": {"addresses": [{"type": "InternalIP", "address": "10.0.1.11"}]}})
        api.apply("BGPPeer", {"metadata": {"name": "rr"}, "spec": {
            "peerIP": "10.0.1.2", "asNumber": 65001,
            "password": {"secretKeyRef": {"name": "rr-pw", "key": "password"}}}})
        api.secrets[("bgp-fabric", "rr-pw")] = {"data": {"password": __import__("base64").b64encode(
            secret_pw.encode()).decode()}}
        monkeypatch.setenv("NODE_NAME", "a1")
        monkeypatch.setenv("POD_NAMESPACE", "bgp-fabric")
        port = free_port()
        h = Harness(tmp_path, peers=[TOR], health={"listen": f"127.0.0.1:{port}", "stageTimeout": 5},
                    source={"kind": "kubernetes", "kubeconfig": str(tmp_path / "kubeconfig")})
        buf = io.StringIO()
        handler = logs.setup("debug", "json", stream=buf)
        out: dict[str, Any] = {}

        async def body(agent: Agent) -> None:
            await until("the Secret's peer", lambda: any(n.name == "rr" and n.md5_password == secret_pw
                                                         for n in agent.neighbors), timeout=10)
            logging.getLogger("fabric.test").error("oops %s / %s", secret_pw, PASSWORD)  # a careless line
            out["metrics"] = (await http_get(port, "/metrics"))[2]
            out["status"] = json.dumps(agent.snapshot(), default=str)
            agent._write_status()

        try:
            run_agent(h.agent(), body)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{buf.getvalue()[-6000:]}") from None
        finally:
            logging.getLogger().removeHandler(handler)
        assert cli.main(["explain", "-c", str(tmp_path / "agent.yaml"), "default/none"]) == 1
    text = buf.getvalue()
    assert "oops *** / ***" in text
    everything = {"log": text, "metrics": out["metrics"], "status": out["status"],
                  "status.json": (tmp_path / "run" / "status.json").read_text()}
    for where, t in everything.items():
        assert secret_pw not in t and PASSWORD not in t, where
    assert '"rr"' in out["status"]


def test_every_rejection_code_in_the_code_is_a_known_metric_label() -> None:
    """Reason codes label bgp_fabric_bgp_prefixes_rejected: a new one must be in REASON_CODES (and so in
    docs/operations.md), never an unbounded or unlisted value."""
    import ast

    from bgp.policy import REASON_CODES

    used = set()
    for pkg in ("bgp", "fabric"):
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Reason"
                        and node.args and isinstance(node.args[0], ast.Constant)):
                    used.add(node.args[0].value)
    assert used and used <= set(REASON_CODES), used - set(REASON_CODES)
    ops = (ROOT / "docs" / "operations.md").read_text()
    assert [c for c in REASON_CODES if f"`{c}`" not in ops] == []
