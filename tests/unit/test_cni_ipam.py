"""cni.ipam: addresses from the node's pod CIDRs on disk — exact, exclusive, durable, never twice."""

from __future__ import annotations

import ipaddress
import json
import multiprocessing
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni.ipam import Allocation, Exhausted, IpamStore, pick, usable
from cni.spec import PortMapping

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address


def alloc(cid: str, ifname: str = "eth0", ports: tuple = ()) -> Allocation:
    return Allocation(A(0), cid, ifname, f"fab{cid[:12]:0>12}", f"/run/netns/{cid}", "", ports)


def brute(cidrs: list, used: set, after) -> A | None:
    order = [a for c in cidrs for a in range(usable(c)[0], usable(c)[1] + 1)]
    if not order:
        return None
    start = order.index(int(after)) + 1 if after is not None and int(after) in order else 0
    for v in order[start:] + order[:start]:
        if A(v) not in used:
            return A(v)
    return None


cidr_st = st.builds(lambda third, plen: N(f"10.244.{third}.0/{plen}"), st.integers(0, 3), st.integers(26, 32))


@settings(max_examples=300, deadline=None)
@given(st.lists(cidr_st, min_size=1, max_size=3, unique=True), st.data())
def test_pick_is_the_next_free_address_round_the_cidrs(cidrs: list, data) -> None:
    cidrs = list(ipaddress.collapse_addresses(cidrs))
    pool = [A(a) for c in cidrs for a in range(usable(c)[0], usable(c)[1] + 1)]
    used = set(data.draw(st.lists(st.sampled_from(pool), unique=True))) if pool else set()
    after = data.draw(st.one_of(st.none(), st.sampled_from(pool))) if pool else None
    got = pick(cidrs, used, after)
    assert got == brute(cidrs, used, after)
    if got is not None:
        c = next(c for c in cidrs if got in c)
        assert c.prefixlen > 30 or got not in (c.network_address, c.broadcast_address)


def test_network_and_broadcast_are_never_handed_out(tmp_path: Path) -> None:
    store = IpamStore(tmp_path, "net")
    got = []
    with store.locked():
        for i in range(6):
            got.append(store.allocate([N("10.244.4.0/29")], alloc(f"c{i}")).address)
        with pytest.raises(Exhausted, match=r"10\.244\.4\.0/29: 6 allocated, 6 usable"):
            store.allocate([N("10.244.4.0/29")], alloc("c6"))
    assert sorted(got) == [A(f"10.244.4.{i}") for i in range(1, 7)]


def test_a_released_address_is_not_given_again_at_once(tmp_path: Path) -> None:
    store = IpamStore(tmp_path, "net")
    cidrs = [N("10.244.1.0/24")]
    with store.locked():
        a = store.allocate(cidrs, alloc("a"))
        store.release(a)
        b = store.allocate(cidrs, alloc("b"))
    assert b.address != a.address and int(b.address) == int(a.address) + 1


def test_records_survive_a_restart_and_carry_everything(tmp_path: Path) -> None:
    store = IpamStore(tmp_path, "net")
    pm = (PortMapping(8080, 80, "tcp"), PortMapping(53, 53, "udp", A("10.0.1.11")))
    with store.locked():
        rec = store.allocate([N("10.244.1.0/24")], Allocation(A(0), "c1", "eth0", "fab000000000001", "/x", "ns/p", pm))
    again = IpamStore(tmp_path, "net")  # a new agent process
    with again.locked():
        assert again.find("c1", "eth0") == rec
        assert again.all() == [rec]
    on_disk = json.loads((tmp_path / "net" / str(rec.address)).read_text())
    assert on_disk["containerID"] == "c1" and on_disk["portMappings"][1]["hostIP"] == "10.0.1.11"
    assert oct((tmp_path / "net" / str(rec.address)).stat().st_mode & 0o777) == "0o600"
    assert not [p for p in (tmp_path / "net").iterdir() if p.name.endswith(".tmp")]


def test_an_unreadable_record_still_holds_its_address(tmp_path: Path) -> None:
    store = IpamStore(tmp_path, "net")
    (tmp_path / "net" / "10.244.1.1").write_text("{not json")
    with store.locked():
        got = store.allocate([N("10.244.1.0/30")], alloc("c1"))
    assert got.address == A("10.244.1.2")


def test_a_second_store_sees_the_first_ones_changes(tmp_path: Path) -> None:
    one, two = IpamStore(tmp_path, "net"), IpamStore(tmp_path, "net")
    with two.locked():
        assert two.all() == []
    with one.locked():
        rec = one.allocate([N("10.244.1.0/24")], alloc("c1"))
    with two.locked():
        assert two.find("c1", "eth0") == rec
        two.release(rec)
    with one.locked():
        assert one.find("c1", "eth0") is None


def test_50_concurrent_allocations_from_threads_get_50_addresses(tmp_path: Path) -> None:
    store = IpamStore(tmp_path, "net")
    out: list = []
    lock = threading.Lock()

    def one(i: int) -> None:
        s = IpamStore(tmp_path, "net") if i % 2 else store  # two stores: flock and the thread lock both matter
        with s.locked():
            a = s.allocate([N("10.244.1.0/24")], alloc(f"t{i}"))
        with lock:
            out.append(a.address)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 50 and len(set(out)) == 50
    assert len([p for p in (tmp_path / "net").iterdir() if p.name[0].isdigit()]) == 50


def _proc_allocate(path: str, i: int, q) -> None:
    s = IpamStore(Path(path), "net")
    got = []
    for k in range(10):
        with s.locked():
            got.append(str(s.allocate([N("10.244.1.0/24")], alloc(f"p{i}-{k}")).address))
    q.put(got)


def test_concurrent_allocations_from_processes_never_collide(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_proc_allocate, args=(str(tmp_path), i, q)) for i in range(5)]
    for p in procs:
        p.start()
    got = [a for _ in procs for a in q.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert len(got) == 50 and len(set(got)) == 50
