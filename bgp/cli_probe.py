"""Run one Speaker driven by JSON lines on stdin; events and answers come back as JSON lines on stdout.

For labs and kernel tests: `ip netns exec NS python -m bgp.cli_probe RUN_DIR` runs a whole speaker
inside a namespace. Requests (one JSON object a line):
  {"op": "neighbors", "neighbors": [{Neighbor fields}, ...]}
  {"op": "announce", "routes": [{"prefix": ..., "next_hop": ..., "communities": [...], "local_pref": ...,
                                 "med": ..., "neighbors": [...] | null}, ...]}   (the whole desired set)
  {"op": "update", "routes": [{...as above}], "withdraw": [prefix, ...]}
                            -> per-prefix changes to the announced set (Speaker.update_announcements;
                               a reflector publishes its whole set instead)
  {"op": "reflect", "cluster_id": ..., "router_id": ..., "clients": [names], "non_clients": [names]}
                            -> be a route reflector: what the iBGP neighbors announce is reflected
                               (bgp.reflect) besides the announced set, recomputed after every event
  {"op": "status"}          -> {"status": {...}}
  {"op": "stop"}            -> stops the speaker and exits
BGP_PROBE_CHUNK=N in the environment sets how many prefixes go in one ExaBGP command (benchmarks).
Every event is printed as {"event": "PeerUp", ...fields}; each request is answered with {"ok": true}
or {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from bgp import announce
from bgp.announce import Announcement
from bgp.events import BgpEvent
from bgp.reflect import Reflector, reflect_all
from bgp.rib import Rib
from bgp.exabgp_config import Neighbor, NeighborError
from bgp.speaker import Speaker


def _jsonable(v: Any) -> Any:
    if isinstance(v, (IPv4Address, IPv4Network)):
        return str(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (tuple, list, set, frozenset)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def event_json(ev: BgpEvent) -> dict[str, Any]:
    d = {f.name: _jsonable(getattr(ev, f.name)) for f in dataclasses.fields(ev)}
    d["event"] = type(ev).__name__
    return d


def neighbor_from(d: dict[str, Any]) -> Neighbor:
    d = dict(d)
    for k in ("peer_address", "local_address", "router_id", "cluster_id"):
        if d.get(k) is not None:
            d[k] = IPv4Address(d[k])
    return Neighbor(**d)


def announcement_from(d: dict[str, Any]) -> Announcement:
    nh = d["next_hop"]
    return Announcement(
        prefix=IPv4Network(d["prefix"]), next_hop="self" if nh == "self" else IPv4Address(nh),
        communities=tuple(d.get("communities", ())), local_pref=d.get("local_pref"), med=d.get("med"),
        neighbors=frozenset(d["neighbors"]) if d.get("neighbors") is not None else None)


def _out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(run_dir: str) -> int:
    chunk = os.environ.get("BGP_PROBE_CHUNK")  # benchmarks: prefixes per ExaBGP command (1 = one per route)
    if chunk:
        announce.CHUNK = int(chunk)
    loop = asyncio.get_running_loop()
    own: dict[IPv4Network, Announcement] = {}
    rib = Rib()
    reflector: Reflector | None = None
    publishing: list[asyncio.Task[None]] = []

    async def publish() -> None:
        publishing.clear()
        desired = dict(own)
        if reflector is not None:
            for prefix, a in reflect_all(reflector, {p: rib.paths(p) for p in rib.routes()}).items():
                desired.setdefault(prefix, a)  # our own announcement of a prefix wins
        await speaker.set_announcements(desired)

    def on_event(ev: BgpEvent) -> None:
        _out(event_json(ev))
        if rib.apply(ev, time.monotonic()) and reflector is not None and not publishing:
            publishing.append(loop.create_task(publish()))

    speaker = Speaker(Path(run_dir), on_event)
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    started = False
    while True:
        line = await reader.readline()
        if not line:
            break
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "neighbors":
                await speaker.set_neighbors([neighbor_from(n) for n in req["neighbors"]])
                if not started:
                    await speaker.start()
                    started = True
                _out({"ok": True, "op": op})
            elif op == "announce":
                own = {a.prefix: a for a in (announcement_from(r) for r in req["routes"])}
                await publish()
                _out({"ok": True, "op": op})
            elif op == "update":
                changes: dict[IPv4Network, Announcement | None] = {
                    IPv4Network(p): None for p in req.get("withdraw", ())}
                changes.update({a.prefix: a for a in (announcement_from(r) for r in req.get("routes", ()))})
                for prefix, a in changes.items():
                    if a is None:
                        own.pop(prefix, None)
                    else:
                        own[prefix] = a
                if reflector is None:
                    await speaker.update_announcements(changes)
                else:
                    await publish()
                _out({"ok": True, "op": op})
            elif op == "reflect":
                reflector = Reflector(IPv4Address(req["cluster_id"]), IPv4Address(req["router_id"]),
                                      frozenset(req["clients"]), frozenset(req.get("non_clients", ())))
                await publish()
                _out({"ok": True, "op": op})
            elif op == "status":
                _out({"status": _jsonable(speaker.status())})
            elif op == "stop":
                break
            else:
                _out({"error": f"unknown op {op!r}"})
        except (NeighborError, ValueError, KeyError, TypeError) as e:
            _out({"error": f"{type(e).__name__}: {e}"})
    if started:
        await speaker.stop()
    _out({"stopped": True})
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m bgp.cli_probe RUN_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(main(sys.argv[1])))


class ProbeClient:
    """Drive a `cli_probe` speaker in a network namespace from another process (tests, labs)."""

    def __init__(self, netns: str | None, run_dir: str | Path, python: str | None = None) -> None:
        import subprocess
        import threading
        cmd = [python or sys.executable, "-m", "bgp.cli_probe", str(run_dir)]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._seen = 0  # index of the first line a `wait_for(fresh=True)` may match
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                obj = {"raw": line.rstrip("\n")}
            with self._cond:
                self.lines.append(obj)
                self._cond.notify_all()
        with self._cond:
            self.lines.append({"exited": True})
            self._cond.notify_all()

    def mark(self) -> int:
        """Position to wait from: `wait_for(..., after=mark)` ignores what came before."""
        with self._cond:
            return len(self.lines)

    def send(self, req: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def request(self, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        at = self.mark()
        self.send(req)
        return self.wait_for(lambda o: "ok" in o or "error" in o or "status" in o, timeout, after=at)

    def status(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.request({"op": "status"}, timeout)["status"]

    def wait_for(self, pred: Any, timeout: float, after: int = 0) -> dict[str, Any]:
        import time
        deadline = time.monotonic() + timeout
        i = after
        with self._cond:
            while True:
                while i < len(self.lines):
                    obj = self.lines[i]
                    i += 1
                    if pred(obj):
                        return obj
                    if obj.get("exited"):
                        raise AssertionError(f"probe exited; last lines: {self.lines[-10:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s; last lines: {self.lines[-10:]}")
                self._cond.wait(left)

    def events(self, name: str, after: int = 0) -> list[dict[str, Any]]:
        with self._cond:
            return [o for o in self.lines[after:] if o.get("event") == name]

    def close(self, timeout: float = 20.0) -> None:
        import subprocess
        if self.proc.poll() is None:
            try:
                self.send({"op": "stop"})
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
