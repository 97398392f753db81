"""Run the fake API server as a process: `python -m tests.fakeapi --listen ADDR:PORT --control SOCK ...`.

Prints `ready URL` on stdout once it listens, then serves until SIGTERM/SIGINT. With `--state FILE`
its objects survive a restart (see FakeApiServer); with `--kubeconfig FILE` it writes a kubeconfig
pointing at itself.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .control import serve_control
from .server import FakeApiServer

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{url}"}}}}]
users: [{{name: agent, user: {{token: not-a-real-token}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: agent}}}}]
current-context: fake
"""


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ADDRESS:PORT, like 10.0.1.1:6443")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fakeapi", description=__doc__.splitlines()[0])
    ap.add_argument("--listen", type=_address, default=("127.0.0.1", 0), help="ADDRESS:PORT (port 0: any)")
    ap.add_argument("--control", required=True, help="Unix socket path of the control API")
    ap.add_argument("--state", help="JSON file holding objects across restarts")
    ap.add_argument("--kubeconfig", help="write a kubeconfig for this server here")
    args = ap.parse_args(argv)

    host, port = args.listen
    fake = FakeApiServer(host, port, state_file=args.state)
    try:
        fake.start()
    except OSError as e:
        print(f"fakeapi: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 2
    control = serve_control(fake, args.control)
    if args.kubeconfig:
        with open(args.kubeconfig, "w") as f:
            f.write(KUBECONFIG.format(url=fake.url))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"ready {fake.url}", flush=True)
    done.wait()
    control.shutdown()
    control.server_close()
    fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
