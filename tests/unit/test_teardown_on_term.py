"""A test run stopped with SIGTERM (`timeout`, a cancelled job) tears its fixtures down: here a real network
namespace made by a module fixture is gone afterwards (before, it stayed on the host)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TEST = '''
import subprocess, time, pytest
from pathlib import Path

@pytest.fixture(scope="module")
def ns():
    subprocess.run(["ip", "netns", "add", "{ns}"], check=True)
    try:
        yield "{ns}"
    finally:
        subprocess.run(["ip", "netns", "del", "{ns}"], check=True)

def test_long(ns):
    Path("{marker}").write_text("in")
    time.sleep(60)
'''


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ip netns")
def test_sigterm_tears_a_module_fixture_down(tmp_path: Path) -> None:
    ns, marker = f"termtest-{uuid.uuid4().hex[:6]}", tmp_path / "marker"
    (tmp_path / "test_x.py").write_text(TEST.format(ns=ns, marker=marker))
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                          "tests.teardown_on_term", str(tmp_path / "test_x.py")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0] if p.poll() else "no start"
            time.sleep(0.05)
        assert ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        p.send_signal(signal.SIGTERM)
        out = p.communicate(timeout=30)[0]
        left = ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        if p.poll() is None:
            p.kill()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # only if the run left it
    assert not left, out
    assert p.returncode != 0, out  # interrupted, not passed
