"""Pods in labs, created through the CNI path as a node's container runtime creates them.

A topology node labelled `bgp-fabric.io/node: <agent node>` is a pod on that node. The runner makes
its network namespace like any node's, waits until the agent there has written its conflist (the
agent's `cni.confDir`/`cni.confFile`), then runs the plugin the conflist names exactly as libcni runs
it, in the agent node's network namespace (where kubelet's runtime would run it):

    CNI_COMMAND=ADD CNI_CONTAINERID=<lab>-<run>-<pod> CNI_NETNS=/run/netns/<pod's namespace>
    CNI_IFNAME=eth0 CNI_ARGS=K8S_POD_NAMESPACE=<lab>;K8S_POD_NAME=<pod> CNI_PATH=<plugin folders>
    stdin: the conflist's plugin entry with the list's name and cniVersion, `capabilities` removed

and at teardown the same with DEL. The pod's address is whatever the agent's IPAM hands out (the
first usable address of the node's pod CIDR on a fresh node). Adapter: runs what it is told.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabric.lab import netns

POD_LABEL = "bgp-fabric.io/node"
IFNAME = "eth0"
PLUGIN_TIMEOUT = 60.0
REFERENCE_PLUGIN_DIRS = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))


class PodError(RuntimeError):
    pass


@dataclass(frozen=True)
class Attached:
    container_id: str
    address: str  # the pod's IPv4 address
    result: dict[str, Any]
    seconds: float  # how long the ADD took


def conflist_path(config_data: Any, config_path: Path) -> Path | None:
    """Where the agent of this config writes its conflist (None when its CNI part is off)."""
    cni = config_data.get("cni") if isinstance(config_data, dict) else None
    if not isinstance(cni, dict) or cni.get("enabled") is not True:
        return None
    conf_dir = Path(str(cni.get("confDir", "/etc/cni/net.d")))
    conf_dir = conf_dir if conf_dir.is_absolute() else (config_path.parent / conf_dir)
    return conf_dir / str(cni.get("confFile", "10-bgp-fabric.conflist"))


def plugin_dirs() -> list[Path]:
    """Where the runner looks for the conflist's plugin: our built plugin first, then the usual folders."""
    from cni.build import plugin

    return [plugin().parent, *REFERENCE_PLUGIN_DIRS]


def plugin_config(conflist: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(plugin type, the configuration libcni hands the first plugin of the list)."""
    plugins = conflist.get("plugins")
    if not isinstance(plugins, list) or not plugins or not isinstance(plugins[0], dict):
        raise PodError("the conflist has no plugins")
    p = dict(plugins[0])
    p.pop("capabilities", None)
    return str(p.get("type")), {**p, "name": conflist.get("name"), "cniVersion": conflist.get("cniVersion")}


def wait_for_conflist(path: Path, deadline: float, alive) -> dict[str, Any]:
    while True:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            pass
        except ValueError as e:
            raise PodError(f"{path}: not JSON ({e})") from None
        if time.monotonic() > deadline:
            raise PodError(f"no conflist at {path} (the agent writes it once it knows the node's pod CIDRs)")
        if not alive():
            raise PodError(f"the agent exited before writing {path}")
        time.sleep(0.2)  # lab setup only: the agent is starting


def invoke(node_ns: str, command: str, conflist: dict[str, Any], *, container_id: str, pod_ns: str,
           pod: str, lab: str, prev_result: dict[str, Any] | None = None) -> tuple[int, dict[str, Any] | None, str]:
    kind, conf = plugin_config(conflist)
    if prev_result is not None:
        conf["prevResult"] = prev_result
    dirs = plugin_dirs()
    exe = next((d / kind for d in dirs if (d / kind).is_file()), None)
    if exe is None:
        raise PodError(f"plugin {kind!r} not found in {', '.join(map(str, dirs))}")
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": f"/run/netns/{pod_ns}",
           "CNI_IFNAME": IFNAME, "CNI_ARGS": f"K8S_POD_NAMESPACE={lab};K8S_POD_NAME={pod}",
           "CNI_PATH": os.pathsep.join(map(str, dirs)), "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    r = subprocess.run(netns.exec_cmd(node_ns, [str(exe)]), env=env, input=json.dumps(conf), capture_output=True,
                       text=True, timeout=PLUGIN_TIMEOUT)
    try:
        out = json.loads(r.stdout) if r.stdout.strip() else None
    except ValueError:
        out = None
    return r.returncode, out, (r.stderr or r.stdout).strip()


def add(node_ns: str, conflist: dict[str, Any], *, container_id: str, pod_ns: str, pod: str, lab: str) -> Attached:
    t0 = time.monotonic()
    rc, out, text = invoke(node_ns, "ADD", conflist, container_id=container_id, pod_ns=pod_ns, pod=pod, lab=lab)
    if rc != 0 or not out:
        msg = f"{out.get('msg')} ({out.get('details', '')})" if isinstance(out, dict) and "msg" in out else text
        raise PodError(f"CNI ADD failed: {msg}")
    try:
        address = str(out["ips"][0]["address"]).split("/")[0]
    except (KeyError, IndexError, TypeError):
        raise PodError(f"CNI ADD result has no address: {out}") from None
    return Attached(container_id, address, out, time.monotonic() - t0)


def delete(node_ns: str, conflist: dict[str, Any], a: Attached, *, pod_ns: str, pod: str, lab: str) -> str | None:
    """DEL (with the ADD's result as prevResult, as libcni does); returns an error text or None. Never raises."""
    try:
        rc, out, text = invoke(node_ns, "DEL", conflist, container_id=a.container_id, pod_ns=pod_ns, pod=pod, lab=lab,
                               prev_result=a.result)
    except (PodError, OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if rc != 0:
        return f"{out.get('msg')}" if isinstance(out, dict) else text
    return None
