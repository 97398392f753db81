"""A pytest plugin: SIGTERM ends a test run the way Ctrl-C does, so fixtures tear down.

`timeout pytest ...`, a CI job being cancelled or a supervisor stopping a run send SIGTERM, which by
default ends Python at once: a module-scoped lab's finally never runs and its network namespaces,
agents and routers stay on the host. As KeyboardInterrupt, pytest stops after the current test and
runs every finalizer (its session finish tears the setup state down). SIGKILL still can't be helped.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


def _interrupt(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it as before
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: object) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
