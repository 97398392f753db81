"""The IPVS virtual servers this agent created, persisted in the run dir (finding 13).

IPVS has no owner mark (routes have a protocol, our addresses a device), so the proxy remembers the
(protocol, address, port) keys it programmed. A key is recorded *before* the virtual server is
created (a crash in between leaves a key for a server that may not exist, which the next full sync
drops) and forgotten after it is deleted. Everything else in IPVS — a virtual server on a node
address that someone made with ipvsadm, another load balancer's — is never touched.

The file is JSON, written atomically (temporary file in the same directory, fsync, rename) with mode
0600. Without a file (first start, or an upgrade from a version without it) the proxy adopts only the
virtual servers on its dummy device's addresses (see docs/services.md).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from loadbalancer.types import PROTOCOLS, VSKey

VERSION = 1


class OwnedVirtualServers:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.keys: set[VSKey] = set()
        self.dirty = False  # changed since the last successful save
        self.problem: str | None = None  # why the file could not be read or written (status)

    def load(self) -> bool:
        """Read the file. False when there is none (or it is unreadable): the caller adopts by the migration rule."""
        if self.path is None:
            return False
        try:
            data = json.loads(self.path.read_text())
            keys = {(p, a, int(n)) for p, a, n in data["virtualServers"]}
            if data.get("version") != VERSION or not all(p in PROTOCOLS for p, _, _ in keys):
                raise ValueError(f"unknown version or protocol in {self.path}")
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.problem = f"{self.path}: unreadable ({e}); adopting only virtual servers on the service device"
            return False
        self.keys = keys
        return True

    def add(self, keys: Iterable[VSKey]) -> None:
        new = set(keys) - self.keys
        if new:
            self.keys |= new
            self.dirty = True

    def discard(self, keys: Iterable[VSKey]) -> None:
        gone = self.keys & set(keys)
        if gone:
            self.keys -= gone
            self.dirty = True

    def save(self) -> str | None:
        """Write the file if it changed; returns the error text (the keys stay dirty and are written next time)."""
        if not self.dirty or self.path is None:
            self.dirty = False
            return None
        text = json.dumps({"version": VERSION, "virtualServers": sorted(self.keys)}, separators=(",", ":"))
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")  # mode 0600
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            self.problem = f"{self.path}: not written ({e.strerror or e}); retried at the next change"
            return self.problem
        self.dirty = False
        self.problem = None
        return None
