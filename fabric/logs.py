"""The agent's log output: human lines (default) or JSON lines (`fabric agent --log-format json`), and
secrets that never reach either.

Every secret the agent handles (a peer's MD5 password from the config file, a password read from a
Secret) is registered here when it is read (`register_secret`); the handler's filter replaces any
registered value (and its base64 form, as ExaBGP's config carries it) with `***` in the message,
its arguments and a traceback, whatever logger wrote it. Code never logs a password on purpose
either (Neighbor and Peer keep them out of their reprs); this is the second line.

JSON lines: one object per line with `time` (RFC 3339, UTC), `level`, `logger`, `msg`, and `exc`
(the traceback) when there is one: for log shippers that parse JSON (Loki, Elasticsearch, ...).
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import threading
import time
from collections.abc import Iterable

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MASK = "***"

_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()


def register_secret(value: str | None) -> None:
    """From now on `value` (and its base64 form) never appears in a log line."""
    global _secrets
    if not value:
        return
    forms = {value, base64.b64encode(value.encode()).decode()}
    with _lock:
        _secrets = _secrets | forms


def register_secrets(values: Iterable[str | None]) -> None:
    for v in values:
        register_secret(v)


def redact(text: str) -> str:
    for s in sorted(_secrets, key=len, reverse=True):  # longest first: a secret inside another is masked whole
        if s in text:
            text = text.replace(s, MASK)
    return text


class Redactor(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not _secrets:
            return True
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text", stream=None) -> logging.Handler:
    """Configure the root logger for the agent: one handler on stderr, the format asked for, secrets masked."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(Redactor())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    return handler
