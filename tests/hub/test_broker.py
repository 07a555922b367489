"""The embedded broker: serves MQTT 3.1.1, stops promptly, and explains a taken port."""

from __future__ import annotations

import queue
import time

import pytest

from fedvlm.hub.broker import EmbeddedBroker
from fedvlm.hub.errors import BrokerPortInUse
from fedvlm.shared.mqtt_link import MqttLink
from tests.brokers import RunningBroker, free_port


def test_embedded_broker_keeps_and_clears_retained_messages(embedded_broker: RunningBroker):
    publisher = MqttLink(embedded_broker.address, "pub", protocol="3.1.1").connect(5)
    publisher.publish("t/a", b"kept", retain=True)
    received: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
    subscriber = MqttLink(embedded_broker.address, "sub", protocol="3.1.1").connect(5)
    subscriber.subscribe("t/+", lambda topic, payload, retained: received.put((topic, payload, retained)))
    assert received.get(timeout=5) == ("t/a", b"kept", True)
    publisher.publish("t/a", b"", retain=True)  # deletion reaches live subscribers as an empty message
    assert received.get(timeout=5) == ("t/a", b"", False)
    late: queue.Queue[bytes] = queue.Queue()
    third = MqttLink(embedded_broker.address, "late", protocol="3.1.1").connect(5)
    third.subscribe("t/+", lambda topic, payload, retained: late.put(payload))
    with pytest.raises(queue.Empty):
        late.get(timeout=0.3)
    for link in (publisher, subscriber, third):
        link.close()


def test_a_taken_port_is_reported_with_the_way_out():
    port = free_port()
    with EmbeddedBroker(port=port):
        with pytest.raises(BrokerPortInUse) as caught:
            EmbeddedBroker(port=port).start()
    message = str(caught.value)
    assert f"port {port}" in message and f"--broker mqtt://127.0.0.1:{port}" in message and "--port" in message


def test_stop_is_prompt_with_connected_clients_and_frees_the_port():
    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    link = MqttLink(broker.address, "still-connected", protocol="3.1.1").connect(5)
    started = time.monotonic()
    broker.stop()
    assert time.monotonic() - started < broker.stop_timeout + 1
    link.close()
    EmbeddedBroker(port=port).start().stop()  # the port is free again
