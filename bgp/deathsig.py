"""`python -m bgp.deathsig PROGRAM ARGS...`: exec PROGRAM with PR_SET_PDEATHSIG=SIGKILL set.

The fallback of `setpriv --pdeathsig KILL` where util-linux is missing: the speaker must never set the
death signal from a `preexec_fn` (a fork of a multi-threaded process may deadlock before exec). The
death signal survives exec, so PROGRAM dies when the process that started us dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m bgp.deathsig PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    if os.getppid() == 1:
        return 1  # the parent died before the death signal was armed: don't run orphaned
    os.execvp(argv[0], argv)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
