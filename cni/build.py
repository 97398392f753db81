"""Build the plugin executable (cni/shim/bgp-fabric.c) with the system C compiler, statically linked.

`python -m cni.build [--out PATH]` (scripts/setup and the Dockerfile run it). `plugin()` returns a
built plugin for tests and labs: `$BGP_FABRIC_CNI_PLUGIN` if set, else `.cache/cni/bgp-fabric` in the
repository, rebuilt when the source is newer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "shim" / "bgp-fabric.c"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "cni"
NAME = "bgp-fabric"  # the plugin's `type` in the conflist is its file name
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-static", "-s"]


class BuildError(RuntimeError):
    pass


def build(out: Path, cc: str | None = None) -> Path:
    cc = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise BuildError("no C compiler (apt-get install gcc libc6-dev)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    r = subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{cc} failed: {(r.stderr or r.stdout).strip()[-1500:]}")
    tmp.chmod(0o755)
    tmp.replace(out)
    return out


def plugin() -> Path:
    env = os.environ.get("BGP_FABRIC_CNI_PLUGIN")
    if env:
        return Path(env)
    out = CACHE / NAME
    if not out.exists() or out.stat().st_mtime < SOURCE.stat().st_mtime:
        build(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cni.build", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=CACHE / NAME)
    args = ap.parse_args(argv)
    try:
        print(build(args.out))
    except (BuildError, subprocess.TimeoutExpired) as e:
        print(f"cni.build: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
