"""Real MQTT brokers for tests: the hub's embedded amqtt broker and a mosquitto process.

Import the fixtures into a ``conftest.py`` to use them::

    from tests.brokers import any_broker, embedded_broker, mosquitto_broker  # noqa: F401

Each fixture yields a :class:`RunningBroker` (``url``, ``address``, ``protocol`` to pass
to ``MqttLink``) on a free loopback port, and stops the broker at teardown. mosquitto is
started from a config file the fixture writes (anonymous, no persistence, loopback only)
and killed at teardown; tests that need to kill or restart it use
:class:`MosquittoProcess` directly. Without a ``mosquitto`` binary those tests skip.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedvlm.hub.broker import EmbeddedBroker
from fedvlm.shared.mqtt_link import BrokerAddress

__all__ = [
    "RunningBroker",
    "MosquittoProcess",
    "free_port",
    "wait_for_port",
    "embedded_broker",
    "mosquitto_broker",
    "any_broker",
]

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s") from None
            time.sleep(0.02)


@dataclasses.dataclass(frozen=True)
class RunningBroker:
    """A broker a test can connect to."""

    kind: str  # "embedded" or "mosquitto"
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(host=self.host, port=self.port)

    @property
    def protocol(self) -> str:
        """What MqttLink should speak: amqtt is MQTT 3.1.1 only, mosquitto speaks 5."""
        return "3.1.1" if self.kind == "embedded" else "5"


class MosquittoProcess:
    """A mosquitto on a free loopback port, configured by a file in ``directory``."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        binary = shutil.which("mosquitto")
        if binary is None:
            pytest.skip("mosquitto is not installed")
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config_path = self.directory / "mosquitto.conf"
        self.log_path = self.directory / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def broker(self) -> RunningBroker:
        return RunningBroker("mosquitto", LOOPBACK, self.port)

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        """Write the config, start mosquitto and wait until it listens (restartable)."""
        self._write_config()
        return self._launch(timeout)

    def _write_config(self) -> None:
        self.config_path.write_text(
            f"listener {self.port} {LOOPBACK}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            # The hub acknowledges updates only once stored: the broker keeps its backlog.
            "max_queued_messages 1000000\n"
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )

    def _launch(self, timeout: float) -> MosquittoProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([self.binary, "-c", str(self.config_path)], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                log_text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise RuntimeError(f"mosquitto exited with {self.process.returncode} on port {self.port}: "
                                   f"{log_text[-2000:]}")  # fmt: skip
            try:
                wait_for_port(LOOPBACK, self.port, timeout=0.2)
                return self
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise

    def stop(self) -> None:
        """Terminate (then kill) the process and reap it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None


@pytest.fixture
def embedded_broker() -> Iterator[RunningBroker]:
    """The hub's embedded amqtt broker (MQTT 3.1.1) on a free loopback port."""
    broker = EmbeddedBroker(LOOPBACK, free_port()).start()
    try:
        yield RunningBroker("embedded", broker.host, broker.port)
    finally:
        broker.stop()


@pytest.fixture
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """A mosquitto process on a free loopback port, killed at teardown (skips without mosquitto)."""
    process = MosquittoProcess(tmp_path_factory.mktemp("mosquitto")).start()
    try:
        yield process.broker
    finally:
        process.stop()


@pytest.fixture(params=["embedded", "mosquitto"])
def any_broker(request: pytest.FixtureRequest) -> Iterator[RunningBroker]:
    """Each test using it runs once over the embedded broker and once over mosquitto."""
    yield request.getfixturevalue(f"{request.param}_broker")
