"""Fixtures of the reliability tests: the hub tests' real brokers and hub-with-fake-clients fixture."""

from tests.hub.conftest import broker_kind, start_federation  # noqa: F401  (fixtures)
