"""No accepted-but-ignored input: every field of the agent's config (fabric/config.py) and of the CRDs
(manifests/crds/*.yaml) is read by some code, or the test fails naming it.

"Read" means: some module of the application (fabric/, bgp/, ipip/, loadbalancer/, cni/) other than
fabric/config.py itself loads the attribute (`x.field_name`, or getattr(x, "field_name")): a check in
the config model (keepalive <= holdTime / 3) is not an implementation. Fields whose whole job is such a
check are listed in VALIDATION_ONLY with what they decide. A CRD field must be accepted by fabric/crds.py (else the API server
takes a value the agent then refuses), and the config field it maps to must be read. This is a static
check: a name read for another reason hides an unused field, so each allow-list entry says why.
"""

from __future__ import annotations

import ast
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from fabric import config as cfgmod, crds

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fabric", "bgp", "ipip", "loadbalancer", "cni")

# Fields no code reads yet, each with the reason it may stay accepted for now.
ALLOWED_UNUSED: dict[str, str] = {}  # field -> why it may stay unread for now (none)


# Fields that only change what the config model accepts (read in fabric/config.py alone).
VALIDATION_ONLY: dict[str, str] = {
    "ClusterSettings.allow_public_asn": "whether a public cluster ASN is accepted (the model refuses it otherwise)",
}


def read_names() -> set[str]:
    """Every attribute name the application loads, and every getattr() name given as a string. A value
    only handed on as a keyword argument (`Neighbor(cluster_id=cfg.node.route_reflector_cluster_id)`)
    counts as read only if the keyword's own attribute is read somewhere (else it is carried, not used)."""
    direct: set[str] = set()
    handed: dict[str, set[str]] = {}  # attribute -> keywords it is passed as
    variables: set[str] = set()  # names loaded as plain variables (a keyword that is a function parameter)
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            if f == ROOT / "fabric" / "config.py":
                continue
            tree = ast.parse(f.read_text(), str(f))
            passed = {id(kw.value): kw.arg for node in ast.walk(tree) if isinstance(node, ast.Call)
                      for kw in node.keywords if kw.arg and isinstance(kw.value, ast.Attribute)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                    if id(node) in passed:
                        handed.setdefault(node.attr, set()).add(passed[id(node)])
                    else:
                        direct.add(node.attr)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                    variables.add(node.id)
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                      and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                    direct.add(str(node.args[1].value))

    def used(name: str, seen: frozenset[str] = frozenset()) -> bool:
        if name in direct:
            return True
        return any(k in variables or (k not in seen and used(k, seen | {name})) for k in handed.get(name, ()))

    return {n for n in direct | set(handed) if used(n)}


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation refers to (through Optional, unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out += models_in(arg)
    return out


def config_fields() -> dict[str, tuple[type[BaseModel], str]]:
    """'Model.field' -> (model, field) for AgentConfig and every model below it."""
    out: dict[str, tuple[type[BaseModel], str]] = {}
    todo: list[type[BaseModel]] = [cfgmod.AgentConfig]
    seen: set[type[BaseModel]] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for name, f in m.model_fields.items():
            out[f"{m.__name__}.{name}"] = (m, name)
            todo += models_in(f.annotation)
    return out


def test_every_config_field_is_read_by_some_code() -> None:
    names = read_names()
    fields = config_fields()
    assert len(fields) > 60  # the walk found the whole tree
    unused = sorted(k for k, (_, name) in fields.items()
                    if name not in names and k not in ALLOWED_UNUSED and k not in VALIDATION_ONLY)
    assert unused == [], f"config fields no code reads (implement or reject them): {unused}"
    stale = sorted(k for k in ALLOWED_UNUSED if k in fields and fields[k][1] in names)
    assert stale == [], f"allow-listed fields that are read now: remove them from ALLOWED_UNUSED: {stale}"


def crd_spec_properties() -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted((ROOT / "manifests" / "crds").glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        kind = doc["spec"]["names"]["kind"]
        (version,) = doc["spec"]["versions"]
        out[kind] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return out


def _alias_map(model: type[BaseModel]) -> dict[str, str]:
    return {(f.alias or n): n for n, f in model.model_fields.items()}


# Where each CRD's spec fields go: the config model and field (by the object's own key).
def crd_targets(kind: str, key: str) -> tuple[type[BaseModel], str] | None:
    if kind == "BGPConfiguration":
        alias = crds._BGPCONF_FIELDS.get(key)
        for model in (cfgmod.ClusterSettings, cfgmod.Timers, cfgmod.Advertise):
            if alias in _alias_map(model):
                return model, _alias_map(model)[alias]
        return None
    if kind == "BGPPeer":
        alias = {"peerIP": "address", "asNumber": "asn"}.get(key, key)
        return (cfgmod.Peer, _alias_map(cfgmod.Peer)[alias]) if alias in _alias_map(cfgmod.Peer) else None
    if kind == "IPPool":
        return (cfgmod.Pool, _alias_map(cfgmod.Pool)[key]) if key in _alias_map(cfgmod.Pool) else None
    raise AssertionError(f"unknown CRD kind {kind}")


ACCEPTED = {"BGPConfiguration": set(crds._BGPCONF_FIELDS), "BGPPeer": crds._PEER_SPEC, "IPPool": crds._POOL_SPEC}


def crds_literals() -> set[str]:
    tree = ast.parse((ROOT / "fabric" / "crds.py").read_text())
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_every_crd_field_is_accepted_and_what_it_maps_to_is_read() -> None:
    names = read_names()
    literals = crds_literals()
    problems = []
    props = crd_spec_properties()
    assert set(props) == set(ACCEPTED)
    for kind, spec in sorted(props.items()):
        for key, sub in sorted(spec["properties"].items()):
            where = f"{kind} spec.{key}"
            if key not in ACCEPTED[kind]:
                problems.append(f"{where}: in the CRD but refused by fabric/crds.py as an unknown field")
                continue
            target = crd_targets(kind, key)
            if target is None:
                problems.append(f"{where}: maps to no config field")
                continue
            model, field = target
            if field not in names and f"{model.__name__}.{field}" not in {**ALLOWED_UNUSED, **VALIDATION_ONLY}:
                problems.append(f"{where} -> {model.__name__}.{field}: no code reads it")
            problems += nested(where, sub, model.model_fields[field].annotation, names, literals)
    assert problems == [], "\n".join(problems)


def nested(where: str, schema: dict[str, Any], annotation: Any, names: set[str], literals: set[str]) -> list[str]:
    """Sub-properties of a CRD field: fields of the config model it becomes, or keys crds.py reads itself."""
    out = []
    models = models_in(annotation)
    for key, sub in sorted((schema.get("properties") or {}).items()):
        here = f"{where}.{key}"
        if models:
            amap = _alias_map(models[0])
            if key not in amap:
                out.append(f"{here}: not a field of {models[0].__name__}")
            elif amap[key] not in names:
                out.append(f"{here} -> {models[0].__name__}.{amap[key]}: no code reads it")
            else:
                out += nested(here, sub, models[0].model_fields[amap[key]].annotation, names, literals)
        elif key not in literals:
            out.append(f"{here}: fabric/crds.py never reads it")
        else:
            out += nested(here, sub, None, names, literals)
    return out


def test_the_checks_can_fail() -> None:
    """An unused field is found (the walk and the name set are not vacuous)."""

    class Extra(cfgmod.Model):
        never_read_anywhere_xyz: int = 0

    names = read_names()
    assert "never_read_anywhere_xyz" not in names
    assert "hold_time" in names and "md5_password" in names  # handed on, then read: used
    assert "Extra.never_read_anywhere_xyz" not in config_fields()  # only AgentConfig's tree counts
    assert models_in(typing.Optional[cfgmod.ImportFilter]) == [cfgmod.ImportFilter]
    assert models_in(list[cfgmod.Pool]) == [cfgmod.Pool]
    assert isinstance(types.NoneType, type)
    assert "blockSize" in ACCEPTED["IPPool"]
