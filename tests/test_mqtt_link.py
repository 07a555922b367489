"""MqttLink against real brokers: URLs, clear connection errors, ordered windowed publishing, MQTT 5 extras."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from fedvlm.shared.mqtt_link import BrokerAddress, BrokerUnavailable, Mqtt5Extras, MqttLink, topic_matcher
from tests.brokers import any_broker, embedded_broker, free_port, mosquitto_broker  # noqa: F401


def test_broker_urls():
    plain = BrokerAddress.parse("mqtt://127.0.0.1")
    assert (plain.host, plain.port, plain.tls) == ("127.0.0.1", 1883, False)
    secure = BrokerAddress.parse("mqtts://dev%40fleet:p%3Ass@broker.example:8884")
    assert (secure.host, secure.port, secure.tls, secure.username, secure.password) == (
        "broker.example", 8884, True, "dev@fleet", "p:ss")
    assert "p:ss" not in secure.url() and "p:ss" not in repr(secure)
    assert BrokerAddress.parse("mqtts://h").port == 8883
    for bad in ("http://h:1883", "mqtt://", "mqtt://h:notaport"):
        with pytest.raises(ValueError, match="broker URL"):
            BrokerAddress.parse(bad)


def test_topic_matching_answers_as_paho_does():
    """``topic_matcher`` (made once per subscription) against paho's ``topic_matches_sub`` on
    every pair of a grid of filters and topics: wildcards at each level, a trailing ``#`` and
    its parent level, empty levels, ``$`` topics, shared subscriptions, malformed filters."""
    import paho.mqtt.client as mqtt

    filters = ["#", "+", "a", "a/b", "a/+", "a/#", "+/b", "+/+", "+/#", "a/+/c", "a/+/#", "$SYS/#", "$SYS/+",
               "+/a/#", "/", "/+", "+/", "a//b", "a/+/+", "a/b/c/d", "$share/g/a/+", "$share/g/#", "a/#/b", "a+/b",
               "a/b#"]  # fmt: skip
    topics = ["a", "a/b", "a/c", "b/b", "a/b/c", "a/x/c", "a/b/c/d", "", "/", "/a", "a/", "a//b", "$SYS", "$SYS/x",
              "$SYS/x/y", "$x/a", "b", "a/#/b", "a+/b", "fedvlm/v1/f/updates/d1/00ff"]  # fmt: skip
    for topic_filter in filters:
        matches = topic_matcher(topic_filter)
        plain = topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter
        for topic in topics:
            assert matches(topic) == mqtt.topic_matches_sub(plain, topic), (topic_filter, topic)


def test_unreachable_broker_is_a_clear_error_at_once():
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="Connection refused.*Is it running"):
        MqttLink(BrokerAddress("127.0.0.1", free_port()), "nobody").connect(timeout=5)
    assert time.monotonic() - started < 3


def test_unusable_tls_files_are_named_in_one_clear_error(tmp_path):
    """A CA file or client certificate that is missing or not PEM: a UsageError naming the
    file and its flag, before any connection attempt (not an ssl traceback)."""
    from fedvlm.shared.usage_error import UsageError

    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("this is not a certificate\n")
    for ca_file, reason in ((str(not_pem), "ca.txt"), (str(tmp_path / "missing.pem"), "No such file")):
        address = BrokerAddress.parse(f"mqtts://127.0.0.1:{free_port()}", ca_file=ca_file)
        with pytest.raises(UsageError, match=f"CA file .*--ca-file.*{reason}|CA file .*{reason}.*--ca-file"):
            MqttLink(address, "tls-client").connect(timeout=2)
    address = BrokerAddress.parse(f"mqtts://127.0.0.1:{free_port()}", cert_file=str(not_pem))
    with pytest.raises(UsageError, match="client certificate .*--cert-file"):
        MqttLink(address, "tls-client").connect(timeout=2)


def _collector(link: MqttLink, topic_filter: str):
    received, done = [], threading.Event()

    def on_message(topic, payload, retained):
        received.append((topic, payload))
        done.set()

    link.subscribe(topic_filter, on_message)
    return received, done


def test_publish_many_delivers_in_order(any_broker):  # noqa: F811
    receiver = MqttLink(any_broker.address, "receiver", protocol=any_broker.protocol).connect()
    sender = MqttLink(any_broker.address, "sender", protocol=any_broker.protocol).connect()
    try:
        received, _ = _collector(receiver, "t/#")
        time.sleep(0.3)
        messages = [(f"t/{i % 3}", i.to_bytes(4, "big") * 1000) for i in range(100)]
        sender.publish_many(messages, window=8)
        deadline = time.monotonic() + 10
        while len(received) < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [payload for _, payload in received] == [payload for _, payload in messages]
    finally:
        sender.close()
        receiver.close()


def test_nowait_publishes_go_through_a_bounded_window_in_order(mosquitto_broker):  # noqa: F811
    """A stream is pulled only as PUBACKs make room: never more than the window in paho at
    once (the hub's 10,000 selections and acks used to sit in paho together), nothing lost,
    everything in the order it was published, waited or not, and close() delivers what waits."""
    receiver = MqttLink(mosquitto_broker.address, "receiver").connect()
    sender = MqttLink(mosquitto_broker.address, "sender", publish_window=3).connect()
    try:
        received, _ = _collector(receiver, "w/#")
        assert receiver.wait_subscribed(5)
        in_paho_at_pull = []

        def stream():
            for index in range(60):
                in_paho_at_pull.append(len(sender._client._out_messages))
                yield "w/stream", index.to_bytes(2, "big")

        sender.publish_stream(stream(), qos=1)
        for index in range(60, 80):
            sender.publish_nowait("w/nowait", index.to_bytes(2, "big"))
        sender.publish("w/waited", (80).to_bytes(2, "big"))  # after everything published before it
        sender.publish_stream(("w/at-close", index.to_bytes(2, "big")) for index in range(81, 100))
        sender.close()  # delivers what still waits (a hub's last acks) before it disconnects
        deadline = time.monotonic() + 10
        while len(received) < 100 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [int.from_bytes(payload, "big") for _, payload in received] == list(range(100))
        # (pulled from a PUBACK: paho still holds the confirmed message while it reports it)
        assert len(in_paho_at_pull) == 60 and max(in_paho_at_pull) <= 3
        assert sender.backlog_length == 0 and not sender._in_paho
    finally:
        sender.close()
        receiver.close()


def test_once_wait_subscribed_returns_the_broker_routes_what_others_publish(any_broker):  # noqa: F811
    """A hub worker relies on it: a round opens only once its subscription is acknowledged,
    and a message published before that on another connection would be dropped."""
    receiver = MqttLink(any_broker.address, "receiver", protocol=any_broker.protocol).connect()
    sender = MqttLink(any_broker.address, "sender", protocol=any_broker.protocol).connect()
    try:
        assert receiver.wait_subscribed(5)  # nothing to wait for
        for index in range(20):
            _, done = _collector(receiver, f"s/{index}")
            assert receiver.wait_subscribed(5) and not receiver.refused_subscriptions
            sender.publish(f"s/{index}", b"x")
            assert done.wait(5), f"message {index} published after the SUBACK was not delivered"
    finally:
        sender.close()
        receiver.close()


def test_mqtt5_extras_reach_an_mqtt5_subscriber(mosquitto_broker):  # noqa: F811
    import paho.mqtt.client as mqtt

    got, arrived = [], threading.Event()
    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="props", protocol=mqtt.MQTTv5)
    subscriber.on_message = lambda client, userdata, message: (got.append(message.properties), arrived.set())
    subscriber.connect(mosquitto_broker.host, mosquitto_broker.port)
    subscriber.subscribe("x/1", qos=1)
    subscriber.loop_start()
    sender = MqttLink(mosquitto_broker.address, "sender", protocol="5").connect()
    try:
        time.sleep(0.3)
        sender.publish("x/1", b"chunk", extras=Mqtt5Extras(expiry_s=120, content_type="application/x-test",
                                                            user_properties=(("fedvlm-kind", "update"),)))
        assert arrived.wait(5)
        properties = got[0]
        assert properties.ContentType == "application/x-test"
        assert ("fedvlm-kind", "update") in properties.UserProperty
        assert 0 < properties.MessageExpiryInterval <= 120
    finally:
        sender.close()
        subscriber.loop_stop()
        subscriber.disconnect()


def test_mqtt5_extras_are_dropped_on_mqtt311(embedded_broker):  # noqa: F811
    receiver = MqttLink(embedded_broker.address, "receiver", protocol="3.1.1").connect()
    sender = MqttLink(embedded_broker.address, "sender", protocol="3.1.1").connect()
    try:
        received, arrived = _collector(receiver, "x/1")
        time.sleep(0.3)
        sender.publish("x/1", b"chunk", extras=Mqtt5Extras(expiry_s=5, user_properties=(("k", "v"),)))
        assert arrived.wait(5) and received == [("x/1", b"chunk")]
    finally:
        sender.close()
        receiver.close()


def test_falling_back_to_mqtt311_is_quiet_and_a_later_loss_is_not(embedded_broker, caplog):  # noqa: F811
    """amqtt speaks only 3.1.1: ``auto`` falls back without claiming it lost a broker it
    never had; a real loss after connecting is still reported."""
    caplog.set_level("WARNING", logger="fedvlm.shared.mqtt_link")
    link = MqttLink(embedded_broker.address, "auto-client", protocol="auto").connect()
    try:
        assert link.protocol == "3.1.1"
        assert not [r for r in caplog.records if "lost the broker" in r.getMessage()]
        link._client.disconnect()  # as if the broker went away (paho reports a disconnect)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not [r for r in caplog.records if "lost the broker" in r.getMessage()]:
            time.sleep(0.05)
        assert [r for r in caplog.records if "lost the broker" in r.getMessage()]
    finally:
        link.close()


def test_one_read_pass_takes_a_few_packets_whatever_is_in_flight(mosquitto_broker):
    """paho reads as many packets per pass as it has messages in flight before writing
    anything; a hub with thousands of acks in flight then sent no PUBACK or ack for seconds.
    The link's client reads a few, so writes go out between reads."""
    import paho.mqtt.client as mqtt

    from fedvlm.shared.mqtt_link import _READS_BEFORE_WRITING, _fair_client_class

    address = mosquitto_broker.address
    received = []
    client = _fair_client_class()(mqtt.CallbackAPIVersion.VERSION2, client_id="reader")
    client.on_message = lambda c, u, message: received.append(message.topic)
    subscribed, confirmed = [], []
    client.on_publish = lambda *args: confirmed.append(True)
    client.on_subscribe = lambda *args: subscribed.append(True)
    client.connect(address.host, address.port)
    deadline = time.monotonic() + 10
    while not client.is_connected() and time.monotonic() < deadline:
        client.loop(0.1)
    client.subscribe("fair/#", qos=0)
    while not subscribed and time.monotonic() < deadline:
        client.loop(0.1)
    for index in range(50):  # 50 QoS 1 messages in flight: stock paho would read 50 packets a pass
        client.publish(f"elsewhere/{index}", b"x", qos=1)
    sender = MqttLink(address, "sender", persistent_session=False).connect(10)
    try:
        sender.publish_many([(f"fair/{index}", b"y") for index in range(40)], qos=1)
        client.loop_write()
        time.sleep(0.5)  # let the broker deliver them into the reader's socket
        client.loop_read()
        first_pass = len(received) + len(confirmed)  # the broker's PUBACKs are packets too
        assert first_pass == _READS_BEFORE_WRITING
        deadline = time.monotonic() + 10
        while len(received) < 40 and time.monotonic() < deadline:
            client.loop(0.1)
        assert len(received) == 40
    finally:
        sender.close()
        client.disconnect()


class _CuttableProxy:
    """A TCP relay to the broker that can drop every connection and refuse new ones (the
    client loses its broker while the broker keeps its persistent session), and can swallow
    what the client sends (a half-open link: the client's packets never arrive)."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, free_port()
        self.swallow_client_bytes = False
        self._pairs: list = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if not (from_client and self.swallow_client_bytes):
                    sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.close()

    def cut(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accepting thread (close alone would not free the port)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for pair in self._pairs:
            for end in pair:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
        self._pairs.clear()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("unsubscribed", ["while disconnected", "into a half-open link"])
def test_a_dropped_filter_is_unsubscribed_at_the_broker_after_a_reconnect(mosquitto_broker, protocol: str,  # noqa: F811
                                                                         unsubscribed: str) -> None:  # fmt: skip
    """A persistent session keeps its subscriptions at the broker across a reconnect: one the
    link dropped while it had no connection, or whose UNSUBSCRIBE went into a connection that
    was already dead (never acknowledged), must be unsubscribed there after the reconnect, or
    the broker goes on sending messages nobody here handles."""
    proxy = _CuttableProxy(mosquitto_broker.address.port)
    link = MqttLink(BrokerAddress("127.0.0.1", proxy.port), f"dropper-{protocol}", protocol=protocol,
                    reconnect_min_s=0.1, reconnect_max_s=0.2)
    publisher = MqttLink(mosquitto_broker.address, f"dropper-publisher-{protocol}", protocol=protocol).connect()
    delivered_topics: list[str] = []
    try:
        kept, kept_arrived = _collector(link, "keep/#")
        _collector(link, "drop/#")
        link.connect()
        paho_on_message = link._client.on_message  # every delivery to this connection, handled or not

        def spy(client, userdata, message):
            delivered_topics.append(message.topic)
            paho_on_message(client, userdata, message)

        link._client.on_message = spy
        assert link.wait_subscribed(5)
        if unsubscribed == "into a half-open link":
            proxy.swallow_client_bytes = True
            link.unsubscribe("drop/#")
            assert not link.wait_subscribed(0.3), "the broker cannot have acknowledged a swallowed UNSUBSCRIBE"
        proxy.cut()
        deadline = time.monotonic() + 5
        while link.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not link.connected.is_set(), "the link did not notice the cut"
        if unsubscribed == "while disconnected":
            link.unsubscribe("drop/#")
        proxy.swallow_client_bytes = False
        proxy.restore()
        assert link.connected.wait(10) and link.wait_subscribed(5)
        publisher.publish("drop/x", b"unwanted")
        publisher.publish("keep/x", b"wanted")  # after drop/x on the same session: its arrival bounds the wait
        assert kept_arrived.wait(5), "the kept subscription lost its messages after the reconnect"
        time.sleep(0.2)
        assert "drop/x" not in delivered_topics, "the broker still sends the dropped filter's messages"
        assert kept == [("keep/x", b"wanted")]
    finally:
        publisher.close()
        link.close()
        proxy.cut()
