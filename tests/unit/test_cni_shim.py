"""The plugin executable (cni/shim/bgp-fabric.c) against the agent's real socket server (cni.server),
with a recording handler instead of the CNI service: what it sends, what it relays, and what it does
when the agent is not there. Runs here as root; needs a C compiler (scripts/setup installs gcc)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from cni import spec
from cni.build import plugin
from cni.server import CniServer, ProtocolError, parse
from cni.service import Fds

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


@pytest.fixture(scope="module")
def exe() -> str:
    return str(plugin())


def run(exe: str, env: dict, conf, timeout: float = 30) -> tuple[int, str]:
    data = conf if isinstance(conf, (bytes, str)) else json.dumps(conf)
    r = subprocess.run([exe], env=env, input=data if isinstance(data, bytes) else data.encode(),
                       capture_output=True, timeout=timeout)
    return r.returncode, r.stdout.decode()


class Recorder:
    def __init__(self, answer: tuple[int, bytes] = (0, b'{"ok":1}\n')) -> None:
        self.calls: list[tuple[dict, bytes, int]] = []
        self.answer = answer

    def __call__(self, env: dict, stdin: bytes, fds: Fds) -> tuple[int, bytes]:
        kinds = []
        for fd in (fds.netns, fds.netlink):
            if fd is not None:
                kinds.append(os.readlink(f"/proc/self/fd/{fd}"))
        self.calls.append((env, stdin, len(kinds)))
        self.kinds = kinds
        return self.answer


@pytest.fixture
def agent(tmp_path: Path):
    rec = Recorder()
    srv = CniServer(tmp_path / "cni.sock", rec)
    srv.start()
    yield srv, rec
    srv.stop()


def test_version_is_answered_without_the_agent_and_matches_the_service(exe: str) -> None:
    rc, out = run(exe, {"CNI_COMMAND": "VERSION"}, {"cniVersion": "1.0.0"})
    assert rc == 0 and json.loads(out)["supportedVersions"] == list(spec.SUPPORTED_VERSIONS)


def test_request_carries_env_stdin_and_the_pods_namespace(exe: str, agent, tmp_path: Path) -> None:
    srv, rec = agent
    conf = {"cniVersion": "1.1.0", "name": "n", "type": "bgp-fabric", "socket": str(srv.path),
            "prevResult": {"socket": "not this one"}, "x": [1, {"y": "z\"}"}]}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_ARGS": "K8S_POD_NAME=p", "CNI_PATH": "/opt/cni/bin", "SECRET": "not sent"}
    rc, out = run(exe, env, conf)
    assert (rc, out) == (0, '{"ok":1}\n')
    (got_env, stdin, nfds), = rec.calls
    assert got_env == {k: v for k, v in env.items() if k.startswith("CNI_")}
    assert json.loads(stdin) == conf
    assert nfds == 2 and rec.kinds[0].startswith("net:[") and rec.kinds[1].startswith("socket:[")


def test_error_status_and_body_are_relayed(exe: str, tmp_path: Path) -> None:
    srv = CniServer(tmp_path / "s.sock", Recorder((1, b'{"cniVersion":"1.0.0","code":100,"msg":"full"}\n')))
    srv.start()
    try:
        rc, out = run(exe, {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_NETNS": "/nope"},
                      {"cniVersion": "1.0.0", "socket": str(srv.path)})
    finally:
        srv.stop()
    assert rc == 1 and json.loads(out)["code"] == 100


def test_an_unusable_netns_is_reported_to_the_agent(exe: str, agent) -> None:
    srv, rec = agent
    run(exe, {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_NETNS": "/nope/ns"},
        {"cniVersion": "1.0.0", "socket": str(srv.path)})
    env, _, nfds = rec.calls[-1]
    assert nfds == 0 and env["BGPFABRIC_NETNS_ERROR"].startswith("open /nope/ns:")


@pytest.mark.parametrize("command,code", [("ADD", 11), ("CHECK", 11), ("GC", 11), ("STATUS", 50)])
def test_agent_not_reachable(exe: str, tmp_path: Path, command: str, code: int) -> None:
    rc, out = run(exe, {"CNI_COMMAND": command, "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0"},
                  {"cniVersion": "1.1.0", "socket": str(tmp_path / "missing.sock")})
    err = json.loads(out)
    assert rc == 1 and err["code"] == code and err["cniVersion"] == "1.1.0" and "missing.sock" in err["details"]


def test_del_succeeds_without_the_agent(exe: str, tmp_path: Path) -> None:
    rc, out = run(exe, {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0"},
                  {"cniVersion": "1.0.0", "socket": str(tmp_path / "missing.sock")})
    assert (rc, out) == (0, "")


def test_agent_closing_without_an_answer(exe: str, tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen(1)

    def mute() -> None:
        c, _ = s.accept()
        while c.recv(65536):  # the whole request, then close without a word (an agent dying mid-request)
            pass
        c.close()

    t = threading.Thread(target=mute)
    t.start()
    rc, out = run(exe, {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0"},
                  {"cniVersion": "1.0.0", "socket": str(path)})
    t.join()
    s.close()
    assert rc == 1 and json.loads(out)["code"] == 11 and json.loads(out)["msg"] == "bgp-fabric agent did not answer"


@pytest.mark.parametrize("conf,code", [
    ({"cniVersion": "1.0.0"}, 7),  # no socket
    ('{"socket": 12}', 6), ("{", 6), ("[]", 6), ('{"socket": "\\u00e9"}', 6),
])
def test_bad_configuration(exe: str, conf, code: int) -> None:
    rc, out = run(exe, {"CNI_COMMAND": "ADD"}, conf)
    assert rc == 1 and json.loads(out)["code"] == code, out


def test_no_command(exe: str) -> None:
    rc, out = run(exe, {}, {"cniVersion": "1.0.0"})
    assert rc == 1 and json.loads(out)["code"] == 4


def test_server_protocol_parse() -> None:
    env, stdin = parse(b"BGPFABRIC-CNI 1\nCNI_COMMAND=ADD\0OTHER=x\0BGPFABRIC_NETNS_ERROR=e\0\0{}")
    assert env == {"CNI_COMMAND": "ADD", "BGPFABRIC_NETNS_ERROR": "e"} and stdin == b"{}"
    for bad in (b"GET / HTTP/1.0\r\n", b"BGPFABRIC-CNI 1\nCNI_COMMAND=ADD"):
        with pytest.raises(ProtocolError):
            parse(bad)


def test_server_refuses_other_users(tmp_path: Path, exe: str) -> None:
    rec = Recorder()
    srv = CniServer(tmp_path / "cni.sock", rec, allowed_uids=(12345,))
    srv.start()
    try:
        assert oct(os.stat(srv.path).st_mode & 0o777) == "0o600"
        rc, out = run(exe, {"CNI_COMMAND": "ADD"}, {"cniVersion": "1.0.0", "socket": str(srv.path)})
    finally:
        srv.stop()
    assert rc == 1 and json.loads(out)["code"] == 11 and rec.calls == []
    assert not srv.path.exists()
