"""Announcement diff -> bulk ExaBGP commands (grouped by attributes and target neighbors)."""

from __future__ import annotations

from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N

from bgp import announce
from bgp.announce import Announcement, diff_commands

ADDRS = {"b": A("10.0.0.2"), "c": A("10.0.0.3"), "tor": A("192.168.1.1")}


def ann(p: str, nh: str = "self", **kw: object) -> Announcement:
    return Announcement(N(p), "self" if nh == "self" else A(nh), **kw)  # type: ignore[arg-type]


def table(*anns: Announcement) -> dict[N, Announcement]:
    return {a.prefix: a for a in anns}


def test_full_set_is_bulk_grouped_by_attributes() -> None:
    new = table(ann("10.244.1.0/24"), ann("10.244.2.0/24"), ann("10.96.0.0/12", communities=("64512:100",)),
                ann("10.97.0.0/16", communities=("64512:100", "1:2:3"), local_pref=200, med=5))
    assert diff_commands({}, new, ADDRS) == [
        "announce attributes next-hop self nlri 10.244.1.0/24 10.244.2.0/24",
        "announce attributes next-hop self community [ 64512:100 ] nlri 10.96.0.0/12",
        "announce attributes next-hop self community [ 64512:100 ] large-community [ 1:2:3 ] "
        "local-preference 200 med 5 nlri 10.97.0.0/16",
    ]


def test_no_change_sends_nothing_and_withdraws_come_first() -> None:
    old = table(ann("10.244.1.0/24"), ann("10.244.2.0/24"))
    assert diff_commands(old, dict(old), ADDRS) == []
    new = table(ann("10.244.2.0/24", "10.0.0.1"), ann("10.244.3.0/24"))
    assert diff_commands(old, new, ADDRS) == [
        "withdraw attributes nlri 10.244.1.0/24",
        "announce attributes next-hop 10.0.0.1 nlri 10.244.2.0/24",
        "announce attributes next-hop self nlri 10.244.3.0/24",
    ]


def test_neighbor_subsets_use_selectors() -> None:
    old = table(ann("10.96.0.0/12", neighbors=frozenset({"tor", "b"})))
    new = table(ann("10.96.0.0/12", neighbors=frozenset({"tor", "c"})), ann("10.244.1.0/24"))
    assert diff_commands(old, new, ADDRS) == [
        "neighbor 10.0.0.2 withdraw attributes nlri 10.96.0.0/12",
        "announce attributes next-hop self nlri 10.244.1.0/24",
        "neighbor 10.0.0.3 announce attributes next-hop self nlri 10.96.0.0/12",
    ]
    # everyone -> a subset withdraws from the others
    assert diff_commands(table(ann("10.1.0.0/16")), table(ann("10.1.0.0/16", neighbors=frozenset({"tor"}))),
                         ADDRS) == ["neighbor 10.0.0.2 , neighbor 10.0.0.3 withdraw attributes nlri 10.1.0.0/16"]
    # unknown neighbor names are ignored: nothing to send to them
    assert diff_commands({}, table(ann("10.1.0.0/16", neighbors=frozenset({"nope"}))), ADDRS) == []


def test_replay_to_one_neighbor() -> None:
    desired = table(ann("10.244.1.0/24"), ann("10.96.0.0/12", neighbors=frozenset({"tor"})))
    assert diff_commands({}, desired, ADDRS, only=frozenset({"b"})) == [
        "neighbor 10.0.0.2 announce attributes next-hop self nlri 10.244.1.0/24"]
    assert diff_commands({}, desired, ADDRS, only=frozenset({"tor"})) == [
        "neighbor 192.168.1.1 announce attributes next-hop self nlri 10.96.0.0/12 10.244.1.0/24"]


def test_chunks() -> None:
    new = table(*(ann(f"10.{i // 256}.{i % 256}.0/24") for i in range(1200)))
    cmds = diff_commands({}, new, ADDRS)
    assert len(cmds) == 3 and [c.count("/24") for c in cmds] == [announce.CHUNK, announce.CHUNK, 200]
    assert diff_commands(new, {}, ADDRS)[0].startswith("withdraw attributes nlri 10.0.0.0/24 10.0.1.0/24")


def test_replay_names_the_neighbor_even_when_it_is_the_only_one() -> None:
    one = {"b": A("10.0.0.2")}
    assert diff_commands({}, table(ann("10.244.1.0/24")), one, only=frozenset({"b"})) == [
        "neighbor 10.0.0.2 announce attributes next-hop self nlri 10.244.1.0/24"]
    assert diff_commands({}, table(ann("10.244.1.0/24")), one) == [
        "announce attributes next-hop self nlri 10.244.1.0/24"]
