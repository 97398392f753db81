"""A Kubernetes API server test double speaking the real list/watch wire format (see server.py).

Import as `tests.fakeapi`.
"""

from .server import RESOURCES, FakeApiServer, Resource

__all__ = ["FakeApiServer", "Resource", "RESOURCES"]
