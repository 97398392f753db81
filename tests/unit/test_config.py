"""Config model: good files load, bad files exit 2 with `path: reason`, random YAML never crashes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric import cli
from fabric import config as cfg

CONFIGS = Path(__file__).parent / "configs"


def test_good_config_loads_with_defaults() -> None:
    c = cfg.load(CONFIGS / "good.yaml")
    assert c.cluster.asn == 64512
    assert str(c.node.address) == "10.0.1.11/24"
    assert c.pools[0].ipip_mode is cfg.IPIPMode.CROSS_SUBNET
    assert c.timers.keepalive_time == 30
    assert c.dataplane.route_protocol == 80


@pytest.mark.parametrize("name, expected", [
    ("bad-type.yaml", "cluster.asn: Input should be a valid integer"),
    ("bad-unknown-key.yaml", "pools.0.ipipmode: unknown key"),
    ("bad-cidr.yaml", "node.podCIDRs.0: not a valid IPv4 CIDR"),
])
def test_bad_config_exits_2_naming_the_field(name: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["check-config", str(CONFIGS / name)])
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err
    assert "Traceback" not in err


def test_bad_config_through_the_real_command() -> None:
    fabric = Path(sys.executable).parent / "fabric"
    r = subprocess.run([str(fabric), "check-config", str(CONFIGS / "bad-cidr.yaml")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "node.podCIDRs.0:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("patch, expected", [
    ({"cluster": {"asn": 65001.5}}, "cluster.asn"),
    ({"cluster": {"asn": 13335}}, "not private"),
    ({"cluster": {"asn": 13335, "allowPublicAsn": True}}, None),
    ({"timers": {"gracefulRestartTime": 5000}}, "timers.gracefulRestartTime"),
    ({"timers": {"holdTime": 9, "keepalive": 4}}, "keepalive 4 must be at most holdTime/3"),
    ({"node": {"name": "n", "address": "10.0.0.1"}}, "node.address: must be an address with its prefix"),
    ({"pools": [{"cidr": "10.244.0.0/16"}, {"cidr": "10.244.8.0/24"}]}, "overlaps"),
    ({"pools": [{"cidr": "10.244.0.1/16"}]}, "pools.0.cidr: not a valid IPv4 CIDR"),
    ({"pools": [{"cidr": "10.244.0.0/16", "ipipMode": "Sometimes"}]}, "pools.0.ipipMode"),
    ({"peers": [{"name": "tor", "address": "10.0.0.300", "asn": 65000}]}, "peers.0.address"),
    ({"peers": [{"name": "a", "address": "10.0.0.1", "asn": 65000},
                {"name": "a", "address": "10.0.0.2", "asn": 65000}]}, "duplicate peer name 'a'"),
    ({"source": {"kind": "carrier-pigeon"}}, "source"),
    ({"advertise": {"communities": ["65000:70000"]}}, "<= 65535"),
    ({"node": {"name": "n", "address": "10.0.0.1/24", "podCIDRs": ["10.99.1.0/24"]},
      "pools": [{"cidr": "10.244.0.0/16"}]}, "node.podCIDRs: 10.99.1.0/24 is outside every enabled pool"),
    ({"node": {"name": "n", "address": "10.0.0.1/24", "podCIDRs": ["10.244.1.0/24"]},
      "pools": [{"cidr": "10.244.0.0/16", "disabled": True}]}, "outside every enabled pool"),
    ({"node": {"name": "n", "address": "10.0.0.1/24", "podCIDRs": ["10.244.1.0/24"]},
      "pools": [{"cidr": "10.244.0.0/16"}]}, None),
    ({"peers": [{"name": "tor", "address": "10.0.0.9", "asn": 65000, "nextHop": "somewhere"}]}, "peers.0.nextHop"),
    ({"peers": [{"name": "tor", "address": "10.0.0.9", "asn": 65000, "export": {"allowDefaultRoute": True}}]},
     "peers.0.export.allowDefaultRoute: unknown key"),
    ({"peers": [{"name": "tor", "address": "10.0.0.9", "asn": 65000, "nextHop": "peer",
                 "import": {"allowDefaultRoute": True, "allowNodeNetworks": True}}]}, None),
    ({"health": {"stageTimeout": 0}}, "health.stageTimeout"),
])
def test_field_errors(patch: dict, expected: str | None) -> None:
    base = yaml.safe_load((CONFIGS / "good.yaml").read_text())
    base.update(patch)
    if expected is None:
        cfg.parse(base)
        return
    with pytest.raises(cfg.ConfigError) as e:
        cfg.parse(base)
    assert any(expected in p for p in e.value.problems), e.value.problems


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: [unclosed\n")
    with pytest.raises(cfg.ConfigError, match=r"\(yaml line"):
        cfg.load(bad)


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=20), st.sampled_from(["10.0.0.1/24", "10.244.0.0/16", "Always", "file"]))
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["node", "name", "address", "podCIDRs", "pools", "cidr", "ipipMode", "cluster", "asn",
                         "peers", "source", "kind", "path", "timers", "holdTime", "x"]) | st.text(max_size=8),
        children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=yaml_values)
def test_random_structures_never_traceback(data: object) -> None:
    try:
        cfg.parse(data)
    except cfg.ConfigError as e:
        assert e.problems and all(isinstance(p, str) and ": " in p for p in e.problems)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("abc:-[]{}'\"!&*?|>#%@` \n\t10./")), max_size=120))
def test_random_yaml_text_never_tracebacks(text: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    p = tmp_path_factory.mktemp("y") / "c.yaml"
    p.write_text(text)
    try:
        cfg.load(p)
    except cfg.ConfigError as e:
        assert e.problems


def test_next_hop_policy_defaults_follow_frr() -> None:
    base = yaml.safe_load((CONFIGS / "good.yaml").read_text())
    base["peers"] = [{"name": "ebgp", "address": "10.0.0.9", "asn": 65000},
                     {"name": "multihop", "address": "10.0.0.10", "asn": 65000, "multihop": 2},
                     {"name": "ibgp", "address": "10.0.0.11", "asn": 64512},
                     {"name": "set", "address": "10.0.0.12", "asn": 65000, "nextHop": "any"}]
    c = cfg.parse(base)
    assert [p.next_hop_policy(64512) for p in c.peers] == ["connected", "any", "any", "any"]
