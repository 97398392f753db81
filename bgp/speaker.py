"""Supervise ExaBGP as a child process and speak to it over a unix socket (asyncio).

The Speaker owns `run_dir` (mode 0700): `exabgp.conf` (generated, mode 0600: it holds MD5 passwords),
`relay.sock` (our unix socket server, 0600: ExaBGP connects to it itself when it runs through our
launcher, else the relay helper it starts does), `exabgp.log` (ExaBGP's own
rotating log: LOG_BYTES x (1 + LOG_BACKUPS) at most) and `exabgp.out` (its stdout/stderr, i.e. crash
output; rotated at each start). ExaBGP is started through `setpriv --pdeathsig KILL` (or our own tiny
exec wrapper, bgp.deathsig, where util-linux is missing) so it dies with us — never with a
`preexec_fn`, which can deadlock in a multi-threaded parent (SIGKILL, not SIGTERM: on SIGTERM ExaBGP
sends a Cease NOTIFICATION and RFC 4724 peers then flush our routes at once; a plain TCP close lets
them keep our routes for the graceful-restart time),
and restarted with backoff if it dies (sessions drop; peers keep our routes by graceful restart, the
RIB keeps theirs: SpeakerRestarted). When the relay of a new ExaBGP connects, the whole desired set
is announced (identical routes cause no UPDATE); when a neighbor comes up, the routes for it are
replayed to it alone and followed by its own End-of-RIB (manual-eor is on, so ExaBGP never sends an
empty End-of-RIB after a restart and peers keep our routes until then). End-of-RIB is withheld until
the agent says the announced set is final (`set_announcements(..., final=True)`: the desired state is
known from a complete source): before that, a restarted agent's partial set only refreshes what peers
kept, and nothing is flushed. A relay that reconnects to
an ExaBGP that kept running (ExaBGP respawned its helper) means messages were lost: ExaBGP is then
restarted, the one clean resync.

ExaBGP runs through our launcher (`python -m bgp.exabgp_launch`: event-driven reactor, keepalive and
connect retry per neighbor from `exabgp.timers.json`, its API on our socket directly: no relay process,
and it exits when that connection closes) unless `exabgp` names another executable.
Neighbor changes rewrite the config (and timers) and send SIGUSR1 (reload): ExaBGP keeps the sessions of neighbors
whose definition did not change (checked by tests/kernel/test_bgp_speaker.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Callable

from bgp import exabgp_config
from bgp.announce import Announcement, diff_commands
from bgp.events import BgpEvent, PeerDown, PeerUp, SpeakerRestarted
from bgp.exabgp_config import Neighbor
from bgp.messages import Ack, Notice, Unparsed, parse_line
from bgp.sessions import SessionTracker

log = logging.getLogger("bgp.speaker")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a child that ran this long resets the backoff
LINE_LIMIT = 64 * 1024 * 1024  # one UPDATE's JSON can be large
OUT_ROTATE_BYTES = 1024 * 1024  # exabgp.out (stdout/stderr: crash output) is rotated at a start beyond this
EXABGP_NICE = -5  # ExaBGP's scheduling priority (see _prioritise)


class SpeakerError(RuntimeError):
    """The speaker can't run at all (missing ExaBGP, unusable run dir); the message names the setting."""


def die_with_parent_command(argv: list[str]) -> list[str]:
    """`argv` run so that it gets SIGKILL when we die (PR_SET_PDEATHSIG set by an exec wrapper)."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--", *argv]
    return [sys.executable, "-m", "bgp.deathsig", *argv]


def _prioritise(pid: int) -> None:
    """ExaBGP ahead of the agent's own work on a busy CPU: its start (imports, config) is what the sessions
    wait for while the agent's other stages (nft, IPVS, the CNI) start too, and its keepalives must go out
    whatever the agent is doing (a starved speaker loses its sessions at hold time). A nice value, not a
    real-time class: it can't starve the agent. Without the privilege to raise it, ExaBGP runs as we do."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, max(os.getpriority(os.PRIO_PROCESS, 0) + EXABGP_NICE, -20))
    except OSError as e:
        log.debug("exabgp keeps our scheduling priority: %s", e)


class Speaker:
    def __init__(self, run_dir: Path, on_event: Callable[[BgpEvent], None], exabgp: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.on_event = on_event
        self.exabgp = exabgp  # None: ExaBGP through our launcher (bgp.exabgp_launch)
        self.extra_env = dict(env or {})
        self.config_path = self.run_dir / "exabgp.conf"
        self.timers_path = self.run_dir / "exabgp.timers.json"
        self.socket_path = self.run_dir / "relay.sock"
        self.log_path = self.run_dir / "exabgp.log"
        self._neighbors: dict[str, Neighbor] = {}
        self._announced: dict[IPv4Network, Announcement] = {}  # what we asked ExaBGP to announce
        self._tracker = SessionTracker()
        self._proc: asyncio.subprocess.Process | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._pending_acks = 0
        self._recent: deque[str] = deque(maxlen=20)  # last commands sent, to give an `error` some context
        self.errors: deque[str] = deque(maxlen=100)
        self.starts = 0
        self.relay_connections = 0
        self._relay_connected = asyncio.Event()
        self._relay_tasks: set[asyncio.Task[None]] = set()
        self._ready = False  # this ExaBGP's relay has connected (so its signal handlers are installed)
        self._reload_pending = False
        self._final = False  # the announced set is the agent's full desired state: End-of-RIB may go
        self._eor_owed: set[IPv4Address] = set()  # established neighbors that got no End-of-RIB yet

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the relay socket and start ExaBGP. Raises SpeakerError when it can't be started at all."""
        if self.exabgp is not None and not (os.path.isfile(self.exabgp) and os.access(self.exabgp, os.X_OK)):
            raise SpeakerError(f"paths.exabgp: {self.exabgp!r} is not an executable file")
        try:
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.run_dir, 0o700)  # exabgp.conf holds MD5 passwords
        except OSError as e:
            raise SpeakerError(f"paths.runDir: cannot create {self.run_dir}: {e.strerror or e}") from None
        self.socket_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._on_relay, path=str(self.socket_path), limit=LINE_LIMIT)
        os.chmod(self.socket_path, 0o600)
        self._write_config()
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="exabgp-supervisor")

    async def stop(self, graceful: bool = True) -> None:
        """Stop ExaBGP (kernel routes are not ours to touch) and close the socket.

        graceful: kill ExaBGP so it sends no NOTIFICATION; peers see the TCP session close and keep our
        routes for our graceful-restart time (a restart or upgrade loses no packet). Not graceful:
        SIGTERM, ExaBGP sends Cease and peers drop our routes at once (a node leaving for good)."""
        self._stopping = True
        if self._supervisor:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass
        proc = self._proc
        if proc and proc.returncode is None:
            if graceful:
                proc.kill()
            else:
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        for task in list(self._relay_tasks):
            task.cancel()
        if self._relay_tasks:
            await asyncio.gather(*self._relay_tasks, return_exceptions=True)
        if self._server:
            self._server.close()
            await self._server.wait_closed()
        self.socket_path.unlink(missing_ok=True)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(exabgp_config.environment(self.run_dir, log_file=self.log_path))
        env.update(self.extra_env)
        return env

    def _write_config(self) -> None:
        neighbors = list(self._neighbors.values())
        # atomic replaces, timers first: a reload never reads half a file, nor a neighbor without its timers
        for path, text in ((self.timers_path, exabgp_config.render_timers(neighbors)),
                           (self.config_path, exabgp_config.render(neighbors, self.socket_path))):
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), 0o600)  # an older file may have had other bits (exabgp.conf: MD5 passwords)
                f.write(text)
            tmp.replace(path)

    def command(self) -> list[str]:
        """How ExaBGP is started: our launcher (event-driven loop, keepalive and connect retry per
        neighbor), or the executable given as paths.exabgp (run as `EXE CONFIG`)."""
        if self.exabgp is not None:
            return [self.exabgp, str(self.config_path)]
        return [sys.executable, "-m", "bgp.exabgp_launch", "--timers", str(self.timers_path),
                "--api-socket", str(self.socket_path), str(self.config_path)]

    async def _spawn(self) -> None:
        out_path = self.run_dir / "exabgp.out"
        try:  # stdout/stderr only carry crash output (the log has its own rotating file): keep it bounded
            if out_path.stat().st_size > OUT_ROTATE_BYTES:
                out_path.replace(out_path.with_suffix(".out.1"))
        except FileNotFoundError:
            pass
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *die_with_parent_command(self.command()), stdin=asyncio.subprocess.DEVNULL,
                stdout=fd, stderr=fd, env=self._env(), cwd=str(self.run_dir))
        finally:
            os.close(fd)
        self.starts += 1
        self._ready = False
        self._started_at = time.monotonic()
        log.info("exabgp started (pid %s)", self._proc.pid)
        _prioritise(self._proc.pid)

    async def _supervise(self) -> None:
        delay = BACKOFF_START
        while not self._stopping:
            if self._proc is None:  # the last spawn failed
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                try:
                    await self._spawn()
                except OSError as e:
                    log.error("cannot start exabgp: %s", e)
                    self.errors.append(f"cannot start exabgp: {e}")
                    continue
            rc = await self._proc.wait()
            if self._stopping:
                return
            ran = time.monotonic() - self._started_at
            log.warning("exabgp exited (%s) after %.1fs; restarting in %.1fs", rc, ran, delay if ran < STABLE_AFTER
                        else BACKOFF_START)
            self.errors.append(f"exabgp exited with {rc}")
            self._tracker.speaker_restarted(time.time())
            self._eor_owed.clear()  # the sessions are gone; each gets its End-of-RIB when it is back
            self._emit([SpeakerRestarted()])
            if ran >= STABLE_AFTER:
                delay = BACKOFF_START
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            if self._stopping:
                return
            try:
                await self._spawn()
            except OSError as e:  # e.g. the executable vanished during an upgrade: keep trying
                log.error("cannot start exabgp: %s", e)
                self.errors.append(f"cannot start exabgp: {e}")
                self._proc = None
                continue

    # ----- the relay connection -----------------------------------------------------------------

    async def _on_relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._relay_tasks.add(task)
        if self._writer is not None:  # a new relay replaces the old one (ExaBGP respawned it)
            self._writer.close()
        self._writer = writer
        self.relay_connections += 1
        if self._ready and self._proc is not None and self._proc.returncode is None:
            # ExaBGP respawned a dead relay: whatever it wrote meanwhile (updates, state changes) is
            # lost, and nothing replays it. Restarting ExaBGP is the one clean resync: peers keep our
            # routes and we keep theirs (graceful restart) until the End-of-RIBs.
            log.warning("relay reconnected to a running exabgp: restarting exabgp to resync")
            self.errors.append("relay restarted under a running exabgp: exabgp restarted to resync")
            self._proc.kill()
        self._ready = True
        if self._reload_pending:
            self._reload()
        self._pending_acks = 0
        self._relay_connected.set()
        # Everything we want announced (identical routes cause no UPDATE). End-of-RIB goes to the sessions
        # already up (a relay respawned by a live ExaBGP); ExaBGP answers `error` to an EOR with no
        # session up, and sessions that come up later get theirs on PeerUp.
        up = sorted(IPv4Address(s["address"]) for s in self._tracker.status().values()
                    if s["state"] == "established")
        self._send(diff_commands({}, self._announced, self._addresses()) + self._eor(up))
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    log.error("relay sent an over-long line; dropping the connection")
                    break
                except ConnectionError:
                    break
                if not line:
                    break
                self._handle_line(line.decode("utf-8", "replace"))
        except asyncio.CancelledError:
            pass  # stop(): end quietly (asyncio's stream callback would report a cancelled handler)
        finally:
            if self._writer is writer:
                self._writer = None
                self._relay_connected.clear()
            writer.close()
            if task is not None:
                self._relay_tasks.discard(task)

    def _handle_line(self, line: str) -> None:
        msg = parse_line(line)
        if isinstance(msg, Ack):
            self._pending_acks = max(0, self._pending_acks - 1)
            if not msg.ok:
                err = f"exabgp rejected a command (one of: {list(self._recent)[-5:]})"
                log.error(err)
                self.errors.append(err)
            return
        if isinstance(msg, Notice):
            log.info("exabgp: %s", msg.text)
            return
        if isinstance(msg, Unparsed):
            if msg.why != "not JSON":
                log.warning("unparsed exabgp message: %s (%s)", msg.line[:200], msg.why)
            return
        events = self._tracker.feed(msg, time.time())
        for ev in events:
            if isinstance(ev, PeerUp):
                # Replay the routes for this neighbor and close them with its End-of-RIB.
                addr = ev.address
                only = frozenset(n for n, nb in self._neighbors.items() if nb.peer_address == addr)
                cmds = diff_commands({}, self._announced, self._addresses(), only=only) if only else []
                self._send(cmds + self._eor([addr]))
            elif isinstance(ev, PeerDown):
                self._eor_owed.discard(ev.address)
        self._emit(events)

    def _eor(self, addresses: list[IPv4Address]) -> list[str]:
        """End-of-RIB commands for these neighbors, or none (remembered as owed) until the set is final."""
        if not self._final:
            self._eor_owed.update(addresses)
            return []
        self._eor_owed.difference_update(addresses)
        return [f"neighbor {a} announce eor ipv4 unicast" for a in addresses]

    def _emit(self, events: list[BgpEvent]) -> None:
        for ev in events:
            try:
                self.on_event(ev)
            except Exception:  # the agent's handler must not kill our reader
                log.exception("on_event handler failed for %r", ev)

    def _send(self, commands: list[str]) -> None:
        if not commands or self._writer is None:
            return
        self._pending_acks += len(commands)
        self._recent.extend(commands)
        self._writer.write(("\n".join(commands) + "\n").encode())

    async def _drain(self) -> None:
        w = self._writer
        if w is not None:
            try:
                await w.drain()
            except ConnectionError:
                pass

    def _addresses(self) -> dict[str, IPv4Address]:
        return {name: n.peer_address for name, n in self._neighbors.items()}

    # ----- what the agent calls -------------------------------------------------------------------

    async def set_neighbors(self, neighbors: list[Neighbor]) -> None:
        """Adopt this neighbor set (validated first: NeighborError names the bad neighbor and field)."""
        exabgp_config.validate(neighbors)
        new = {n.name: n for n in neighbors}
        if new == self._neighbors:
            return
        old_addresses = self._addresses()
        self._neighbors = new
        events = self._tracker.set_neighbors({n.peer_address: n.name for n in neighbors}, time.time(),
                                             {n.peer_address: (n.router_id, n.cluster_id) for n in neighbors})
        if self._proc is not None:
            self._write_config()
            self._reload()
        # Routes for removed neighbors: ExaBGP drops the peer and its RIB with it, nothing to withdraw.
        del old_addresses
        self._emit(events)

    def _reload(self) -> None:
        """SIGUSR1 = reload (unchanged neighbors keep their sessions). Until ExaBGP has installed its
        signal handlers SIGUSR1 would kill it; its relay connecting proves they are in place, so
        before that the reload waits for the connection (ExaBGP may well read the new file anyway)."""
        if self._proc is None or self._proc.returncode is not None:
            return  # the respawn reads the new file
        if not self._ready:
            self._reload_pending = True
            return
        self._reload_pending = False
        self._proc.send_signal(signal.SIGUSR1)

    async def set_announcements(self, desired: dict[IPv4Network, Announcement], *, final: bool = True) -> None:
        """Announce `desired` (replacing what was announced): only the difference is sent. `final`: this
        is the whole desired state (End-of-RIB may follow); once final, always final."""
        desired = dict(desired)
        commands = diff_commands(self._announced, desired, self._addresses())
        self._announced = desired
        await self._announce(commands, final)

    async def update_announcements(self, changes: Mapping[IPv4Network, Announcement | None], *,
                                   final: bool = True) -> None:
        """Per-prefix changes to what is announced (None: withdraw it): only those prefixes are compared
        and sent, O(changes) whatever else is announced. `final` as for set_announcements."""
        old = {p: self._announced[p] for p in changes if p in self._announced}
        new = {p: a for p, a in changes.items() if a is not None}
        commands = diff_commands(old, new, self._addresses())
        for p, a in changes.items():
            if a is None:
                self._announced.pop(p, None)
            else:
                self._announced[p] = a
        await self._announce(commands, final)

    async def _announce(self, commands: list[str], final: bool) -> None:
        if final and not self._final:
            self._final = True
            live = {IPv4Address(s["address"]) for s in self._tracker.status().values() if s["state"] == "established"}
            commands += self._eor(sorted(self._eor_owed & live))
        self._send(commands)
        await self._drain()

    def status(self) -> dict[str, object]:
        return {
            "exabgp_pid": self._proc.pid if self._proc and self._proc.returncode is None else None,
            "exabgp_starts": self.starts,
            "relay_connected": self._writer is not None,
            "pending_acks": self._pending_acks,
            "announced": len(self._announced),
            "endOfRib": "sent" if self._final else f"withheld until the desired state is known ({len(self._eor_owed)} owed)",
            "recent_errors": list(self.errors)[-10:],
            "neighbors": self._tracker.status(),
        }
