"""A tiny asyncio HTTP endpoint: liveness/readiness probes (`/healthz`, `/readyz`) and `/metrics`.

The handler returns (status, body) with a text/plain body, or (status, body, content type) with bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class HealthServer:
    def __init__(self, listen: str, handler: Callable[[str], tuple[Any, ...]]) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host or "0.0.0.0"
        self.port = int(port)
        self.handler = handler
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            parts = line.decode(errors="replace").split()
            path = parts[1] if len(parts) >= 2 else "/"
            code, body, *ctype = self.handler(path.split("?", 1)[0])
            data = body if isinstance(body, bytes) else body.encode()
            reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}.get(code, "")
            writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype[0] if ctype else 'text/plain'}\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
