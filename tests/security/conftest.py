"""Fixtures of the security tests: the hub tests' running federation with fake clients."""

from tests.hub.conftest import start_federation  # noqa: F401  (fixture)
