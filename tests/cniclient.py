"""Drive a CNI plugin exactly as libcni does, and check results against the spec's result schema.

libcni (containernetworking/cni, libcni/api.go) runs a plugin with the CNI_* environment and the
plugin's configuration derived from the network configuration list on stdin: the plugin entry with
the list's `name` and `cniVersion` inserted, `capabilities` removed, `runtimeConfig` holding the
capability arguments the plugin declared, `prevResult` for CHECK and DEL, and (GC)
`cni.dev/valid-attachments`. The result is JSON on stdout; errors are JSON with a non-zero exit.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import jsonschema

_MAC = r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$"
_IPV4_CIDR = r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$"
_IPV4 = r"^\d{1,3}(\.\d{1,3}){3}$"

# The ADD result of spec 1.0.0 / 1.1.0 ("Success" in SPEC.md section 5), written from the spec text.
RESULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["cniVersion"],
    "properties": {
        "cniVersion": {"type": "string", "enum": ["1.0.0", "1.1.0"]},
        "interfaces": {"type": "array", "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 15},
                           "mac": {"type": "string", "pattern": _MAC},
                           "mtu": {"type": "integer", "minimum": 0},
                           "sandbox": {"type": "string"},
                           "socketPath": {"type": "string"}, "pciID": {"type": "string"}},
            "additionalProperties": False}},
        "ips": {"type": "array", "items": {
            "type": "object", "required": ["address"],
            "properties": {"address": {"type": "string", "pattern": _IPV4_CIDR},
                           "gateway": {"type": "string", "pattern": _IPV4},
                           "interface": {"type": "integer", "minimum": 0}},
            "additionalProperties": False}},
        "routes": {"type": "array", "items": {
            "type": "object", "required": ["dst"],
            "properties": {"dst": {"type": "string", "pattern": _IPV4_CIDR}, "gw": {"type": "string", "pattern": _IPV4},
                           "mtu": {"type": "integer"}, "advmss": {"type": "integer"}, "priority": {"type": "integer"},
                           "table": {"type": "integer"}, "scope": {"type": "integer"}},
            "additionalProperties": False}},
        "dns": {"type": "object", "properties": {
            "nameservers": {"type": "array", "items": {"type": "string"}}, "domain": {"type": "string"},
            "search": {"type": "array", "items": {"type": "string"}},
            "options": {"type": "array", "items": {"type": "string"}}}, "additionalProperties": False},
    },
    "additionalProperties": False,
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["cniVersion", "code", "msg"],
    "properties": {"cniVersion": {"type": "string"}, "code": {"type": "integer", "minimum": 1},
                   "msg": {"type": "string", "minLength": 1}, "details": {"type": "string"}},
    "additionalProperties": False,
}


def check_result(result: dict[str, Any]) -> None:
    jsonschema.validate(result, RESULT_SCHEMA)
    n = len(result.get("interfaces", []))
    for ip in result.get("ips", []):  # `interface` indexes into `interfaces`
        assert "interface" not in ip or ip["interface"] < n, ip


def check_error(err: dict[str, Any]) -> None:
    jsonschema.validate(err, ERROR_SCHEMA)


def plugin_config(conflist: dict[str, Any], *, capability_args: dict[str, Any] | None = None,
                  prev_result: dict[str, Any] | None = None, version: str | None = None,
                  valid_attachments: list[dict[str, str]] | None = None, index: int = 0) -> dict[str, Any]:
    """The configuration libcni hands plugin `index` of `conflist` (spec section 3)."""
    plugin = dict(conflist["plugins"][index])
    caps = plugin.pop("capabilities", {}) or {}
    conf = {**plugin, "name": conflist["name"], "cniVersion": version or conflist["cniVersion"]}
    rc = {k: v for k, v in (capability_args or {}).items() if caps.get(k)}
    if rc:
        conf["runtimeConfig"] = rc
    if prev_result is not None:
        conf["prevResult"] = prev_result
    if valid_attachments is not None:
        conf["cni.dev/valid-attachments"] = valid_attachments
    return conf


def invoke(plugin_cmd: list[str], command: str, conf: dict[str, Any], *, container_id: str = "",
           netns: str = "", ifname: str = "eth0", args: str = "", path: str = "/opt/cni/bin",
           timeout: float = 60) -> tuple[int, dict[str, Any] | None]:
    """Run the plugin once; (exit status, parsed stdout or None when empty)."""
    env = {"CNI_COMMAND": command, "CNI_PATH": path}
    if command in ("ADD", "DEL", "CHECK"):
        env.update(CNI_CONTAINERID=container_id, CNI_IFNAME=ifname, CNI_NETNS=netns)
        if args:
            env["CNI_ARGS"] = args
    r = subprocess.run(plugin_cmd, env=env, input=json.dumps(conf), capture_output=True, text=True, timeout=timeout)
    out = json.loads(r.stdout) if r.stdout.strip() else None
    if r.returncode != 0:
        assert out is not None, f"{command} failed without an error result: {r.stderr}"
        check_error(out)
    elif command == "ADD":
        assert out is not None
        check_result(out)
    return r.returncode, out
