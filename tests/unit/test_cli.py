"""The CLI parses every option before anything boots: `--help` works everywhere and never starts a kernel."""

from __future__ import annotations

import argparse
import subprocess

import pytest

from fabric import cli
from fabric.lab import kernel as labkernel, vm as labvm


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _commands(sub, prefix + (name,))
    return out


@pytest.fixture
def nothing_boots(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def forbidden(name: str):
        def f(*a, **kw):
            calls.append(name)
            raise AssertionError(f"{name} called while parsing options")
        return f

    monkeypatch.setattr(labkernel, "run", forbidden("labkernel.run"))
    monkeypatch.setattr(labvm, "run", forbidden("labvm.run"))
    monkeypatch.setattr(subprocess, "Popen", forbidden("subprocess.Popen"))
    return calls


def test_help_works_for_every_command_and_boots_nothing(nothing_boots: list[str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    commands = _commands(cli.build_parser())
    assert ("lab-kernel", "run") in commands and ("lab", "run") in commands
    for cmd in commands:
        with pytest.raises(SystemExit) as e:
            cli.main([*cmd, "--help"])
        assert e.value.code == 0, cmd
        assert "usage: fabric" in capsys.readouterr().out, cmd
    assert nothing_boots == []


def test_lab_kernel_run_takes_its_options_before_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[list[str], float]] = []

    def fake_run(command, timeout, **kw):
        seen.append((command, timeout))
        return labkernel.RunResult(3, "")

    monkeypatch.setattr(labkernel, "run", fake_run)
    # options after -- belong to the command, including --help
    assert cli.main(["lab-kernel", "run", "--timeout", "7", "--", "python", "-m", "x", "--help"]) == 3
    assert cli.main(["lab-kernel", "--timeout", "9", "run", "--", "ip", "-br", "link"]) == 3
    assert seen == [(["python", "-m", "x", "--help"], 7.0), (["ip", "-br", "link"], 9.0)]
    assert cli.main(["lab-kernel", "run"]) == 2  # no command: a usage error, nothing boots
    assert len(seen) == 2


def test_lab_kernel_run_mem_is_an_option_with_the_default_2g(monkeypatch: pytest.MonkeyPatch) -> None:
    mems: list[str] = []
    monkeypatch.setattr(labkernel, "run", lambda command, timeout, mem, **kw: mems.append(mem) or
                        labkernel.RunResult(0, ""))
    assert cli.main(["lab-kernel", "run", "--mem", "6G", "--", "true"]) == 0
    assert cli.main(["lab-kernel", "run", "--", "true", "--mem", "1G"]) == 0  # after --: the command's
    assert mems == ["6G", "2G"]
