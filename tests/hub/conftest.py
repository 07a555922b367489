"""Fixtures of the hub tests: real brokers (tests/brokers.py) and a hub with fake clients."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from fedvlm.hub.clients import register_client
from fedvlm.hub.config import HubConfig
from fedvlm.hub.console import Console
from fedvlm.hub.service import HubService
from tests.brokers import (  # noqa: F401  (fixtures)
    MosquittoProcess,
    RunningBroker,
    any_broker,
    embedded_broker,
    free_port,
    mosquitto_broker,
)
from tests.hub.fake_clients import FakeClient

FEDERATION = "fed"


@dataclasses.dataclass
class Federation:
    """A running hub, its broker, and registered fake clients (connected on demand)."""

    hub: HubService
    broker: RunningBroker
    config: HubConfig
    secrets: dict[str, str]
    clients: dict[str, FakeClient]

    def connect(self, *names: str, announce: bool = True) -> list[FakeClient]:
        connected = []
        for name in names:
            client = FakeClient(self.broker, self.config.federation, name, self.secrets.get(name),
                                lora=self.config.lora, strategy=self.config.strategy)  # fmt: skip
            self.clients[name] = client.connect(announce=announce)
            connected.append(client)
        return connected


@pytest.fixture(params=["embedded", "mosquitto"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Run a test over the hub's own embedded broker and over an external mosquitto."""
    return request.param


@pytest.fixture
def start_federation(tmp_path: Path) -> Iterator[Callable[..., Federation]]:
    """``start_federation(broker_kind, clients=(...), **HubConfig fields)`` -> Federation.

    "embedded": the hub starts its own amqtt broker on a free port (the default setup);
    "mosquitto": a mosquitto process the fixture starts, passed to the hub as --broker.
    """
    federations: list[Federation] = []
    brokers: list[MosquittoProcess] = []

    def start(broker_kind: str = "embedded", clients: tuple[str, ...] = ("a", "b", "c"),
              on_checkpoint: Callable[[str], None] | None = None, **settings: Any) -> Federation:  # fmt: skip
        state_dir = tmp_path / f"hub-{len(federations)}"
        secrets = {name: register_client(state_dir, name) for name in clients}
        settings = {"federation": FEDERATION, "state_dir": state_dir, "round_timeout_s": 20.0,
                    "done_linger_s": 0.0, **settings}  # fmt: skip
        if broker_kind == "embedded":
            port = free_port()
            config = HubConfig(embedded_port=port, **settings)
            broker = RunningBroker("embedded", "127.0.0.1", port)
        else:
            process = MosquittoProcess(tmp_path / f"mosquitto-{len(brokers)}").start()
            brokers.append(process)
            broker = process.broker
            config = HubConfig(broker=broker.url, **settings)
        hub = HubService(config, console=Console(), on_checkpoint=on_checkpoint).start()
        federation = Federation(hub, broker, config, secrets, {})
        federations.append(federation)
        return federation

    yield start
    for federation in federations:
        for client in federation.clients.values():
            client.close(announce_offline=False)
        federation.hub.stop()
    for process in brokers:
        process.stop()
