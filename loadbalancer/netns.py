"""Run kernel work inside one network namespace: a dedicated thread that entered it with setns(2).

setns(CLONE_NEWNET) changes only the calling thread, so the agent's other threads stay where they
are. Sockets opened on this thread (netlink, HTTP listeners) belong to the namespace for their whole
life; /proc/thread-self/net and /proc/sys/net opened here show the namespace; subprocesses started
here (nft, conntrack) inherit it. With `netns=None` the thread simply stays in our own namespace.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable
from typing import TypeVar

from pyroute2 import netns as pr_netns

T = TypeVar("T")


class NetnsError(RuntimeError):
    pass


class NetnsThread:
    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{netns or 'own'}")
        if netns is not None:
            if not os.path.exists(f"/run/netns/{netns}") and not os.path.exists(f"/var/run/netns/{netns}"):
                raise NetnsError(f"network namespace {netns!r} does not exist")
            self.call(pr_netns.setns, netns, 0)

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
