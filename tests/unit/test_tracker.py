"""The change tracker compares values with their types: `false` -> `0` in a cluster file is a change."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fabric.sources.file import FileSource
from fabric.tracker import Store, same

SVC = {"metadata": {"name": "web", "namespace": "shop"},
       "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "publishNotReadyAddresses": False,
                "ports": [{"port": 80, "protocol": "TCP"}], "ipFamilies": ["IPv4"]}}


def _with(path: tuple, value) -> dict:
    out = copy.deepcopy(SVC)
    d = out
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value
    return out


@pytest.mark.parametrize("a,b", [
    (False, 0), (0, False), (1, True), (True, 1.0), (80, 80.0),
    ([1, 2], [True, 2]), ((0,), (False,)), ({"x": [{"y": 1}]}, {"x": [{"y": True}]}),
    ({"x": {"y": 0}}, {"x": {"y": 0.0}}),
])
def test_equal_in_python_is_not_the_same(a, b) -> None:
    assert a == b and not same(a, b)


@pytest.mark.parametrize("a,b", [
    (SVC, copy.deepcopy(SVC)), ([], []), ({}, {}), ("x", "x"), (None, None), ({"a": [1, {"b": (2, 3)}]},
                                                                              {"a": [1, {"b": (2, 3)}]}),
])
def test_equal_values_are_the_same(a, b) -> None:
    assert same(a, b)


def test_unequal_values_are_not_the_same() -> None:
    assert not same(SVC, _with(("spec", "clusterIP"), "10.96.0.11"))
    assert not same({"a": 1}, {"a": 1, "b": 2})
    assert not same([1], [1, 1])


@pytest.mark.parametrize("path,value", [
    (("spec", "publishNotReadyAddresses"), 0),
    (("spec", "publishNotReadyAddresses"), 0.0),
    (("spec", "ports", 0, "port"), 80.0),
])
def test_upsert_and_replace_record_a_typed_change(path: tuple, value) -> None:
    store = Store()
    store.upsert("Service", "shop/web", copy.deepcopy(SVC))
    store.take()
    edited = _with(path, value)
    assert edited == SVC  # Python sees no difference
    assert store.upsert("Service", "shop/web", edited)
    assert store.take().of("Service") == {"shop/web"}
    assert store.get("Service", "shop/web") is edited  # the new value (with its type) is what is kept
    # and back, through a relist
    assert store.replace("Service", {"shop/web": copy.deepcopy(SVC)}) == 1
    assert store.take().of("Service") == {"shop/web"}
    # an identical relist is no change at all
    assert store.replace("Service", {"shop/web": copy.deepcopy(SVC)}) == 0
    assert not store.upsert("Service", "shop/web", copy.deepcopy(SVC))
    assert not store.take()


def test_cluster_file_edit_from_false_to_0_is_seen(tmp_path: Path) -> None:
    f = tmp_path / "cluster.yaml"
    doc = {"nodes": [{"name": "n1", "address": "10.0.1.11", "podCIDRs": ["10.244.1.0/24"]}],
           "services": [copy.deepcopy(SVC)]}
    f.write_text(yaml.safe_dump(doc))
    store = Store()
    src = FileSource(store, f)
    assert src.reload()
    store.take()
    doc["services"][0]["spec"]["publishNotReadyAddresses"] = 0
    f.write_text(yaml.safe_dump(doc))
    src.reload()
    assert store.take().of("Service") == {"shop/web"}
    assert store.get("Service", "shop/web")["spec"]["publishNotReadyAddresses"] == 0
    assert type(store.get("Service", "shop/web")["spec"]["publishNotReadyAddresses"]) is int
