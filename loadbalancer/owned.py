"""The IPVS virtual servers this agent created, persisted in the run dir (finding 13).

IPVS has no owner mark (routes have a protocol, our addresses a device), so the proxy remembers the
(protocol, address, port) keys it programmed. A key is recorded *before* the virtual server is
created (a crash in between leaves a key for a server that may not exist, which the next full sync
drops) and forgotten after it is deleted. Everything else in IPVS — a virtual server on a node
address that someone made with ipvsadm, another load balancer's — is never touched.

The file (mode 0600) is a journal, so a change costs what changed, not the whole set: a header line,
then one `+ PROTO ADDR PORT` / `- PROTO ADDR PORT` line per change, appended and fsynced before the
kernel is touched. When it holds twice as many lines as keys it is compacted: the live keys written to
a temporary file, fsynced and renamed over it (atomic). A torn last line (a crash mid-append) is
ignored: its virtual server was not created yet. Without a file (first start, or an upgrade from a
version without it) the proxy adopts only the virtual servers on its dummy device's addresses (see
docs/services.md).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from loadbalancer.types import PROTOCOLS, VSKey

HEADER = "# bgp-fabric: IPVS virtual servers made by this agent, v1\n"


def _line(sign: str, key: VSKey) -> str:
    return f"{sign} {key[0]} {key[1]} {key[2]}\n"


class OwnedVirtualServers:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.keys: set[VSKey] = set()
        self.problem: str | None = None  # why the file could not be read or written (status)
        self._unsaved: list[str] = []  # journal lines not written yet
        self._lines = 0  # change lines in the file (compaction when it outgrows the set)
        self._compact = False  # rewrite the file whole at the next save (after an unreadable one)

    @property
    def dirty(self) -> bool:
        return bool(self._unsaved) or self._compact

    def load(self) -> bool:
        """Read the file. False when there is none (or it is unreadable): the caller adopts by the migration rule."""
        if self.path is None:
            return False
        try:
            text = self.path.read_text()
            if not text.startswith(HEADER):
                raise ValueError("not an ownership record of this version")
            keys: set[VSKey] = set()
            lines = text[len(HEADER):].split("\n")
            for i, line in enumerate(lines[:-1]):  # the last piece has no newline: empty, or torn by a crash
                sign, proto, addr, port = line.split(" ")
                if sign not in "+-" or proto not in PROTOCOLS or not 0 < int(port) < 65536:
                    raise ValueError(f"line {i + 2}: {line!r}")
                (keys.add if sign == "+" else keys.discard)((proto, addr, int(port)))
        except FileNotFoundError:
            return False
        except (OSError, ValueError, UnicodeDecodeError) as e:
            self.problem = f"{self.path}: unreadable ({e}); adopting only virtual servers on the service device"
            self._compact = True
            return False
        self.keys, self._lines = keys, len(lines) - 1
        self._compact = lines[-1] != ""  # a torn tail: the next save rewrites the file whole
        return True

    def add(self, keys: Iterable[VSKey]) -> None:
        for key in set(keys) - self.keys:
            self.keys.add(key)
            self._unsaved.append(_line("+", key))

    def discard(self, keys: Iterable[VSKey]) -> None:
        for key in self.keys & set(keys):
            self.keys.discard(key)
            self._unsaved.append(_line("-", key))

    def save(self) -> str | None:
        """Write what changed (append + fsync, or a compaction); returns the error text (the change
        stays unsaved and is written at the next save)."""
        if self.path is None:
            self._unsaved, self._compact = [], False
            return None
        if not self.dirty:
            return None
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self._compact or not self.path.exists() or self._lines + len(self._unsaved) > 2 * len(self.keys) + 64:
                self._rewrite()
            else:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                try:
                    os.write(fd, "".join(self._unsaved).encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._lines += len(self._unsaved)
        except OSError as e:
            self.problem = f"{self.path}: not written ({e.strerror or e}); retried at the next change"
            self._compact = True  # a partial append may have been torn: rewrite whole next time
            return self.problem
        self._unsaved, self._compact, self.problem = [], False, None
        return None

    def _rewrite(self) -> None:
        assert self.path is not None
        text = HEADER + "".join(_line("+", k) for k in sorted(self.keys))
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._lines = len(self.keys)
