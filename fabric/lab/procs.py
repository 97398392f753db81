"""Processes a lab starts: each in its own process group, output to a log file, all stopped at teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Proc:
    label: str  # e.g. "tor/bgpd"
    popen: subprocess.Popen
    log: Path

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


class Processes:
    """Every process group the lab started, so teardown can kill them all (and only them)."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, label: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
        with open(log, "ab") as out:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        proc = Proc(label, popen, log)
        self.procs.append(proc)
        return proc

    def run(self, label: str, cmd: list[str], log: Path, env: dict[str, str] | None = None,
            timeout: float = 120.0) -> int:
        """Run to completion (output appended to `log`); its group stays registered for what it left behind."""
        proc = self.start(label, cmd, log, env)
        try:
            return proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait()
            return 124

    def find(self, label: str) -> Proc | None:
        """The newest process started under `label`."""
        return next((p for p in reversed(self.procs) if p.label == label), None)

    def forget(self, proc: Proc) -> None:
        """A process that was stopped on purpose (a fault) and reaped: no longer a dead daemon."""
        self.procs = [p for p in self.procs if p is not proc]

    def dead(self, labels_prefix: tuple[str, ...] = ()) -> list[Proc]:
        """Long-running processes (started with `start`) that have exited."""
        return [p for p in self.procs if not p.running and p.label.startswith(labels_prefix)]

    def stop_all(self, grace: float = 3.0) -> None:
        """SIGTERM every group, wait up to `grace` seconds, then SIGKILL what is left; reap all."""
        for p in self.procs:
            _signal_group(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            while p.popen.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # teardown only
        for p in self.procs:
            _signal_group(p.popen.pid, signal.SIGKILL)
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
