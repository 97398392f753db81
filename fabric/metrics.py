"""Prometheus metrics of the agent: `GET /metrics` on the health listener (prometheus-client's text format).

Named as operators know them from kube-router and Felix: `bgp_fabric_<subsystem>_<what>[_unit]`,
counters end in `_total`, durations are `_seconds` histograms. Labels carry peer names, addresses,
stages, kinds and fixed reason codes: never a password or another secret, never an unbounded value.

Most values are read at scrape time (on the event loop, which also answers the probe) from what the
agent already keeps: the speaker's sessions, the RIB's counts, the runner's per-stage state, and each
stage's last `StageResult.metrics` (gauges a stage computes at the end of its run, on its own worker:
a scrape never walks the routes or the services). The one thing recorded as it happens is the run
duration histogram (`Runner(on_run=...)`).

Every stage gets, for free, under its name:
  bgp_fabric_stage_sync_duration_seconds{stage}     histogram of run durations
  bgp_fabric_stage_syncs_total{stage,result}        runs, result ok | error
  bgp_fabric_stage_last_success_timestamp_seconds{stage}
  bgp_fabric_stage_failing_keys{stage}              keys the stage is retrying alone (routes, services, ...)
  bgp_fabric_stage_stalled{stage}                   1 while /healthz fails because of it
The full list is in docs/operations.md; manifests/grafana-dashboard.json uses them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from bgp.notification import CAUSES, connect_cause, down_cause
from fabric.stage import Gauge

disable_created_metrics()  # no *_created series: the process start time says as much, at half the samples
PREFIX = "bgp_fabric_"
# Every family the agent exports (the names Prometheus stores; counters carry _total), by type. A test
# holds the scrape, the Grafana dashboard and docs/operations.md to this list.
CATALOG = {
    "bgp_fabric_build_info": "gauge", "bgp_fabric_phase": "gauge", "bgp_fabric_ready": "gauge",
    "bgp_fabric_exabgp_up": "gauge", "bgp_fabric_exabgp_restarts_total": "counter",
    "bgp_fabric_bgp_announced_prefixes": "gauge",
    "bgp_fabric_bgp_peer_up": "gauge", "bgp_fabric_bgp_peer_state": "gauge",
    "bgp_fabric_bgp_peer_uptime_seconds": "gauge", "bgp_fabric_bgp_peer_established_total": "counter",
    "bgp_fabric_bgp_peer_down_cause": "gauge",
    "bgp_fabric_bgp_prefixes_received": "gauge", "bgp_fabric_bgp_prefixes_stale": "gauge",
    "bgp_fabric_bgp_prefixes_accepted": "gauge", "bgp_fabric_bgp_prefixes_rejected": "gauge",
    "bgp_fabric_routes_programmed": "gauge", "bgp_fabric_routes_desired": "gauge",
    "bgp_fabric_routes_pending": "gauge", "bgp_fabric_routes_conflicts": "gauge", "bgp_fabric_routes_failed": "gauge",
    "bgp_fabric_stage_sync_duration_seconds": "histogram", "bgp_fabric_stage_syncs_total": "counter",
    "bgp_fabric_stage_last_success_timestamp_seconds": "gauge", "bgp_fabric_stage_failing_keys": "gauge",
    "bgp_fabric_stage_stalled": "gauge",
    "bgp_fabric_ipvs_services": "gauge", "bgp_fabric_ipvs_destinations": "gauge",
    "bgp_fabric_services_skipped": "gauge", "bgp_fabric_services_failing": "gauge",
    "bgp_fabric_nft_rules": "gauge", "bgp_fabric_nft_elements": "gauge",
    "bgp_fabric_source_synced": "gauge", "bgp_fabric_source_problems": "gauge",
    "bgp_fabric_source_unreachable_seconds": "gauge",
    "bgp_fabric_kubernetes_relists_total": "counter", "bgp_fabric_kubernetes_watch_restarts_total": "counter",
    "bgp_fabric_kubernetes_errors_total": "counter",
}
SESSION_STATES = ("idle", "connect", "established")
PHASES = ("starting", "holding", "running", "stopping")
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bgp-fabric")
    except PackageNotFoundError:
        return "unknown"


def peer_cause(info: dict[str, Any], expected_asn: int | None) -> Any:
    """The down cause of one session (bgp.notification.Cause) from the speaker's status of it."""
    ce = info.get("connect_error")
    return down_cause(info.get("last_error"), open_asn=info.get("open_asn"), expected_asn=expected_asn,
                      connect=connect_cause(*ce) if ce else None)


class AgentMetrics:
    """One registry per agent (tests run several agents in one process)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.registry = CollectorRegistry(auto_describe=False)
        self.durations = Histogram(f"{PREFIX}stage_sync_duration_seconds",
                                   "How long one run of a stage took (seconds)", ["stage"],
                                   buckets=DURATION_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(agent))

    def observe_run(self, stage: str, seconds: float, ok: bool) -> None:
        self.durations.labels(stage).observe(max(0.0, seconds))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _g(name: str, help_: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, help_, labels=list(labels))


def _c(name: str, help_: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, help_, labels=list(labels))


def stage_families(results: Iterable[tuple[str, Iterable[Gauge]]]) -> list[Metric]:
    """Stages' own gauges grouped into families (one family per name; labels from its first sample)."""
    fams: dict[str, GaugeMetricFamily] = {}
    names: dict[str, tuple[str, ...]] = {}
    for _stage, gauges in results:
        for g in gauges:
            keys = tuple(k for k, _ in g.labels)
            fam = fams.get(g.name)
            if fam is None:
                fam = fams[g.name] = _g(g.name, g.help, keys)
                names[g.name] = keys
            if keys != names[g.name]:
                continue  # a stage bug; never break the whole scrape over it
            fam.add_metric([v for _, v in g.labels], float(g.value))
    return list(fams.values())


class _Collector:
    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        now_wall = time.time()
        yield from self._agent(a)
        yield from self._peers(a, now_wall)
        yield from self._stages(a, now_wall)
        yield from self._source(a)

    # -- the agent itself ----------------------------------------------------------------------------
    def _agent(self, a: Any) -> Iterator[Metric]:
        info = _g("build_info", "The agent's version (value 1)", ["version"])
        info.add_metric([_version()], 1)
        yield info
        phase = _g("phase", "The agent's lifecycle phase (1 for the current one)", ["phase"])
        for p in PHASES:
            phase.add_metric([p], 1.0 if a.lifecycle.phase.value == p else 0.0)
        yield phase
        ready = _g("ready", "1 when /readyz succeeds: desired state known and applied")
        ready.add_metric([], 1.0 if a.ready()[0] else 0.0)
        yield ready
        sp = a.speaker.status() if a.speaker is not None else {}
        up = _g("exabgp_up", "1 while the ExaBGP process runs")
        up.add_metric([], 1.0 if sp.get("exabgp_pid") else 0.0)
        yield up
        restarts = _c("exabgp_restarts", "ExaBGP processes started again after one ended")
        restarts.add_metric([], max(0, int(sp.get("exabgp_starts", 0) or 0) - 1))
        yield restarts
        ann = _g("bgp_announced_prefixes", "Prefixes this node announces (to one peer or more)")
        ann.add_metric([], float(sp.get("announced", 0) or 0))
        yield ann

    # -- BGP sessions ----------------------------------------------------------------------------------
    def _peers(self, a: Any, now_wall: float) -> Iterator[Metric]:
        sessions = (a.speaker.status().get("neighbors", {}) if a.speaker is not None else {})
        counts = a.rib.counts()
        labels = ["peer", "address", "asn", "kind"]
        up = _g("bgp_peer_up", "1 while the BGP session is Established", labels)
        state = _g("bgp_peer_state", "The session's state (1 for the current one)", ["peer", "state"])
        uptime = _g("bgp_peer_uptime_seconds", "Seconds since the session was Established (0 when down)", ["peer"])
        flaps = _c("bgp_peer_established", "Times the session reached Established", ["peer"])
        cause = _g("bgp_peer_down_cause", "Why a session that is not Established is down (1 for the cause "
                   "in force; codes in docs/operations.md)", ["peer", "cause"])
        received = _g("bgp_prefixes_received", "Prefixes the peer announced that we hold (stale ones included)",
                      ["peer"])
        stale = _g("bgp_prefixes_stale", "Prefixes kept from the peer by graceful restart", ["peer"])
        for n in a.neighbors:
            s = sessions.get(n.name, {})
            st = s.get("state", "idle")
            up.add_metric([n.name, str(n.peer_address), str(n.peer_as), n.kind], 1.0 if st == "established" else 0.0)
            for x in SESSION_STATES:
                state.add_metric([n.name, x], 1.0 if st == x else 0.0)
            since = s.get("since")
            uptime.add_metric([n.name], max(0.0, now_wall - since) if st == "established" and since else 0.0)
            flaps.add_metric([n.name], float(s.get("established_count", 0) or 0))
            c = peer_cause(s, n.peer_as) if st != "established" else None
            for code in CAUSES:
                if c is not None and c.code == code:
                    cause.add_metric([n.name, code], 1.0)
            cnt = counts.get(n.name, {})
            received.add_metric([n.name], float(cnt.get("routes", 0)))
            stale.add_metric([n.name], float(cnt.get("stale", 0)))
        yield from (up, state, uptime, flaps, cause, received, stale)

    # -- stages ------------------------------------------------------------------------------------------
    def _stages(self, a: Any, now_wall: float) -> Iterator[Metric]:
        r = a.runner
        if r is None:
            return
        now = r.clock()
        runs = _c("stage_syncs", "Runs of a stage by result (ok | error)", ["stage", "result"])
        last = _g("stage_last_success_timestamp_seconds", "When a run of the stage last succeeded (Unix time)",
                  ["stage"])
        failing = _g("stage_failing_keys", "Keys the stage is retrying alone (a refused route, a failing service, "
                     "...)", ["stage"])
        stalled = _g("stage_stalled", "1 while a run of the stage exceeds health.stageTimeout (/healthz fails)",
                     ["stage"])
        stalled_now = {line.split(":")[0].removeprefix("stage ") for line in r.stalled(now)}
        results = []
        for name, st in r.states.items():
            runs.add_metric([name, "ok"], float(st.runs - st.failed_runs))
            runs.add_metric([name, "error"], float(st.failed_runs))
            if st.last_ok is not None:
                last.add_metric([name], now_wall - (now - st.last_ok))
            failing.add_metric([name], float(len(st.result.failures)))
            stalled.add_metric([name], 1.0 if name in stalled_now else 0.0)
            results.append((name, st.result.metrics))
        yield from (runs, last, failing, stalled)
        yield from stage_families(results)

    # -- the cluster source ---------------------------------------------------------------------------
    def _source(self, a: Any) -> Iterator[Metric]:
        synced = _g("source_synced", "1 once the cluster source listed every kind (the desired state is known)")
        synced.add_metric([], 1.0 if a._source_complete() else 0.0)
        yield synced
        problems = _g("source_problems", "Cluster objects or file entries refused or skipped now")
        problems.add_metric([], float(len(getattr(a.source, "problems", None) or [])))
        yield problems
        state = a.source.state() if a.source is not None and hasattr(a.source, "state") else {}
        kinds = state.get("kinds") or {}
        if kinds:
            relists = _c("kubernetes_relists", "Lists of a kind after its first one (410 Gone, errors)", ["kind"])
            restarts = _c("kubernetes_watch_restarts", "Watches of a kind started again after the first one",
                          ["kind"])
            errors = _c("kubernetes_errors", "Failed list or watch requests of a kind (retried with backoff)",
                        ["kind"])
            for kind, k in sorted(kinds.items()):
                relists.add_metric([kind], float(max(0, k.get("lists", 0) - 1)))
                restarts.add_metric([kind], float(max(0, k.get("watches", 0) - 1)))
                errors.add_metric([kind], float(k.get("errors", 0)))
            yield from (relists, restarts, errors)
        since = state.get("unreachableSince")
        down = _g("source_unreachable_seconds", "Seconds the API server has been failing every request (0: fine)")
        down.add_metric([], max(0.0, time.time() - since) if since else 0.0)
        yield down
