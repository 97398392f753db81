"""manifests/ validate against the Kubernetes OpenAPI schemas shipped by the `kubernetes-validate`
package (strict: unknown fields are errors), CRD kinds against our CRDs' schemas, and the pieces
that must agree with each other (RBAC, probes, config) do."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fabric.config import parse
from fabric.crds import CrdConfig, secret_refs
from tests.unit.test_crds import crd_validator

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
K8S_VERSION = "1.34.0"  # a current release whose schemas kubernetes-validate ships


def docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for f in sorted(MANIFESTS.rglob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d is not None:
                out.append((f"{f.relative_to(MANIFESTS)}:{d['kind']}/{d['metadata']['name']}", d))
    return out


DOCS = docs()


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    (d,) = [d for _, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return d


@pytest.mark.parametrize("where,doc", DOCS, ids=[w for w, _ in DOCS])
def test_every_manifest_validates(where: str, doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith("bgp-fabric.io/"):
        errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=str)
        assert not errors, [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_can_fail() -> None:
    ds = copy.deepcopy(find("DaemonSet"))
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)
    ds = copy.deepcopy(find("DaemonSet"))
    ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] = [1]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


def test_everything_is_in_the_agents_namespace() -> None:
    assert find("Namespace")["metadata"]["name"] == "bgp-fabric"
    for where, d in DOCS:
        if d["kind"] in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "DaemonSet", "Secret"):
            assert d["metadata"]["namespace"] == "bgp-fabric", where


def test_cluster_role_reads_only_what_the_source_watches() -> None:
    rules = find("ClusterRole", "bgp-fabric")["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    expected = {(g, r, v) for g, r in [("", "nodes"), ("", "services"), ("discovery.k8s.io", "endpointslices"),
                                       ("bgp-fabric.io", "bgpconfigurations"), ("bgp-fabric.io", "bgppeers"),
                                       ("bgp-fabric.io", "ippools"), ("", "pods"), ("", "namespaces"),
                                       ("networking.k8s.io", "networkpolicies")]
                for v in ("get", "list", "watch")}
    assert granted == expected
    assert not any("resourceNames" in r or "nonResourceURLs" in r for r in rules)
    binding = find("ClusterRoleBinding", "bgp-fabric")
    assert binding["roleRef"]["name"] == "bgp-fabric"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "bgp-fabric", "namespace": "bgp-fabric"}]


def test_secrets_only_by_name_and_events_only_created() -> None:
    (secret_rule,) = find("Role", "bgp-fabric-peer-secrets")["rules"]
    assert secret_rule["resources"] == ["secrets"] and secret_rule["verbs"] == ["get"]
    names = set(secret_rule["resourceNames"])
    assert names, "resourceNames must list the peer password Secrets"
    # Every Secret an example BGPPeer refers to is allowed by name, and exists in the examples.
    peers = {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == "BGPPeer"}
    refs = secret_refs(peers)
    assert refs and {n for n, _ in refs} <= names
    for name, key in refs:
        secret = find("Secret", name)
        assert key in (secret.get("stringData") or {}) | (secret.get("data") or {})
    # Events go on the object: in `default` for a cluster-scoped one, in its own namespace (any) for a
    # Service / NetworkPolicy / Pod: create and patch Events cluster-wide, and nothing else.
    events = find("ClusterRole", "bgp-fabric-events")
    for rule in events["rules"]:
        assert rule["resources"] == ["events"] and set(rule["verbs"]) == {"create", "patch"}
    rb = find("RoleBinding", "bgp-fabric-peer-secrets")
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "bgp-fabric-peer-secrets"}
    assert rb["subjects"][0]["name"] == "bgp-fabric"
    crb = find("ClusterRoleBinding", "bgp-fabric-events")
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "bgp-fabric-events"}
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": "bgp-fabric", "namespace": "bgp-fabric"}]


def agent_config_text() -> str:
    return find("ConfigMap", "bgp-fabric-config")["data"]["config.yaml"]


def test_daemonset() -> None:
    ds = find("DaemonSet")
    spec = ds["spec"]
    assert spec["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    pod = spec["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["serviceAccountName"] == "bgp-fabric"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    (agent,) = pod["containers"]
    caps = agent["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"] and set(caps["add"]) == {"NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"}
    assert not agent["securityContext"].get("privileged")
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    cfg = yaml.safe_load(agent_config_text())
    port = int(cfg["health"]["listen"].rsplit(":", 1)[1])
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz" and agent["livenessProbe"]["httpGet"]["port"] == port
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz" and agent["readinessProbe"]["httpGet"]["port"] == port
    assert cfg["source"]["nodeNameEnv"] in env
    # Longer than the graceful-restart window, so a stopping agent is never SIGKILLed inside it.
    assert pod["terminationGracePeriodSeconds"] > cfg["timers"]["gracefulRestartTime"]
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    assert mounts["/etc/bgp-fabric"] == "config" and "/run/bgp-fabric" in mounts
    # Only the short-lived init container may load modules and write sysctls.
    init = {c["name"]: c for c in pod["initContainers"]}
    assert init["prepare-node"]["securityContext"] == {"privileged": True}
    assert "ip_forward" in init["prepare-node"]["command"][-1]
    assert init["install-cni"]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # The API server straight from the ConfigMap (optional keys), not through the ClusterIP the agent programs.
    for var, key in (("KUBERNETES_SERVICE_HOST", "apiServerHost"), ("KUBERNETES_SERVICE_PORT", "apiServerPort")):
        assert env[var]["valueFrom"] == {"configMapKeyRef": {"name": "bgp-fabric-config", "key": key, "optional": True}}


def _agent_cfg():
    return parse({"node": {"name": "n1", "address": "10.0.1.11/24"}, **yaml.safe_load(agent_config_text())})


def test_init_container_sets_every_sysctl_the_agent_wants() -> None:
    """The agent's container can't write /proc/sys: each sysctl it checks is set by prepare-node."""
    from loadbalancer.ipvs_kernel import sysctls
    (init,) = [c for c in find("DaemonSet")["spec"]["template"]["spec"]["initContainers"] if c["name"] == "prepare-node"]
    script = init["command"][-1]
    cfg = _agent_cfg()
    wanted = dict(sysctls(cfg.services.device, "5.4.0")) | {"net/ipv4/ip_forward": "1"}  # old kernel: all of them
    for path, value in wanted.items():
        assert re.search(rf"^\s*(if .*then )?w {re.escape(path)} {value}\b", script, re.M), path
    assert f"ip link add {cfg.services.device} type dummy" in script  # its device sysctls need the device


def test_cni_paths_of_the_config_are_the_hosts() -> None:
    """What the agent writes for the runtime (conflist, socket) and keeps (IPAM) is on the host, at the
    paths the plugin and the runtime use."""
    cfg = _agent_cfg()
    assert cfg.cni.enabled
    pod = find("DaemonSet")["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: vols[m["name"]] for m in agent["volumeMounts"]}
    for path in (cfg.cni.conf_dir, str(Path(cfg.cni.socket).parent), cfg.cni.state_dir):
        assert mounts[path]["hostPath"]["path"] == path, path
    assert not cfg.cni.state_dir.startswith("/run")  # on disk: allocations survive a reboot
    (install,) = [c for c in pod["initContainers"] if c["name"] == "install-cni"]
    imounts = {m["mountPath"]: vols[m["name"]] for m in install["volumeMounts"]}
    assert imounts["/host/opt/cni/bin"]["hostPath"]["path"] == "/opt/cni/bin"


def test_install_cni_script_installs_the_plugin_atomically(tmp_path: Path) -> None:
    from cni.build import plugin
    (install,) = [c for c in find("DaemonSet")["spec"]["template"]["spec"]["initContainers"] if c["name"] == "install-cni"]
    script = install["command"][-1]
    image_path = "/usr/lib/bgp-fabric/cni/bgp-fabric"
    assert f"COPY --from=cni-plugin /out/bgp-fabric {image_path}" in (ROOT / "Dockerfile").read_text()
    (tmp_path / "bin").mkdir()
    script = script.replace(image_path, str(plugin())).replace("/host/opt/cni/bin", str(tmp_path / "bin"))
    r = subprocess.run(install["command"][:-1] + [script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in (tmp_path / "bin").iterdir()] == ["bgp-fabric"]
    assert oct((tmp_path / "bin" / "bgp-fabric").stat().st_mode & 0o777) == "0o755"
    v = subprocess.run([str(tmp_path / "bin" / "bgp-fabric")], env={"CNI_COMMAND": "VERSION"}, input=b"{}",
                       capture_output=True)
    assert v.returncode == 0 and b"supportedVersions" in v.stdout


def test_dockerfile_builds_the_plugin_as_the_tests_do() -> None:
    from cni.build import CFLAGS
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"gcc (.*) -o /out/bgp-fabric /src/bgp-fabric.c", text)
    assert m and m.group(1).split() == CFLAGS


def test_dockerignore_keeps_every_ignored_and_cache_folder_out() -> None:
    ignored = {ln.strip().rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for ln in (ROOT / ".gitignore").read_text().splitlines():
        entry = ln.strip().rstrip("/")
        if entry and not entry.startswith("#"):
            assert entry in ignored or f"**/{entry}" in ignored, entry
    assert {".cache", ".git", ".venv", "tests"} <= ignored


def test_config_map_holds_a_valid_kubernetes_source_config() -> None:
    data = yaml.safe_load(agent_config_text())
    assert "node" not in data  # per node, added by render-config
    cfg = parse({"node": {"name": "n1", "address": "10.0.1.11/24"}, **data})
    assert cfg.source.kind == "kubernetes" and cfg.source.kubeconfig is None


def test_render_config_script_writes_a_config_that_checks(tmp_path: Path) -> None:
    """Run the init container's script here (node address 127.0.0.1, held by lo as 127.0.0.1/8)."""
    (init,) = [c for c in find("DaemonSet")["spec"]["template"]["spec"]["initContainers"]
               if c["name"] == "render-config"]
    script = init["command"][-1]
    (tmp_path / "template").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "template" / "config.yaml").write_text(agent_config_text())
    script = script.replace("/etc/bgp-fabric-template", str(tmp_path / "template"))
    script = script.replace("/etc/bgp-fabric/", str(tmp_path / "out") + "/")
    script = re.sub(r"\bexec fabric ", f"exec {Path(sys.executable).parent / 'fabric'} ", script)
    env = {**os.environ, "NODE_NAME": "node-a1", "HOST_IP": "127.0.0.1"}
    r = subprocess.run(init["command"][:-1] + [script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cfg = parse(yaml.safe_load((tmp_path / "out" / "config.yaml").read_text()))
    assert cfg.node.name == "node-a1" and str(cfg.node.address) == "127.0.0.1/8"
    r = subprocess.run(init["command"][:-1] + [script], env={**env, "HOST_IP": "192.0.2.99"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no interface holds the node address 192.0.2.99" in r.stderr


def test_examples_are_used_by_the_agent_without_problems() -> None:
    objects: dict[str, dict[str, Any]] = {}
    for where, d in DOCS:
        if where.startswith("examples/") and d["apiVersion"] == "bgp-fabric.io/v1":
            objects.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    assert set(objects) == {"BGPPeer", "IPPool", "BGPConfiguration"}
    base = parse({"node": {"name": "n1", "address": "10.0.1.11/24"}, **yaml.safe_load(agent_config_text())})
    cfg, problems = CrdConfig().effective(base, objects, lambda name, key: "change-me")
    assert problems == []
    assert [p.name for p in cfg.peers] == ["tor-r1"] and cfg.peers[0].node_selector == {
        "topology.kubernetes.io/rack": "r1"}
    assert [str(p.cidr) for p in cfg.pools] == ["10.244.0.0/16"]


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert [ln for ln in lines if ln.startswith("FROM ")] == ["FROM python:3.11-slim-bookworm AS cni-plugin",
                                                               "FROM python:3.11-slim-bookworm"]
    for pkg in ("iproute2", "ipvsadm", "nftables", "conntrack", "kmod"):
        assert re.search(rf"apt-get install .*\b{pkg}\b", text.split("FROM python:3.11-slim-bookworm\n")[1]), pkg
    assert "pip install ." in text
    assert lines[-1] == 'ENTRYPOINT ["fabric", "agent", "-c", "/etc/bgp-fabric/config.yaml"]'
    mounts = {m["mountPath"] for m in find("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert "/etc/bgp-fabric" in mounts
