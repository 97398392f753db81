"""The per-key route reconciler (pure, virtual time) against the stateful fake kernel."""

from __future__ import annotations

import errno
import math
from ipaddress import IPv4Address as A, IPv4Network as N

from hypothesis import given, settings
from hypothesis import strategies as st

from ipip.model import NextHop, Route
from ipip.reconcile import Backoff, RouteReconciler
from tests.unit.fakes import FakeKernel

GW = NextHop(A("10.0.1.12"), "eth1")


def r(dst: str, metric: int = 0, gw: str = "10.0.1.12") -> Route:
    return Route(N(dst), nexthops=(NextHop(A(gw), "eth1"),), metric=metric)


def step(rec: RouteReconciler, k: FakeKernel, now: float) -> int:
    ops = rec.plan(now)
    errs = k.apply(ops.ops(), {})
    rec.record(ops, [(e.op, e.route, e.errno) for e in errs], now)
    return len(ops.ops())


def test_creates_replaces_deletes_only_what_differs() -> None:
    k = FakeKernel()
    rec = RouteReconciler()
    rec.set_dataplane(k.ours(), {})
    rec.set_desired({x.id: x for x in [r("10.244.2.0/24"), r("10.244.3.0/24")]})
    assert step(rec, k, 0) == 2 and not rec.pending()
    assert step(rec, k, 1) == 0  # idempotent
    rec.update_desired({(N("10.244.3.0/24"), 0): r("10.244.3.0/24", gw="10.0.1.13"), (N("10.244.2.0/24"), 0): None})
    ops = rec.plan(2)
    assert [x.dst for x in ops.delete] == [N("10.244.2.0/24")] and [op for op, _ in ops.write] == ["replace"]
    step(rec, k, 2)
    assert set(k.ours()) == {(N("10.244.3.0/24"), 0)}


def test_never_writes_over_another_owners_route_and_never_deletes_it() -> None:
    k = FakeKernel()
    node_default = Route(N("0.0.0.0/0"), nexthops=(NextHop(A("10.0.1.1"), "eth1"),))
    connected = Route(N("10.0.1.0/24"), nexthops=())
    k.add_foreign(node_default, proto=3)
    k.add_foreign(connected, proto=2)
    rec = RouteReconciler()
    view = k.read(A("10.0.1.11"))
    rec.set_dataplane(view.owned, view.foreign)
    tor_default = Route(N("0.0.0.0/0"), nexthops=(NextHop(A("10.0.1.254"), "eth1"),))
    tor_subnet = Route(N("10.0.1.0/24"), nexthops=(NextHop(A("10.0.1.254"), "eth1"),))
    rec.set_desired({x.id: x for x in [tor_default, tor_subnet, r("10.244.2.0/24")]})
    step(rec, k, 0)
    assert k.routes[(N("0.0.0.0/0"), 0)] == (node_default, 3)  # the node's own: untouched
    assert k.routes[(N("10.0.1.0/24"), 0)] == (connected, 2)
    conflicts = {key for key, f in rec.failures.items.items() if f.conflict}
    assert conflicts == {(N("0.0.0.0/0"), 0), (N("10.0.1.0/24"), 0)}
    assert "another owner's route" in rec.problems()["0.0.0.0/0"]["error"]
    # the ToR withdraws: nothing of the node's is deleted
    rec.set_desired({x.id: x for x in [r("10.244.2.0/24")]})
    step(rec, k, 100)
    assert k.routes[(N("0.0.0.0/0"), 0)] == (node_default, 3) and k.routes[(N("10.0.1.0/24"), 0)] == (connected, 2)
    assert not rec.failures.items


def test_conflict_resolves_when_the_other_route_goes() -> None:
    k = FakeKernel()
    k.add_foreign(r("10.0.9.0/24", gw="10.0.1.1"), proto=4)
    rec = RouteReconciler(Backoff(1, 8))
    view = k.read(A("10.0.1.11"))
    rec.set_dataplane(view.owned, view.foreign)
    rec.set_desired({(N("10.0.9.0/24"), 0): r("10.0.9.0/24")})
    step(rec, k, 0)
    assert rec.failures.items[(N("10.0.9.0/24"), 0)].conflict
    del k.routes[(N("10.0.9.0/24"), 0)]  # the admin removes their static route
    assert step(rec, k, 0.5) == 0  # backoff: not yet
    step(rec, k, 1.0)
    assert k.routes[(N("10.0.9.0/24"), 0)] == (r("10.0.9.0/24"), 80) and not rec.failures.items


def test_refused_route_is_retried_alone_at_most_once_per_backoff_step() -> None:
    """A route the kernel refuses forever: over 10 simulated minutes, one attempt per backoff step
    (1, 2, 4, ... 60 s), the other routes converge at once and are never rewritten."""
    k = FakeKernel(refuse={N("10.0.9.0/24"): errno.EINVAL})
    rec = RouteReconciler(Backoff(1.0, 60.0))
    rec.set_dataplane({}, {})
    rec.set_desired({x.id: x for x in [r("10.0.9.0/24"), r("10.244.2.0/24"), r("10.244.3.0/24")]})
    now, wakeups = 0.0, 0
    while now < 600:
        step(rec, k, now)
        wakeups += 1
        now = rec.next_deadline() or math.inf
    assert k.ours().keys() == {(N("10.244.2.0/24"), 0), (N("10.244.3.0/24"), 0)}
    assert k.attempts[N("10.244.2.0/24")] == 1 and k.attempts[N("10.244.3.0/24")] == 1
    # at 0, 1, 3, 7, 15, 31, 63 s, then every 60 s (123 ... 543): 15 attempts in 600 s
    assert k.attempts[N("10.0.9.0/24")] == wakeups == 15
    f = rec.problems()["10.0.9.0/24"]
    assert f["attempts"] == 15 and "Invalid argument" in f["error"] and not f["conflict"]


def test_a_new_desired_value_is_tried_at_once() -> None:
    k = FakeKernel(refuse={N("10.0.9.0/24"): errno.EINVAL})
    rec = RouteReconciler()
    rec.set_dataplane({}, {})
    rec.set_desired({(N("10.0.9.0/24"), 0): r("10.0.9.0/24")})
    step(rec, k, 0)
    k.refuse.clear()
    rec.update_desired({(N("10.0.9.0/24"), 0): r("10.0.9.0/24", gw="10.0.1.13")})
    assert step(rec, k, 0.1) == 1 and not rec.failures.items


def test_changing_the_metric_moves_the_route_to_a_new_key() -> None:
    k = FakeKernel()
    rec = RouteReconciler()
    rec.set_dataplane({}, {})
    rec.set_desired({(N("0.0.0.0/0"), 1000): r("0.0.0.0/0", 1000)})
    step(rec, k, 0)
    rec.set_desired({(N("0.0.0.0/0"), 4096): r("0.0.0.0/0", 4096)})
    step(rec, k, 1)
    assert set(k.ours()) == {(N("0.0.0.0/0"), 4096)}


# Felix's test shape: every case under every failure scenario converges within a few applies.
SCENARIOS = ["none", "fail-next-write", "fail-two-writes", "foreign-appears", "route-deleted-behind-our-back",
             "route-replaced-behind-our-back"]
PREFIXES = [N(f"10.244.{i}.0/24") for i in range(6)]


@settings(max_examples=60, deadline=None)
@given(before=st.sets(st.sampled_from(PREFIXES)), after=st.sets(st.sampled_from(PREFIXES)),
       scenario=st.sampled_from(SCENARIOS), victim=st.sampled_from(PREFIXES))
def test_converges_within_a_few_applies_under_every_failure(before: set, after: set, scenario: str, victim: N) -> None:
    k = FakeKernel()
    rec = RouteReconciler(Backoff(1.0, 8.0))
    rec.set_dataplane({}, {})
    rec.set_desired({(p, 0): Route(p, nexthops=(GW,)) for p in before})
    step(rec, k, 0)
    if scenario == "fail-next-write":
        k.fail_next_writes = 1
    elif scenario == "fail-two-writes":
        k.fail_next_writes = 2
    elif scenario == "foreign-appears":
        k.add_foreign(Route(victim, "blackhole"), proto=2)
    elif scenario == "route-deleted-behind-our-back":
        k.routes.pop((victim, 0), None)
    elif scenario == "route-replaced-behind-our-back" and (victim, 0) in k.routes:
        k.routes[(victim, 0)] = (Route(victim, nexthops=(NextHop(A("10.0.1.99"), "eth1"),)), 80)
    rec.set_desired({(p, 0): Route(p, nexthops=(GW,)) for p in after})
    now = 1.0
    for _ in range(3):  # a resync (dump) and retries at their deadlines
        view = k.read(A("10.0.1.11"))
        rec.set_dataplane(view.owned, view.foreign)
        step(rec, k, now)
        now = max(now + 0.1, rec.next_deadline() or now)
    ours = {key[0]: rt for key, rt in k.ours().items()}
    blocked = {victim} if scenario == "foreign-appears" else set()
    assert set(ours) == after - blocked
    assert all(rt.nexthops == (GW,) for rt in ours.values())
    if blocked & after:
        assert rec.failures.items[(victim, 0)].conflict
    if scenario == "foreign-appears":
        assert k.routes[(victim, 0)][1] == 2  # never replaced, never deleted


def test_device_down_drops_only_routes_wholly_through_it_and_the_index_follows_every_write() -> None:
    """The kernel drops a route when its device goes down only if every next hop went through it (a
    multipath route keeps its other hops): device_down mirrors that, from an index kept per write."""
    k = FakeKernel()
    rec = RouteReconciler()
    rec.set_dataplane(k.ours(), {})
    ecmp = Route(N("10.244.5.0/24"), nexthops=(NextHop(A("10.0.1.12"), "eth1"),
                                               NextHop(A("10.0.2.21"), "tunl0", True)))
    tun = Route(N("10.244.6.0/24"), nexthops=(NextHop(A("10.0.2.21"), "tunl0", True),))
    rec.set_desired({x.id: x for x in [r("10.244.2.0/24"), ecmp, tun]})
    step(rec, k, 0)
    k.set_down("eth1")  # the kernel drops 10.244.2.0/24 (the ECMP route keeps its tunnel hop)
    assert [x.dst for x in rec.device_down("eth1")] == [N("10.244.2.0/24")]
    assert rec.pending() == {(N("10.244.2.0/24"), 0)}
    k.set_up("eth1")
    step(rec, k, 1)  # written again
    assert not rec.pending()
    rec.update_desired({tun.id: r("10.244.6.0/24")})  # now through eth1: the index moves with the write
    step(rec, k, 2)
    assert sorted(str(x.dst) for x in rec.device_down("eth1")) == ["10.244.2.0/24", "10.244.6.0/24"]
    assert rec.device_down("tunl0") == []  # the ECMP route still has its eth1 hop
    # a dump rebuilds the index
    rec.set_dataplane(k.ours(), {})
    assert sorted(str(x.dst) for x in rec.device_down("eth1")) == ["10.244.2.0/24", "10.244.6.0/24"]
