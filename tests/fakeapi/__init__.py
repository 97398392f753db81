"""A Kubernetes API server test double speaking the real list/watch wire format (see server.py).

Import as `fakeapi` (pytest puts tests/ on sys.path because tests/conftest.py lives there).
"""

from fakeapi.server import RESOURCES, FakeApiServer, Resource

__all__ = ["FakeApiServer", "Resource", "RESOURCES"]
