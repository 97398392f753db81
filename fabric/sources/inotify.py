"""Minimal inotify (Linux) through ctypes: wake when a file in a directory is written or replaced."""

from __future__ import annotations

import ctypes
import os
import struct

IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x8, 0x80, 0x100, 0x200
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000

# The C library the interpreter already runs on (dlopen(NULL)): find_library("c") would run `ldconfig -p`
# in a subprocess at every agent start.
_libc = ctypes.CDLL(None, use_errno=True)


class DirWatch:
    """A non-blocking inotify fd watching one directory; `read_names()` returns the file names touched."""

    def __init__(self, directory: str) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd = fd
        mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE
        if _libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {directory} failed")

    def read_names(self) -> set[str]:
        names: set[str] = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            off = 0
            while off + 16 <= len(data):
                _wd, _mask, _cookie, length = struct.unpack_from("iIII", data, off)
                names.add(data[off + 16: off + 16 + length].rstrip(b"\0").decode(errors="replace"))
                off += 16 + length

    def close(self) -> None:
        os.close(self.fd)
