"""ExaBGP's reactor made event-driven, plus connectRetry and keepalive (installed by bgp.exabgp_launch).

ExaBGP 5's loop (exabgp/reactor/loop.py) gives every peer a turn, then polls its sockets with a
timeout of reactor.speed / 100 = 10 ms: an idle speaker wakes 100 times a second and runs every
peer each time (~8% of the lab kernel's CPU per idle speaker). We keep its loop and replace two
things it calls:

- `Reactor._wait_for_io`: block on every fd that can bring work — session sockets, the API pipes,
  the listening sockets, sockets being connected, a signal wake-up pipe — until the earliest moment
  a timer's decision can change: a keepalive to send (SendTimer), hold or open timer expiry
  (ReceiveTimer, whole seconds as ExaBGP counts them), a reconnect back-off (Delay), a connect retry.
  Work already pending (a peer that asked to run again, API input, async callbacks) means no wait.
- `Reactor.active_peers`: after a wake caused only by some peers' own sockets or timers, only those
  peers get a turn; anything else (API input, a signal, a new connection, pending callbacks) gives
  every peer a turn, as ExaBGP does.

ExaBGP's timers keep their own logic (checked on each turn): we wake when their decisions can change,
so keepalives go out and hold timers expire in the same second as before.

`Outgoing.establish` is replaced too: ExaBGP retries a refused connect on every loop turn; here an
attempt (refused, failed, or unanswered after connectRetry seconds) is retried connectRetry seconds
after it started. And the keepalive interval of a session is the configured one when it is shorter
than the negotiated hold time / 3. Both are per neighbor, read from the timers file the speaker writes
next to the config (re-read on reload; a changed keepalive applies to running sessions at once).

Everything here reads ExaBGP internals (pinned to exabgp 5.0.x in pyproject.toml); `install()` checks
that each one exists and fails loudly when an upgrade moved one.
"""

from __future__ import annotations

import errno
import json
import math
import os
import select
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from bgp import exabgp_api

IN = select.POLLIN | select.POLLPRI
BAD = select.POLLHUP | select.POLLERR | select.POLLNVAL
MAX_WAIT = 60.0  # seconds; a safety net only: every wake-up source is watched or has a deadline
PAST_DUE_LIMIT = 3  # consecutive waits with a deadline already passed before falling back to ExaBGP's sleep
DEFAULT_CONNECT_RETRY = 5
ALL = "all"  # a wake-up that gives every peer a turn


# ----- per-neighbor timers (pure) ------------------------------------------------------------------

@dataclass(frozen=True)
class NeighborTimers:
    keepalive: int | None = None  # seconds; None: negotiated hold time / 3
    connect_retry: int = DEFAULT_CONNECT_RETRY


def parse_timers(text: str) -> dict[str, NeighborTimers]:
    """The timers file: {"neighbors": {"10.0.0.2": {"keepalive": 3, "connectRetry": 5}, ...}}."""
    doc = json.loads(text)
    out: dict[str, NeighborTimers] = {}
    for addr, t in (doc.get("neighbors") or {}).items():
        ka = t.get("keepalive")
        cr = t.get("connectRetry", DEFAULT_CONNECT_RETRY)
        if ka is not None and (not isinstance(ka, int) or ka < 1):
            raise ValueError(f"neighbor {addr}: keepalive {ka!r} must be a positive integer")
        if not isinstance(cr, int) or cr < 1:
            raise ValueError(f"neighbor {addr}: connectRetry {cr!r} must be a positive integer")
        out[str(addr)] = NeighborTimers(ka, cr)
    return out


def keepalive_interval(negotiated: int, configured: int | None) -> int:
    """Seconds between keepalives: ExaBGP's (negotiated hold / 3; 0 = none) unless ours is shorter."""
    if not negotiated:
        return 0
    return min(negotiated, configured) if configured else negotiated


def wait_timeout(now: float, deadlines: Iterable[float], urgent: bool, past_due_streak: int,
                 fallback: float) -> tuple[float | None, bool]:
    """Seconds to block (None: until an fd is ready, capped by the caller) and whether a deadline
    had already passed. A passed deadline means no wait, unless that keeps happening (something does
    not consume it): then ExaBGP's own sleep, so this is never busier than ExaBGP's own loop."""
    if urgent:
        return 0.0, False
    first = min(deadlines, default=None)
    if first is None:
        return None, False
    if first <= now:
        return (fallback if past_due_streak >= PAST_DUE_LIMIT else 0.0), True
    return first - now, False


# ----- the installed behaviour ---------------------------------------------------------------------

def _log_error(text: str) -> None:
    from exabgp.logger import log

    log.error(lambda: text, "reactor")  # into ExaBGP's own log, with its timestamps


class _State:
    def __init__(self) -> None:
        self.timers_path: Path | None = None
        self.timers: dict[str, NeighborTimers] = {}
        self.again: set[Any] = set()  # peers whose last turn asked to run again at once
        self.api_input = False  # the last loop turn read API commands: every peer runs next
        self.connecting: dict[str, "_Attempt"] = {}  # peer address -> its connect attempt
        self.wake_r = -1
        self.past_due = 0
        self.in_pending_check = False
        self.reactor: Any = None  # ExaBGP's Reactor (set on its first wait): reports go to its API processes
        self.reported: dict[str, tuple[str, str]] = {}  # peer address -> the last connect outcome reported

    def load_timers(self) -> None:
        if self.timers_path is None:
            return
        try:
            self.timers = parse_timers(self.timers_path.read_text())
        except (OSError, ValueError) as e:  # keep the last good timers; ExaBGP reports config errors itself
            _log_error(f"timers file {self.timers_path}: {e}; keeping the previous timers")

    def for_peer(self, address: str) -> NeighborTimers:
        return self.timers.get(address, NeighborTimers())


@dataclass
class _Attempt:
    outgoing: Any
    fd: int  # the socket being connected (-1: waiting to retry)
    until: float  # monotonic: end of this attempt / of the wait before the next


STATE = _State()
_orig: dict[str, Any] = {}


def _no_dns_at_import() -> None:
    """ExaBGP's hostname capability asks socket.getfqdn() when its module is imported (a reverse DNS
    lookup, whether the capability is used or not): on a node whose name is not in /etc/hosts that
    waits for DNS time-outs at every start (6 s in the lab, 10 s of a 11 s start). Its answer is only
    ever cut to the first label, which gethostname() gives without asking anyone."""
    from exabgp.util import dns

    name = socket.gethostname().split(".")[0] or "localhost"
    dns.__dict__["__host_name"] = dns.__dict__.get("__host_name") or name
    dns.__dict__["__domain_name"] = dns.__dict__.get("__domain_name") or name


def install(timers_path: Path | None) -> None:
    """Patch ExaBGP's classes (call before its reactor starts, in the main thread)."""
    _no_dns_at_import()  # first: the imports below load the hostname capability
    from exabgp.bgp import timer as bgp_timer
    from exabgp.reactor import keepalive, loop, peer
    from exabgp.reactor.network import outgoing

    targets = [(loop.Reactor, "_wait_for_io"), (loop.Reactor, "active_peers"), (loop.Reactor, "_pending_adjribout"),
               (loop.Reactor, "reload"), (peer.Peer, "run"), (keepalive.KA, "__init__"),
               (bgp_timer.ReceiveTimer, "__init__"), (outgoing.Outgoing, "establish")]
    missing = [f"{c.__name__}.{a}" for c, a in targets if not callable(getattr(c, a, None))]
    if missing:
        raise RuntimeError(f"exabgp internals moved ({', '.join(missing)}): bgp/exabgp_reactor.py needs updating")
    if _orig:
        return  # already installed
    for cls, attr in targets:
        _orig[f"{cls.__name__}.{attr}"] = getattr(cls, attr)

    STATE.timers_path = timers_path
    STATE.load_timers()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    STATE.wake_r = r
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)  # a signal (reload, stop) ends the wait at once

    loop.Reactor._wait_for_io = _wait_for_io
    loop.Reactor.active_peers = _active_peers
    loop.Reactor._pending_adjribout = _pending_adjribout
    loop.Reactor.reload = _reload
    peer.Peer.run = _peer_run
    keepalive.KA.__init__ = _ka_init
    bgp_timer.ReceiveTimer.__init__ = _receive_timer_init
    outgoing.Outgoing.establish = _establish
    _wrap_processes_received()
    _install_async_stepper()


def _wrap_processes_received() -> None:
    from exabgp.reactor.api import processes

    orig = processes.Processes.received
    _orig["Processes.received"] = orig

    def received(self):  # type: ignore[no-untyped-def]
        for item in orig(self):
            STATE.api_input = True
            yield item

    processes.Processes.received = received


def _install_async_stepper() -> None:
    """ExaBGP runs its queued API callbacks (generators) through asyncio.run(): a new event loop per
    reactor turn with work, ~0.6 ms in the lab kernel for every command. Step the generators directly
    (same order, same LIMIT steps per turn, same error reporting); coroutines still go to asyncio."""
    import inspect

    from exabgp.reactor.asynchronous import ASYNC

    orig = ASYNC.run
    _orig["ASYNC.run"] = orig

    def run(self):  # type: ignore[no-untyped-def]
        if not self._async:
            return False
        if not all(inspect.isgenerator(cb) for _, cb in self._async):
            return orig(self)
        uid, callback = self._async.popleft()
        for _ in range(self.LIMIT):
            try:
                next(callback)
            except StopIteration:
                if not self._async:
                    return False
                uid, callback = self._async.popleft()
            except Exception as exc:  # as ExaBGP: report, tell the API client, go on with the next
                _log_error(f"async | {uid} | problem with function: {exc}")
                self._notify_error(uid)
                if not self._async:
                    return False
                uid, callback = self._async.popleft()
        self._async.appendleft((uid, callback))
        return True

    ASYNC.run = run


def _peer_run(self):  # type: ignore[no-untyped-def]
    from exabgp.reactor.peer import ACTION

    action = _orig["Peer.run"](self)
    if action == ACTION.NOW:
        STATE.again.add(self)
    return action


def _ka_init(self, session, proto):  # type: ignore[no-untyped-def]
    _orig["KA.__init__"](self, session, proto)
    peer = proto.peer
    negotiated = int(self.send_timer.keepalive or 0)
    peer._fabric_ka_negotiated = negotiated
    configured = STATE.for_peer(str(peer.neighbor["peer-address"].top())).keepalive
    self.send_timer.keepalive = keepalive_interval(negotiated, configured)
    peer._fabric_send_timer = self.send_timer


def _receive_timer_init(self, session, *args, **kw):  # type: ignore[no-untyped-def]
    _orig["ReceiveTimer.__init__"](self, session, *args, **kw)
    conn = getattr(session, "__self__", None)  # session is a bound method of the session's Connection
    if conn is not None:
        conn._fabric_receive_timer = self  # the latest: open wait, then the hold timer


def _reload(self):  # type: ignore[no-untyped-def]
    STATE.load_timers()
    ok = _orig["Reactor.reload"](self)
    from exabgp.bgp.fsm import FSM

    for p in self._peers.values():  # a changed keepalive applies to running sessions
        st = getattr(p, "_fabric_send_timer", None)
        if st is not None and p.fsm == FSM.ESTABLISHED:
            configured = STATE.for_peer(str(p.neighbor["peer-address"].top())).keepalive
            st.keepalive = keepalive_interval(getattr(p, "_fabric_ka_negotiated", 0), configured)
    return ok


def _pending_adjribout(self):  # type: ignore[no-untyped-def]
    STATE.in_pending_check = True  # ExaBGP asks about every peer here, not about this turn's
    try:
        return _orig["Reactor._pending_adjribout"](self)
    finally:
        STATE.in_pending_check = False


def _active_peers(self):  # type: ignore[no-untyped-def]
    peers = _orig["Reactor.active_peers"](self)
    turn = getattr(self, "_fabric_turn", None)
    if turn is None or STATE.in_pending_check:
        return peers
    return {k for k in peers if self._peers.get(k) in turn}


def _peer_deadlines(p: Any, now_wall: float, passive: bool) -> tuple[list[tuple[int, int]], list[float]]:
    """(fd, poll events) to watch and wall-clock deadlines for one peer."""
    from exabgp.bgp.fsm import FSM

    fds: list[tuple[int, int]] = []
    deadlines: list[float] = []
    proto = p.proto
    if p.neighbor["passive"] and proto is None and not p.stopping():
        return fds, deadlines  # not given turns (active_peers): the listener brings its connection
    if proto is not None:
        fd = p.socket()
        if fd >= 0:
            fds.append((fd, IN))
        conn = proto.connection
        rt = getattr(conn, "_fabric_receive_timer", None) if conn is not None else None
        if rt is not None and int(rt.holdtime):
            deadlines.append(rt.last_read + int(rt.holdtime) + 1)  # expires when elapsed > holdtime
        st = getattr(p, "_fabric_send_timer", None)
        if st is not None and p.fsm == FSM.ESTABLISHED and st.keepalive:
            deadlines.append(st.last_sent + st.keepalive)
    if p.generator is None and p._restart:
        deadlines.append(p._delay._time)  # back-off before the next session attempt (ExaBGP's Delay)
    elif p.generator and proto is None and not passive:
        attempt = STATE.connecting.get(str(p.neighbor["peer-address"].top()))
        if attempt is None:
            deadlines.append(now_wall)  # about to connect: run it now
        elif attempt.fd >= 0:
            fds.append((attempt.fd, select.POLLOUT))
            deadlines.append(now_wall + attempt.until - time.monotonic())
        else:
            deadlines.append(now_wall + attempt.until - time.monotonic())
    return fds, deadlines


def _wait_for_io(self, sleeptime):  # type: ignore[no-untyped-def]
    """Replaces Reactor._wait_for_io: decide who gets the next turn; yields nothing (every fd that
    matters is ours to watch, and the loop gives turns through active_peers)."""
    from exabgp.environment import getenv

    STATE.reactor = self
    now = time.time()
    passive = bool(getenv().bgp.passive)
    poller = select.poll()
    whom: dict[int, Any] = {}

    def watch(fd: int, events: int, who: Any) -> None:
        if fd < 0:
            return
        if fd in whom and whom[fd] is not who:
            who = ALL
        whom[fd] = who
        poller.register(fd, events)

    deadlines: list[tuple[float, Any]] = []
    for p in self._peers.values():
        fds, ds = _peer_deadlines(p, now, passive)
        for fd, ev in fds:
            watch(fd, ev, p)
        deadlines += [(d, p) for d in ds]
    api_fd = exabgp_api.live_fd()
    for fd in self.processes.fds if self.processes else ():
        watch(fd, IN | (select.POLLRDHUP if fd == api_fd else 0), ALL)
    exabgp_api.flush()
    out_fd = exabgp_api.pending_fd()
    if out_fd >= 0:  # output the agent's socket did not take yet: flush when writable (no peer's turn)
        poller.register(out_fd, select.POLLOUT | IN | select.POLLRDHUP)
        whom.setdefault(out_fd, ALL)
    if self.listener is not None:
        for sock in list(self.listener._sockets):
            watch(sock.fileno(), IN, ALL)
    watch(STATE.wake_r, IN, ALL)

    pending_async = not self.asynchronous.ready()
    urgent = sleeptime == 0 or pending_async
    timeout, past_due = wait_timeout(now, (d for d, _ in deadlines), urgent, STATE.past_due, self._sleep_time)
    STATE.past_due = STATE.past_due + 1 if past_due else 0
    ms = -1 if timeout is None else math.ceil(timeout * 1000)
    ms = min(ms, int(MAX_WAIT * 1000)) if ms >= 0 else int(MAX_WAIT * 1000)
    try:
        ready = poller.poll(ms)
    except InterruptedError:
        ready = []

    everyone = STATE.api_input or pending_async or timeout is None and not ready
    turn: set[Any] = set(STATE.again)
    STATE.again.clear()
    STATE.api_input = False
    trouble = False
    for fd, ev in ready:
        who = whom.get(fd, ALL)
        if fd == STATE.wake_r:
            _drain(fd)
        if fd == api_fd and fd >= 0:
            exabgp_api.check(ev)  # the agent's side closed: ExaBGP exits (no NOTIFICATION)
            if ev == select.POLLOUT:
                exabgp_api.flush()
                continue
        if ev & BAD:
            trouble = True
        if who is ALL:
            everyone = True
        else:
            turn.add(who)
    now = time.time()
    for d, who in deadlines:
        if d <= now:
            turn.add(who)
    self._fabric_turn = None if everyone else turn
    if trouble:
        self._prevent_spin()  # a socket in error: never busier than ExaBGP's own loop
    return ()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass


_SO_ERRORS: dict[int, int] = {}  # fd -> the error connect_result read (and so cleared)


def connect_outcome(io: Any) -> tuple[bool | None, int]:
    """connect_result and, when it failed, the socket's error (errno.ECONNREFUSED for a reset, ...)."""
    fd = io.fileno()
    _SO_ERRORS.pop(fd, None)
    ok = connect_result(io)
    err = _SO_ERRORS.pop(fd, 0)
    if ok is False and not err:
        try:
            err = io.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            err = 0
    return ok, err


def outcome(connected: bool | None, err: int, issue: Exception | None) -> tuple[str, str]:
    """(result, detail) of one attempt, as the agent's session tracker reads it (bgp.messages.ConnectMsg):
    ok | refused (a reset: nothing listens, or it refuses us) | timeout (nothing came back within
    connectRetry: a TCP-MD5 mismatch looks like this) | error (the errno's text)."""
    if connected:
        return "ok", ""
    if issue is not None:
        text = str(issue)
        return ("refused" if "refused" in text.lower() else "error"), text
    if connected is None:
        return "timeout", ""
    if err == errno.ECONNREFUSED:
        return "refused", os.strerror(err)
    return "error", os.strerror(err) if err else "connection failed"


def report_connect(address: str, result: str, detail: str) -> None:
    """Tell the agent (through the API processes that get neighbor changes) how an outgoing attempt went;
    only when it differs from the last report for that peer (one line per change, not per attempt)."""
    if STATE.reported.get(address) == (result, detail):
        return
    STATE.reported[address] = (result, detail)
    reactor = STATE.reactor
    if reactor is None or getattr(reactor, "processes", None) is None:
        return
    for peer in list(getattr(reactor, "_peers", {}).values()):
        neighbor = peer.neighbor
        if str(neighbor["peer-address"].top()) != address:
            continue
        line = json.dumps({"type": "fabric-connect", "neighbor": {"address": {"peer": address}},
                           "connect": {"result": result, "detail": detail}})
        try:
            for process in neighbor.api["neighbor-changes"]:
                reactor.processes.write(process, line, neighbor)
        except Exception as e:  # noqa: BLE001 - a report must never break a connection attempt
            _log_error(f"cannot report a connection attempt to {address}: {e}")
        return


def connect_result(io: Any) -> bool | None:
    """A non-blocking connect's outcome: True connected, False failed, None still in progress.

    Not ExaBGP's tcp.ready(): it reads SO_ERROR (which clears it) and, on the next poll, takes the
    refused socket for a connected one; the OPEN then fails with "Broken TCP connection" and the peer
    is reset with its back-off growing (1, 2, 3 ... 60 s) instead of a plain retry."""
    poller = select.poll()
    poller.register(io, select.POLLOUT)
    events = poller.poll(0)
    if not events:
        return None
    ev = events[0][1]
    if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
        return False
    err = io.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        _SO_ERRORS[io.fileno()] = err  # reading clears it: kept for connect_outcome
        return False
    try:
        io.getpeername()
    except OSError:
        return False
    return True


def _establish(self):  # type: ignore[no-untyped-def]
    """Replaces Outgoing.establish: one attempt per connectRetry seconds (ExaBGP: one per loop turn)."""
    key = str(self.peer)
    try:
        while True:
            retry = STATE.for_peer(key).connect_retry
            started = time.monotonic()
            issue = self._connect()
            connected, err = False, 0
            if issue is None and self.io is not None:
                STATE.connecting[key] = _Attempt(self, self.io.fileno(), started + retry)
                while (got := connect_outcome(self.io))[0] is None:
                    if time.monotonic() >= started + retry:
                        break  # unanswered: give up this attempt (RFC 4271 ConnectRetryTimer)
                    yield False
                connected, err = got
                report_connect(key, *outcome(connected, err, None))
                if connected:
                    STATE.connecting.pop(key, None)
                    self.success()
                    if not self.local:
                        self.local = self.io.getsockname()[0]
                    yield True
                    return
            if issue is not None:
                report_connect(key, *outcome(False, 0, issue))
            if self.io is not None:
                try:
                    self.io.close()
                except OSError:
                    pass
                self.io = None
            STATE.connecting[key] = _Attempt(self, -1, started + retry)
            while time.monotonic() < started + retry:
                yield False
    finally:
        attempt = STATE.connecting.get(key)
        if attempt is not None and attempt.outgoing is self:
            del STATE.connecting[key]
