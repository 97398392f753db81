"""The CNI spec as bgp-fabric's plugin speaks it: versions, error codes, requests and results (pure).

Spec 1.1 (https://github.com/containernetworking/cni/blob/main/SPEC.md): verbs ADD, DEL, CHECK,
VERSION, GC, STATUS; errors are `{cniVersion, code, msg, details}` on stdout with a non-zero exit.
Results are shaped for the version the runtime asked for (0.3.x/0.4.0 results carry `version` in
each IP; 1.x results do not). The plugin's own network configuration keys:

- `socket` (required): the agent's unix socket (the shim reads it; the agent writes it).
- `mtu`: the pod interface MTU (the agent writes underlay MTU − 20 when a pool uses IPIP).
- `capabilities: {portMappings: true}`: the runtime then passes `runtimeConfig.portMappings`.

Any other key of the plugin's configuration is refused (error 2, unsupported field): nothing is
accepted and ignored.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
PLUGIN_TYPE = "bgp-fabric"

# Well-known error codes (spec "Error").
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN = 11
NOT_AVAILABLE = 50
# Plugin-specific (100+).
ADDRESS_EXHAUSTED = 100
CHECK_FAILED = 101
INTERFACE_EXISTS = 102

# The keys a runtime puts into the plugin's configuration (spec section 3), and ours.
RUNTIME_KEYS = {"cniVersion", "cniVersions", "name", "type", "runtimeConfig", "prevResult", "args",
                "disableCheck", "disableGC", "cni.dev/valid-attachments", "capabilities"}
# CNI_ARGS keys we read (kubelet's); others are refused unless IgnoreUnknown=1 (CNI conventions).
KNOWN_ARGS = {"IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID"}
PLUGIN_KEYS = {"socket", "mtu"}

CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
IFNAME_BAD = re.compile(r"[/:\s]")


class CniError(Exception):
    """A CNI error result: `code` (spec well-known or 100+), `msg`, `details`."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


@dataclass(frozen=True)
class PortMapping:
    """One `runtimeConfig.portMappings` entry (CNI conventions): hostIP empty = every node address."""

    host_port: int
    container_port: int
    protocol: str  # tcp | udp | sctp
    host_ip: ipaddress.IPv4Address | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hostPort": self.host_port, "containerPort": self.container_port,
                               "protocol": self.protocol}
        if self.host_ip is not None:
            out["hostIP"] = str(self.host_ip)
        return out

    @staticmethod
    def from_json(d: Any, where: str) -> "PortMapping":
        if not isinstance(d, dict):
            raise CniError(INVALID_CONFIG, f"{where}: must be an object")
        unknown = set(d) - {"hostPort", "containerPort", "protocol", "hostIP"}
        if unknown:
            raise CniError(UNSUPPORTED_FIELD, f"{where}: unsupported key(s) {', '.join(sorted(unknown))}")
        ports = []
        for key in ("hostPort", "containerPort"):
            v = d.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
                raise CniError(INVALID_CONFIG, f"{where}.{key}: must be a port number 1-65535")
            ports.append(v)
        proto = str(d.get("protocol") or "tcp").lower()
        if proto not in ("tcp", "udp", "sctp"):
            raise CniError(INVALID_CONFIG, f"{where}.protocol: {d.get('protocol')!r} is not tcp, udp or sctp")
        host_ip = None
        raw = d.get("hostIP")
        if raw not in (None, "", "0.0.0.0"):
            try:
                host_ip = ipaddress.IPv4Address(raw)
            except ValueError:
                raise CniError(UNSUPPORTED_FIELD, f"{where}.hostIP: {raw!r} is not an IPv4 address "
                                                  "(bgp-fabric is IPv4 only)") from None
        return PortMapping(ports[0], ports[1], proto, host_ip)


@dataclass(frozen=True)
class Request:
    """One plugin invocation, validated: the verb, its environment and the plugin configuration."""

    command: str
    version: str
    network: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    pod: str = ""  # namespace/name from CNI_ARGS (kubelet passes it), for status and logs
    mtu: int | None = None
    port_mappings: tuple[PortMapping, ...] = ()
    prev_result: dict[str, Any] | None = None
    valid_attachments: frozenset[tuple[str, str]] | None = None  # GC
    netns_error: str = ""  # why the plugin could not open CNI_NETNS
    config: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return self.container_id, self.ifname


def parse_request(env: dict[str, str], stdin: bytes) -> Request:
    """Validate the environment and configuration of one invocation; raises CniError naming the field."""
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(INVALID_ENV, f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}")
    try:
        conf = json.loads(stdin or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise CniError(DECODE_FAILURE, "cannot decode the network configuration", str(e)) from None
    if not isinstance(conf, dict):
        raise CniError(DECODE_FAILURE, "the network configuration must be a JSON object")
    version = conf.get("cniVersion")
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    if command in ("GC", "STATUS") and version_key(version) < (1, 1, 0):
        raise CniError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0 or later (got {version})")
    if command == "CHECK" and version_key(version) < (0, 4, 0):
        raise CniError(INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later (got {version})")
    if conf.get("type", PLUGIN_TYPE) != PLUGIN_TYPE:
        raise CniError(INVALID_CONFIG, f"type {conf.get('type')!r}: this plugin is {PLUGIN_TYPE!r}")
    unknown = set(conf) - RUNTIME_KEYS - PLUGIN_KEYS
    if unknown:
        raise CniError(UNSUPPORTED_FIELD, f"unsupported configuration key(s): {', '.join(sorted(unknown))}")
    name = conf.get("name")
    if not isinstance(name, str) or not name:
        raise CniError(INVALID_CONFIG, "name: the network's name is required")
    mtu = conf.get("mtu")
    if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool) or not 576 <= mtu <= 65535):
        raise CniError(INVALID_CONFIG, f"mtu: {mtu!r} must be an integer 576-65535")

    req: dict[str, Any] = {"command": command, "version": version, "network": name, "mtu": mtu, "config": conf,
                           "netns_error": env.get("BGPFABRIC_NETNS_ERROR", "")}
    if command in ("ADD", "DEL", "CHECK"):
        cid = env.get("CNI_CONTAINERID", "")
        if not CONTAINER_ID_RE.match(cid):
            raise CniError(INVALID_ENV, f"CNI_CONTAINERID {cid!r}: must start with a letter or digit, then letters, "
                                        "digits, '_', '.' or '-'")
        ifname = env.get("CNI_IFNAME", "")
        if not ifname or len(ifname) > 15 or ifname in (".", "..") or IFNAME_BAD.search(ifname):
            raise CniError(INVALID_ENV, f"CNI_IFNAME {ifname!r} is not a valid interface name")
        netns = env.get("CNI_NETNS", "")
        if command != "DEL" and not netns:
            raise CniError(INVALID_ENV, f"CNI_NETNS is required for {command}")
        req.update(container_id=cid, ifname=ifname, netns=netns, pod=pod_of(env.get("CNI_ARGS", "")))
    if conf.get("args"):  # the `args` conventions (static IPs, MACs, labels) are not implemented
        raise CniError(UNSUPPORTED_FIELD, f"args: unsupported ({', '.join(sorted(map(str, conf['args'])))})")
    rc = conf.get("runtimeConfig") or {}
    if not isinstance(rc, dict):
        raise CniError(INVALID_CONFIG, "runtimeConfig: must be an object")
    unknown_rc = set(rc) - {"portMappings"}
    if unknown_rc:  # only capabilities we declare may be passed to us
        raise CniError(UNSUPPORTED_FIELD, f"runtimeConfig: unsupported capability {', '.join(sorted(unknown_rc))}")
    pms = rc.get("portMappings") or []
    if not isinstance(pms, list):
        raise CniError(INVALID_CONFIG, "runtimeConfig.portMappings: must be a list")
    mappings = tuple(PortMapping.from_json(p, f"runtimeConfig.portMappings[{i}]") for i, p in enumerate(pms))
    seen: dict[tuple[Any, ...], int] = {}
    for i, m in enumerate(mappings):
        k = (m.host_ip, m.protocol, m.host_port)
        if k in seen:
            raise CniError(INVALID_CONFIG, f"runtimeConfig.portMappings[{i}]: hostPort {m.host_port}/{m.protocol} "
                                           f"repeats portMappings[{seen[k]}]")
        seen[k] = i
    req["port_mappings"] = mappings
    prev = conf.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "prevResult: must be an object")
    req["prev_result"] = prev
    if command == "CHECK" and prev is None:
        raise CniError(INVALID_CONFIG, "prevResult: CHECK needs the result of the ADD")
    if command == "GC":
        va = conf.get("cni.dev/valid-attachments")
        if not isinstance(va, list):
            raise CniError(INVALID_CONFIG, "cni.dev/valid-attachments: GC needs the list of valid attachments")
        valid = set()
        for i, a in enumerate(va):
            if not isinstance(a, dict) or not isinstance(a.get("containerID"), str) or not isinstance(a.get("ifname"), str):
                raise CniError(INVALID_CONFIG, f"cni.dev/valid-attachments[{i}]: needs containerID and ifname")
            valid.add((a["containerID"], a["ifname"]))
        req["valid_attachments"] = frozenset(valid)
    return Request(**req)


def pod_of(cni_args: str) -> str:
    """`namespace/name` from CNI_ARGS; raises CniError for keys we don't know unless IgnoreUnknown is set."""
    kv: dict[str, str] = {}
    for part in filter(None, cni_args.split(";")):
        k, sep, v = part.partition("=")
        if not sep or not k:
            raise CniError(INVALID_ENV, f"CNI_ARGS: {part!r} is not KEY=VALUE")
        kv[k] = v
    unknown = set(kv) - KNOWN_ARGS
    if unknown and kv.get("IgnoreUnknown", "").lower() not in ("1", "true"):
        raise CniError(INVALID_ENV, f"CNI_ARGS: unknown key(s) {', '.join(sorted(unknown))} (and no IgnoreUnknown=1)")
    ns, name = kv.get("K8S_POD_NAMESPACE", ""), kv.get("K8S_POD_NAME", "")
    return f"{ns}/{name}" if ns and name else ""


@dataclass(frozen=True)
class Attachment:
    """What ADD built for one (container, ifname): the facts a result and CHECK are made of."""

    container_id: str
    ifname: str
    address: ipaddress.IPv4Address
    host_ifname: str
    host_mac: str
    pod_mac: str
    netns: str
    mtu: int
    gateway: ipaddress.IPv4Address


def result(version: str, a: Attachment) -> dict[str, Any]:
    """The ADD result for `version`: the host and pod interfaces, the /32 address, the default route."""
    ip: dict[str, Any] = {"address": f"{a.address}/32", "gateway": str(a.gateway), "interface": 1}
    if version_key(version) < (1, 0, 0):
        ip["version"] = "4"
    host_if: dict[str, Any] = {"name": a.host_ifname, "mac": a.host_mac}
    pod_if: dict[str, Any] = {"name": a.ifname, "mac": a.pod_mac, "sandbox": a.netns}
    if version_key(version) >= (1, 1, 0):
        host_if["mtu"] = a.mtu
        pod_if["mtu"] = a.mtu
    return {"cniVersion": version, "interfaces": [host_if, pod_if], "ips": [ip],
            "routes": [{"dst": "0.0.0.0/0", "gw": str(a.gateway)}], "dns": {}}


def encode(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()
