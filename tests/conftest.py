"""Kernel tests run where the kernel can do what they need: here, or batched into one lab-kernel boot.

Tests marked `kernel` need a node-like kernel (ipip/IPVS/dummy); tests marked `nat` also need IPv4
nftables NAT. When this host's kernel lacks the features, every selected test of a kind is run in ONE
boot of its lab kernel — user-mode Linux (fabric.lab.kernel) for `kernel`, a qemu VM with Debian's
kernel (fabric.lab.vm) for `nat` — and each outer test item reports its inner result: pass, fail
(with the inner traceback), or skip (with the inner reason). A test that the inner run did not
report fails; nothing is counted as passing unseen.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fabric.lab import kernel as labkernel, vm as labvm

RESULTS_ENV = "FABRIC_KERNEL_RESULTS"


@dataclass
class _Backend:
    """One kind of lab kernel: which tests go there, how to probe the host and how to run a batch."""

    marker: str
    select: str  # -m expression of the inner run
    title: str
    capable: Callable[[], tuple[bool, list[str]]]
    run: Callable[..., labkernel.RunResult]
    timeout_env: str
    state: dict = field(default_factory=lambda: {"ran": False, "results": {}, "output": "", "rc": None})

    def describe(self) -> str:
        return f"{self.title}, {labvm.accel()}" if self.marker == "nat" else self.title


# `nat` goes first: a test marked both needs the VM.
_BACKENDS = {
    "nat": _Backend("nat", "nat", "lab VM", labvm.capable, labvm.run, "FABRIC_NAT_TIMEOUT"),
    "kernel": _Backend("kernel", "kernel and not nat", "lab kernel", labkernel.capable, labkernel.run,
                       "FABRIC_KERNEL_TIMEOUT"),
}


def _needs_proxy(backend: _Backend) -> bool:
    if labkernel.in_lab_kernel():
        return False
    if "capable" not in backend.state:
        backend.state["capable"] = backend.capable()[0]
    return not backend.state["capable"]


@pytest.hookimpl(trylast=True)  # after -k/-m deselection, so only selected tests go to a lab kernel
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    taken: set[str] = set()
    for backend in _BACKENDS.values():
        # `bootslab` tests boot the lab kernel themselves (through `fabric lab run`): never proxied
        mine = [i for i in items if i.get_closest_marker(backend.marker) and i.nodeid not in taken
                and not i.get_closest_marker("bootslab")]
        taken.update(i.nodeid for i in mine)
        if not mine or not _needs_proxy(backend):
            continue
        backend.state["nodeids"] = [i.nodeid for i in mine]
        for item in mine:
            item.runtest = _proxy_runtest(item, backend)  # type: ignore[method-assign]
            # Fixtures would otherwise set up on this host kernel; the inner run sets them up for real.
            item._fabric_proxied = True  # type: ignore[attr-defined]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if getattr(item, "_fabric_proxied", False):
        item.fixturenames = []  # type: ignore[attr-defined]
        if hasattr(item, "funcargs"):
            item.funcargs = {}  # type: ignore[attr-defined]


def _run_batch(config: pytest.Config, backend: _Backend) -> None:
    st = backend.state
    st["ran"] = True
    root = Path(config.rootpath)
    fd, results = tempfile.mkstemp(prefix="fabric-kernel-results-", suffix=".json", dir="/tmp")
    os.close(fd)
    os.environ[RESULTS_ENV] = results
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "addopts=-ra",
           "-m", backend.select, *st["nodeids"]]
    capman = config.pluginmanager.getplugin("capturemanager")
    tw = config.get_terminal_writer()
    with capman.global_and_fixture_disabled():
        tw.line()
        tw.sep("=", f"{backend.marker} tests: {len(st['nodeids'])} in the {backend.describe()} (one boot)", bold=True)
        try:
            r = backend.run(cmd, timeout=float(os.environ.get(backend.timeout_env, "1500")), cwd=str(root),
                            stream=True)
            st["rc"], st["output"] = r.returncode, r.output
        except labkernel.LabKernelError as e:
            st["rc"], st["output"] = 125, f"{backend.title} unavailable: {e}"
            tw.line(st["output"], red=True)
        tw.sep("=", f"{backend.marker} tests: {backend.title} run ended ({st['rc']})", bold=True)
    try:
        st["results"] = json.loads(Path(results).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        st["results"] = {}
    finally:
        Path(results).unlink(missing_ok=True)
        os.environ.pop(RESULTS_ENV, None)


def _proxy_runtest(item: pytest.Item, backend: _Backend):
    st = backend.state

    def runtest() -> None:
        if not st["ran"]:
            _run_batch(item.config, backend)
        res = st["results"].get(item.nodeid)
        if res is None:
            tail = st["output"][-3000:]
            pytest.fail(f"no result from the {backend.title} for {item.nodeid} (run exit {st['rc']}):\n{tail}",
                        pytrace=False)
        if res["outcome"] == "skipped":
            pytest.skip(f"[{backend.title}] {res['text']}")
        if res["outcome"] == "failed":
            pytest.fail(f"[{backend.title}, {res['when']}]\n{res['text']}", pytrace=False)

    return runtest


# --- inner side: record every report so the outer run can replay it --------------------------

def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get(RESULTS_ENV)
    if not path or not labkernel.in_lab_kernel():
        return
    p = Path(path)
    data = json.loads(p.read_text() or "{}") if p.exists() else {}
    prev = data.get(report.nodeid)
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        entry = {"outcome": "skipped", "when": report.when, "text": reason}
    elif report.failed:
        entry = {"outcome": "failed", "when": report.when, "text": report.longreprtext[-6000:]}
    elif report.when == "call":
        entry = {"outcome": "passed", "when": "call", "text": ""}
    else:
        return
    # A teardown failure after a pass must not be hidden by the earlier pass, nor the reverse.
    if prev and prev["outcome"] == "failed" and entry["outcome"] != "failed":
        return
    data[report.nodeid] = entry
    p.write_text(json.dumps(data))
