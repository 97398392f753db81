"""ExaBGP config generation: real `exabgp validate` accepts what we render, and bad neighbors are named."""

from __future__ import annotations

import os
import subprocess
import sys
from ipaddress import IPv4Address as A
from pathlib import Path

import pytest

from bgp.exabgp_config import Neighbor, NeighborError, environment, render

EXABGP = str(Path(sys.executable).parent / "exabgp")


def _validate(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "exabgp.conf"
    conf.write_text(text)
    env = dict(os.environ, **environment(tmp_path))
    return subprocess.run([EXABGP, "validate", str(conf)], capture_output=True, text=True, env=env, timeout=60)


def mesh(name_: str, peer: str, **kw: object) -> Neighbor:
    base: dict[str, object] = dict(name=name_, peer_address=A(peer), peer_as=64512, local_as=64512,
                                   local_address=A("10.0.0.1"), router_id=A("10.0.0.1"), hold_time=90)
    base.update(kw)
    return Neighbor(**base)  # type: ignore[arg-type]


CONFIGS = {
    "one-mesh-peer": [mesh("node-b", "10.0.0.2")],
    "mesh-and-tor": [
        mesh("node-b", "10.0.0.2"), mesh("node-c", "10.0.0.3", graceful_restart_time=4095),
        Neighbor("tor-1", A("192.168.1.1"), 65000, 64512, A("10.0.0.1"), A("10.0.0.1"), 30, port=1179,
                 md5_password='s3cret "with" spaces; and {braces}', passive=True, multihop=2,
                 graceful_restart_time=0, kind="external", route_reflector_client=True,
                 cluster_id=A("1.1.1.1")),
    ],
    "four-byte-asn": [Neighbor("rr", A("10.0.0.9"), 4200000001, 4200000002, A("10.0.0.1"), A("10.0.0.1"), 3)],
    "no-neighbors": [],
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rendered_config_is_valid_for_exabgp(name: str, tmp_path: Path) -> None:
    text = render(CONFIGS[name], tmp_path / "relay.sock")
    r = _validate(text, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for n in CONFIGS[name]:
        assert f"neighbor {n.peer_address} {{" in text


def test_validate_really_rejects_a_broken_config(tmp_path: Path) -> None:
    text = render(CONFIGS["one-mesh-peer"], tmp_path / "relay.sock").replace("local-as 64512;", "local-as x;")
    assert _validate(text, tmp_path).returncode != 0


def test_config_has_graceful_restart_manual_eor_and_api() -> None:
    text = render(CONFIGS["mesh-and-tor"], Path("/run/x/relay.sock"))
    block = text[text.index("neighbor 10.0.0.3"):text.index("neighbor 192.168.1.1")]
    assert "graceful-restart 4095;" in block
    assert "manual-eor true;" in block and "route-refresh enable;" in block
    assert "processes [ relay ];" in block and "neighbor-changes;" in block
    for kw in ("parsed;", "update;", "open;", "notification;", "refresh;"):
        assert kw in block
    tor = text[text.index("neighbor 192.168.1.1"):]
    assert "graceful-restart" not in tor  # 0 disables it
    assert "passive true;" in tor and "outgoing-ttl 2;" in tor and "connect 1179;" in tor
    assert "md5-base64 true;" in tor and "s3cret" not in tor  # the password is base64, never raw text
    assert "-m bgp.relay /run/x/relay.sock" in text


def test_neighbors_are_sorted_so_the_text_is_stable() -> None:
    a = render([mesh("c", "10.0.0.3"), mesh("b", "10.0.0.2")], Path("/s"))
    b = render([mesh("b", "10.0.0.2"), mesh("c", "10.0.0.3")], Path("/s"))
    assert a == b and a.index("10.0.0.2") < a.index("10.0.0.3")


@pytest.mark.parametrize("kw, expect", [
    ({"graceful_restart_time": 5000}, "graceful_restart_time: 5000 must be 0..4095"),
    ({"hold_time": 2}, "hold_time: 2 must be 0 or 3..65535"),
    ({"peer_as": 0}, "peer_as: 0 must be an ASN"),
    ({"port": 70000}, "port: 70000 must be 1..65535"),
    ({"multihop": 300}, "multihop: 300 must be 1..255"),
    ({"md5_password": "x" * 81}, "md5_password: must be 1..80 bytes"),
    ({"name": "bad name"}, "name: 'bad name'"),
    ({"peer_address": "10.0.0.2"}, "peer_address: '10.0.0.2' is not an IPv4Address"),
    ({"kind": "ibgp"}, "kind: 'ibgp' must be"),
])
def test_bad_neighbor_is_named_with_its_field(kw: dict[str, object], expect: str) -> None:
    with pytest.raises(NeighborError) as e:
        render([mesh("node-b", "10.0.0.2", **kw)], Path("/s"))
    assert expect in str(e.value)
    assert "neighbor " in str(e.value)


def test_duplicates_are_rejected() -> None:
    with pytest.raises(NeighborError, match="duplicate name"):
        render([mesh("x", "10.0.0.2"), mesh("x", "10.0.0.3")], Path("/s"))
    with pytest.raises(NeighborError, match="duplicate peer address"):
        render([mesh("x", "10.0.0.2"), mesh("y", "10.0.0.2")], Path("/s"))


def test_environment_runs_helper_as_root_with_acks_and_no_cli(tmp_path: Path) -> None:
    env = environment(tmp_path)
    assert env["exabgp_daemon_user"] == "root"
    assert env["exabgp_api_ack"] == "true" and env["exabgp_api_cli"] == "false"
