"""The `fabric lab exec` wire format: typed frames multiplexing command sessions over one byte stream
(the lab kernel's serial line, or a unix socket). Pure: bytes in, frames out.

    frame = magic(0xFB) type(u8) channel(u32) length(u32) payload

Channel 0 carries HELLO (the lab's name and nodes) and lab-wide ERRORs; every command session has
its own channel. A client opens one with OPEN {node, argv, tty, rows, cols, term}, sends STDIN / EOF /
RESIZE / SIGNAL, receives STDOUT / STDERR and finally EXIT {code} or ERROR {message}; CLOSE ends a
session from the client side (its processes are killed).
"""

from __future__ import annotations

import json
import struct
from enum import IntEnum
from typing import Any

MAGIC = 0xFB
HEADER = struct.Struct("!BBII")
MAX_PAYLOAD = 1 << 20  # a frame larger than this is corruption, not data
CHUNK = 32 * 1024  # output is sent in pieces of at most this size


class T(IntEnum):
    HELLO = 1
    OPEN = 2
    STDIN = 3
    STDOUT = 4
    STDERR = 5
    EOF = 6
    RESIZE = 7
    SIGNAL = 8
    EXIT = 9
    ERROR = 10
    CLOSE = 11


Frame = tuple[T, int, bytes]


def frame(t: T, channel: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes (at most {MAX_PAYLOAD})")
    return HEADER.pack(MAGIC, int(t), channel, len(payload)) + payload


def jframe(t: T, channel: int, obj: Any) -> bytes:
    return frame(t, channel, json.dumps(obj, separators=(",", ":")).encode())


def jload(payload: bytes) -> dict[str, Any]:
    """A JSON payload that must be an object; ValueError otherwise."""
    data = json.loads(payload.decode() or "{}")
    if not isinstance(data, dict):
        raise ValueError("payload is not a JSON object")
    return data


class Decoder:
    """Incremental: feed bytes as they come, get whole frames. Bytes that do not start a valid frame
    (line noise, a torn frame) are skipped up to the next magic byte and counted in `dropped`."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.dropped = 0

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        out: list[Frame] = []
        while True:
            start = self._buf.find(bytes([MAGIC]))
            if start < 0:
                self.dropped += len(self._buf)
                self._buf.clear()
                return out
            if start:
                self.dropped += start
                del self._buf[:start]
            if len(self._buf) < HEADER.size:
                return out
            _, t, channel, length = HEADER.unpack_from(self._buf)
            if length > MAX_PAYLOAD or t not in T._value2member_map_:
                self.dropped += 1
                del self._buf[:1]
                continue
            end = HEADER.size + length
            if len(self._buf) < end:
                return out
            out.append((T(t), channel, bytes(self._buf[HEADER.size:end])))
            del self._buf[:end]
