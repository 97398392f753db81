"""Kernel tests run where the kernel can do ipip/IPVS/dummy: here, or batched into one lab-kernel boot.

Tests marked `kernel` need a node-like kernel. When this host's kernel lacks the features, every
selected kernel test is run in ONE user-mode-Linux boot (fabric.labkernel) and each outer test item
reports its inner result: pass, fail (with the inner traceback), or skip (with the inner reason).
A kernel test that the inner run did not report fails; nothing is counted as passing unseen.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

from fabric import labkernel

RESULTS_ENV = "FABRIC_KERNEL_RESULTS"
_state: dict = {"ran": False, "results": {}, "output": "", "rc": None}


def _needs_proxy(config: pytest.Config) -> bool:
    if labkernel.in_lab_kernel():
        return False
    if "capable" not in _state:
        _state["capable"] = labkernel.capable()[0]
    return not _state["capable"]


@pytest.hookimpl(trylast=True)  # after -k/-m deselection, so only selected tests go to the lab kernel
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    kernel_items = [i for i in items if i.get_closest_marker("kernel")]
    if not kernel_items or not _needs_proxy(config):
        return
    _state["nodeids"] = [i.nodeid for i in kernel_items]
    for item in kernel_items:
        item.runtest = _proxy_runtest(item)  # type: ignore[method-assign]
        # Fixtures would otherwise set up on this host kernel; the inner run sets them up for real.
        item._fabric_proxied = True  # type: ignore[attr-defined]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if getattr(item, "_fabric_proxied", False):
        item.fixturenames = []  # type: ignore[attr-defined]
        if hasattr(item, "funcargs"):
            item.funcargs = {}  # type: ignore[attr-defined]


def _run_batch(config: pytest.Config) -> None:
    _state["ran"] = True
    root = Path(config.rootpath)
    fd, results = tempfile.mkstemp(prefix="fabric-kernel-results-", suffix=".json", dir="/tmp")
    os.close(fd)
    os.environ[RESULTS_ENV] = results
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "addopts=-ra",
           "-m", "kernel", *_state["nodeids"]]
    capman = config.pluginmanager.getplugin("capturemanager")
    tw = config.get_terminal_writer()
    with capman.global_and_fixture_disabled():
        tw.line()
        tw.sep("=", f"kernel tests: {len(_state['nodeids'])} in the lab kernel (one boot)", bold=True)
        try:
            r = labkernel.run(cmd, timeout=float(os.environ.get("FABRIC_KERNEL_TIMEOUT", "1500")), cwd=str(root),
                              stream=True)
            _state["rc"], _state["output"] = r.returncode, r.output
        except labkernel.LabKernelError as e:
            _state["rc"], _state["output"] = 125, f"lab kernel unavailable: {e}"
            tw.line(_state["output"], red=True)
        tw.sep("=", f"kernel tests: lab kernel run ended ({_state['rc']})", bold=True)
    try:
        _state["results"] = json.loads(Path(results).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        _state["results"] = {}
    finally:
        Path(results).unlink(missing_ok=True)
        os.environ.pop(RESULTS_ENV, None)


def _proxy_runtest(item: pytest.Item):
    def runtest() -> None:
        if not _state["ran"]:
            _run_batch(item.config)
        res = _state["results"].get(item.nodeid)
        if res is None:
            tail = _state["output"][-3000:]
            pytest.fail(f"no result from the lab kernel for {item.nodeid} (run exit {_state['rc']}):\n{tail}",
                        pytrace=False)
        if res["outcome"] == "skipped":
            pytest.skip(f"[lab kernel] {res['text']}")
        if res["outcome"] == "failed":
            pytest.fail(f"[lab kernel, {res['when']}]\n{res['text']}", pytrace=False)

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
