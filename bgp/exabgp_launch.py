"""How the speaker runs ExaBGP: `python -m bgp.exabgp_launch [--timers FILE] [--api-socket SOCKET] CONFIG`.

ExaBGP from this environment, with bgp.exabgp_reactor installed first (event-driven waits instead of
a 10 ms poll, connectRetry, keepalive per neighbor from FILE) and, with --api-socket, bgp.exabgp_api
(its API on the agent's socket directly, no relay process). Settings come from the environment
as for `exabgp` itself (bgp.exabgp_config.environment). Only ExaBGP's server module is imported,
not its CLI front end (start-up time: every node pays it at every start).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bgp.exabgp_config import PROCESS_NAME


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bgp.exabgp_launch", description=__doc__.splitlines()[0])
    ap.add_argument("--timers", type=Path, help="per-neighbor keepalive / connectRetry (JSON, written by the speaker)")
    ap.add_argument("--api-socket", help="connect ExaBGP's API to this unix socket instead of starting the helper "
                    f"process the config names ({PROCESS_NAME!r})")
    ap.add_argument("config", help="the ExaBGP configuration file")
    args = ap.parse_args(argv)

    from bgp import exabgp_api, exabgp_reactor

    exabgp_reactor.install(args.timers)
    if args.api_socket:
        exabgp_api.install(PROCESS_NAME, args.api_socket)
    from exabgp.application import server

    sys.argv = ["exabgp", args.config]
    server.main()  # exits with ExaBGP's status
    return 0


if __name__ == "__main__":
    sys.exit(main())
