"""One MQTT connection, as the edge and the hub both use it (paho-mqtt 2.x).

What it adds to paho: broker URLs (``mqtt://user:pass@host:port``, ``mqtts://`` for TLS),
a blocking ``connect`` with an error a person can act on, publishes that wait for the
broker's acknowledgement (``publish``, ``publish_many``) or do not (``publish_nowait``,
``publish_stream``: pipelined through a bounded window, see below), subscriptions that
come back after a reconnect, reconnection with exponential back-off, and a last will.

Publishes nobody waits on go through a window: at most ``publish_window`` of them are in
paho at once (each costs paho ~2 KB until the broker's PUBACK); the rest wait in order in
the link's backlog, in their compact form (topic and payload, or a generator that makes
them when their turn comes: ``publish_stream``), and each PUBACK lets the next one in, on
paho's thread. Nobody waits, and the memory they take does not grow with how slowly the
broker confirms: a hub whose PUBACKs queue behind a backlog of chunks at the broker had
~8,000 acks in paho at once, and 10,000 selections at round open.

Acknowledgements to the broker are manual: a message is acknowledged once its handler
returned, or, for a subscription made with ``manual_ack=True``, when the handler's
``ack()`` is called (from any thread). Until then the broker keeps the message, so a
process killed before it judged a message gets it again on its next session, and the
broker's in-flight window (``receive_maximum``) bounds what the process holds. Subscribe
before ``connect``: a resumed persistent session may deliver at once, and a message that
arrives with no handler in place is acknowledged and lost. ``wait_subscribed`` blocks until
the broker has acknowledged every subscription of the connection: only from then on does it
route matching messages here (or, for a shared subscription, to this session's share), so a
process whose subscription must exist before others publish (a hub worker) waits for it. MQTT 5 is used when the broker speaks it
(``protocol="auto"`` tries 5, then falls back to 3.1.1); everything works on 3.1.1.

paho is imported lazily: ``fedvlm.shared`` itself must not need it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import ssl
import threading
import time
import urllib.parse
from typing import Callable, Iterable

from .usage_error import UsageError

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes, bool], None]  # topic, payload, retained
# topic, payload, retained, ack(): a handler that acknowledges the message when it is safe.
ManualAckHandler = Callable[[str, bytes, bool, Callable[[], None]], None]


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached or refused the connection."""


@dataclasses.dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to authenticate. Parse one with :meth:`parse`."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def parse(cls, url: str, *, username: str | None = None, password: str | None = None,
              ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> "BrokerAddress":
        """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://…`` (TLS, default port 8883)."""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise UsageError(f"broker URL {url!r} must start with mqtt:// or mqtts:// (TLS), e.g. mqtt://127.0.0.1:1883")
        if not parsed.hostname:
            raise UsageError(f"broker URL {url!r} names no host, e.g. mqtt://127.0.0.1:1883")
        tls = parsed.scheme in ("mqtts", "ssl")
        try:
            port = parsed.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise UsageError(f"broker URL {url!r} has an invalid port") from exc
        return cls(
            host=parsed.hostname,
            port=port,
            tls=tls or bool(ca_file),
            username=username or (urllib.parse.unquote(parsed.username) if parsed.username else None),
            password=password or (urllib.parse.unquote(parsed.password) if parsed.password else None),
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )

    def url(self) -> str:
        """The URL without the password, for logs and messages."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclasses.dataclass(frozen=True)
class Mqtt5Extras:
    """MQTT 5 publish properties; ignored on an MQTT 3.1.1 connection.

    Receivers never depend on them (every fact is in the payload): they let a broker drop
    messages nobody can use any more (``expiry_s``) and let broker rules and dashboards
    route and meter traffic without parsing payloads.
    """

    expiry_s: int | None = None
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()

    def to_properties(self):
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.PUBLISH)
        if self.expiry_s is not None:
            properties.MessageExpiryInterval = max(1, int(self.expiry_s))
        if self.content_type:
            properties.ContentType = self.content_type
        if self.user_properties:
            properties.UserProperty = list(self.user_properties)
        return properties


def paho_client(client_id: str, protocol: str, *, persistent_session: bool = True, will: Will | None = None,
                manual_ack: bool = False, max_inflight: int = 100, userdata: object = None):  # fmt: skip
    """A paho 2 client as this project's connections use it (``protocol`` "5" or "3.1.1"):
    a persistent session unless told otherwise, ``will`` as last will, at most
    ``max_inflight`` QoS 1 publishes in flight and no cap on those queued behind them.
    Callbacks, login and TLS are the caller's; connect with ``connect_options``."""
    import paho.mqtt.client as mqtt

    version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
    kwargs: dict = {"callback_api_version": mqtt.CallbackAPIVersion.VERSION2, "client_id": client_id,
                    "protocol": version, "manual_ack": manual_ack, "userdata": userdata}  # fmt: skip
    if version == mqtt.MQTTv311:
        kwargs["clean_session"] = not persistent_session
    client = _fair_client_class()(**kwargs)  # writes go out between reads, see there
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    # Large retained sets (global chunks) arrive in bursts: don't cap in-flight messages low.
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(0)
    return client


def connect_options(protocol: str, *, keepalive: int = 30, persistent_session: bool = True,
                    receive_maximum: int | None = None) -> dict:  # fmt: skip
    """Keyword arguments for a ``paho_client``'s ``connect``: on MQTT 5 the session's expiry
    (kept an hour: subscriptions and queued QoS 1 messages outlive a disconnect) and the
    receive maximum (at most that many unacknowledged QoS 1 messages from the broker)."""
    options: dict = {"keepalive": keepalive}
    if protocol == "5":
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600 if persistent_session else 0
        if receive_maximum is not None:
            properties.ReceiveMaximum = receive_maximum
        options.update(clean_start=not persistent_session, properties=properties)
    return options


class MqttLink:
    """A persistent MQTT session with automatic reconnection.

    Handlers run on paho's network thread: keep them short, hand heavy work to a queue.
    """

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        *,
        will: Will | None = None,
        protocol: str = "auto",
        keepalive: int = 30,
        persistent_session: bool = True,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        receive_maximum: int | None = None,
        publish_window: int = 256,
    ) -> None:
        try:
            import paho.mqtt.client  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("MQTT needs paho-mqtt: pip install 'fedvlm[edge]' or 'fedvlm[hub]'") from exc
        if protocol not in ("auto", "5", "3.1.1"):
            raise UsageError(f"MQTT protocol {protocol!r}: choose auto, 5 or 3.1.1")
        if publish_window < 1:
            raise ValueError(f"publish_window must be at least 1, got {publish_window}")
        self.address = address
        self.client_id = client_id
        self.will = will
        self.keepalive = keepalive
        self.persistent_session = persistent_session
        self._reconnect = (reconnect_min_s, reconnect_max_s)
        self._protocols = ["5", "3.1.1"] if protocol == "auto" else [protocol]
        # MQTT 5: at most this many unacknowledged QoS 1 messages from the broker at once
        # (on MQTT 3.1.1 the broker's own setting, e.g. mosquitto's max_inflight_messages).
        self.receive_maximum = receive_maximum
        # filter -> (qos, handler, manual ack, does a topic match the filter: topic_matcher)
        self._subscriptions: dict[str, tuple[int, MessageHandler, bool, Callable[[str], bool]]] = {}
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self._closing = False
        self._client = None
        self.protocol: str | None = None
        self._connect_error: str | None = None
        self.on_reconnect: list[Callable[[], None]] = []
        self._ever_connected = False
        # Packet ids of this connection's SUBSCRIBEs and UNSUBSCRIBEs not yet acknowledged (filter
        # of each), acks that arrived before their id was recorded (a call from another thread;
        # paho numbers both kinds from one counter), and the subscriptions the broker refused
        # (filter: reason). An UNSUBSCRIBE unacknowledged when the connection drops is sent again
        # at the next CONNACK: it may never have reached the broker.
        self.subscribed = threading.Event()
        self._unacked_subscriptions: dict[int, str] = {}
        self._unacked_unsubscribes: dict[int, str] = {}
        self._early_acks: dict[int, list] = {}
        self.refused_subscriptions: dict[str, str] = {}
        # Filters dropped while no session was open: a persistent session keeps them at the
        # broker, so they are unsubscribed at the next CONNACK (else the broker would go on
        # sending what nobody here handles).
        self._unsent_unsubscribes: set[str] = set()
        # Counts connections: an ack() from a delivery of an earlier connection is dropped
        # (the broker re-sends that message on the resumed session, and its packet id may
        # already name another message).
        self._generation = 0
        self._session_open = False  # CONNACK handled and not disconnected since (under _lock)
        # The window of publishes nobody waits on (see the module doc): what waits its turn
        # (messages and generators of messages, in order), what is in paho (packet id:
        # paho's info, until the PUBACK) and how many are being handed over right now.
        self.publish_window = publish_window
        self._backlog: collections.deque = collections.deque()
        self._in_paho: dict[int, object] = {}
        self._handing = 0
        self._handing_over = threading.Lock()  # held by the one thread handing messages to paho
        self._refill_wanted = False  # room was made or messages queued since the holder last looked
        self._window_lock = threading.Lock()
        self._window_changed = threading.Condition(self._window_lock)

    # ---- connection -------------------------------------------------------------------------------

    def _make_client(self, protocol: str):
        client = paho_client(self.client_id, protocol, persistent_session=self.persistent_session, will=self.will,
                             manual_ack=True)  # fmt: skip
        if self.address.username:
            client.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            client.tls_set_context(self._tls_context())
        client.reconnect_delay_set(min_delay=max(1, int(self._reconnect[0])), max_delay=int(self._reconnect[1]))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        return client

    def connect(self, timeout: float = 10.0) -> "MqttLink":
        """Connect (blocking up to ``timeout``); raises :class:`BrokerUnavailable` with advice."""
        errors = []
        for protocol in self._protocols:
            client = self._make_client(protocol)
            self._connect_error = None
            connect_kwargs = connect_options(protocol, keepalive=self.keepalive,
                                             persistent_session=self.persistent_session,
                                             receive_maximum=self.receive_maximum)  # fmt: skip
            try:
                # Synchronous TCP connect: a refused or unresolvable address fails now, clearly.
                client.connect(self.address.host, self.address.port, **connect_kwargs)
            except (OSError, ValueError) as exc:
                raise BrokerUnavailable(
                    f"cannot reach the MQTT broker at {self.address.url()}: {exc}. Is it running? "
                    "(Without --broker the hub starts its own embedded broker.)"
                ) from exc
            self._client = client
            client.loop_start()
            # Some MQTT 3.1.1-only brokers (amqtt) neither answer nor close an MQTT 5 CONNECT:
            # give the first of two attempts a short wait; a broker answers in milliseconds.
            wait = min(timeout, 3.0) if len(self._protocols) > 1 and protocol == "5" else timeout
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and not self.connected.is_set() and self._connect_error is None:
                time.sleep(0.02)
            if self.connected.is_set():
                self.protocol = protocol
                return self
            client.loop_stop()
            client.disconnect()
            self._client = None
            errors.append(f"MQTT {protocol}: {self._connect_error or 'no answer within %.0f s' % wait}")
            if self._connect_error and "not authorized" in self._connect_error.lower():
                break
        raise BrokerUnavailable(
            f"could not connect to the MQTT broker at {self.address.url()} ({'; '.join(errors)}). "
            "Check that the broker runs there, and the username, password and TLS settings."
        )

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
            if not self._ever_connected:
                # connect() gives this attempt up: without this, paho's thread would first sit
                # out a reconnect delay (a second) that connect()'s loop_stop() waits for.
                client.disconnect()
            return
        with self._lock:
            self._generation += 1
            # From here on subscribe() sends its own SUBSCRIBE: one added after this snapshot
            # but before ``connected`` is set would otherwise wait for the next reconnect.
            self._session_open = True
            subscriptions = list(self._subscriptions.items())
            dropped, self._unsent_unsubscribes = self._unsent_unsubscribes, set()
            dropped.update(self._unacked_unsubscribes.values())
            self._unacked_unsubscribes.clear()
            self._unacked_subscriptions.clear()
            self._early_acks.clear()
            self.subscribed.clear()
        for topic_filter, (qos, *_) in subscriptions:
            self._send_subscribe(client, topic_filter, qos)
        # Also what unsubscribe() dropped between the snapshot and the SUBSCRIBE above (its
        # UNSUBSCRIBE went first); never what was subscribed again since.
        with self._lock:
            dropped = {f for f in dropped.union(f for f, _ in subscriptions) if f not in self._subscriptions}
        for topic_filter in dropped:
            self._send_unsubscribe(client, topic_filter)
        reconnected = self._ever_connected
        self._ever_connected = True
        self.connected.set()
        self._update_subscribed()
        if reconnected:
            log.info("reconnected to %s", self.address.url())
            for callback in list(self.on_reconnect):
                callback()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if not self._ever_connected and self._connect_error is None:
            # Closed before CONNACK: typically a broker that does not speak this MQTT version.
            self._connect_error = f"the broker closed the connection ({reason_code})"
        with self._lock:
            self._session_open = False
        self.connected.clear()
        self.subscribed.clear()
        # Before the first CONNACK a disconnect is part of connect()'s attempts (a refused
        # login, an MQTT version the broker lacks): connect() reports it, so no warning here.
        if not self._closing and self._ever_connected:
            log.warning("lost the broker at %s (%s); reconnecting", self.address.url(), reason_code)

    # ---- messages ---------------------------------------------------------------------------------

    def _on_message(self, client, userdata, message) -> None:
        topic = message.topic
        with self._lock:
            generation = self._generation
            handlers = [(h, manual) for _, h, manual, matches in self._subscriptions.values() if matches(topic)]
        mid, qos = message.mid, message.qos
        deferred = False
        for handler, manual in handlers:
            try:
                if manual:
                    handler(message.topic, bytes(message.payload), bool(message.retain),
                            lambda: self._ack(mid, qos, generation))  # fmt: skip
                    deferred = True
                else:
                    handler(message.topic, bytes(message.payload), bool(message.retain))
            except Exception:  # a handler bug must not kill the network thread
                log.exception("handler for %s failed", message.topic)
        if not deferred:
            self._ack(mid, qos, generation)

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        """Acknowledge a delivery to the broker (nothing to do for QoS 0)."""
        client = self._client
        if qos == 0 or client is None or generation != self._generation:
            return
        client.ack(mid, qos)

    def subscribe(self, topic_filter: str, handler: MessageHandler | ManualAckHandler, qos: int = 1, *,
                  manual_ack: bool = False) -> None:  # fmt: skip
        """Subscribe now (or at ``connect``) and again after every reconnect.

        ``manual_ack``: ``handler`` takes a fourth argument, ``ack()``, to call once the
        message is safe (stored, or judged); the broker re-sends it to a later session
        until then.
        """
        matcher = topic_matcher(topic_filter)
        with self._lock:
            self._subscriptions[topic_filter] = (qos, handler, manual_ack, matcher)
            self._unsent_unsubscribes.discard(topic_filter)
            send_now = self._session_open  # else the next CONNACK's snapshot includes it
        if self._client is not None and send_now:
            self._send_subscribe(self._client, topic_filter, qos)
            self._update_subscribed()

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every subscription (and unsubscription) of this
        connection; True if it did within ``timeout`` (see ``refused_subscriptions`` for any it
        refused)."""
        return self.subscribed.wait(timeout)

    def _send_subscribe(self, client, topic_filter: str, qos: int) -> None:
        _, mid = client.subscribe(topic_filter, qos=qos)
        reason_codes = self._await_broker_ack(self._unacked_subscriptions, mid, topic_filter)
        if reason_codes is not None:
            self._note_refusals(topic_filter, reason_codes)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None) -> None:
        topic_filter = self._ack_arrived(self._unacked_subscriptions, mid, reason_codes)
        if topic_filter is not None:
            self._note_refusals(topic_filter, reason_codes)
            self._update_subscribed()

    def _await_broker_ack(self, pending: dict[int, str], mid: int, topic_filter: str) -> list | None:
        """Record that request ``mid`` (a SUBSCRIBE or UNSUBSCRIBE) of ``topic_filter`` waits in
        ``pending`` for its ack; the ack's reason codes instead if it came first (the request
        was sent from another thread than paho's)."""
        with self._lock:
            reason_codes = self._early_acks.pop(mid, None)
            if reason_codes is None:
                pending[mid] = topic_filter
        return reason_codes

    def _ack_arrived(self, pending: dict[int, str], mid: int, reason_codes) -> str | None:
        """The filter whose request ``mid`` is acknowledged, taken from ``pending``; None if
        the request is not recorded yet (the ack is kept for :meth:`_await_broker_ack`)."""
        with self._lock:
            topic_filter = pending.pop(mid, None)
            if topic_filter is None:
                self._early_acks[mid] = list(reason_codes)
        return topic_filter

    def _note_refusals(self, topic_filter: str, reason_codes) -> None:
        for code in reason_codes:
            if getattr(code, "is_failure", False):
                self.refused_subscriptions[topic_filter] = str(code)
                log.warning("the broker at %s refused the subscription %s: %s", self.address.url(), topic_filter, code)

    def _update_subscribed(self) -> None:
        with self._lock:
            if not self._unacked_subscriptions and not self._unacked_unsubscribes and self.connected.is_set():
                self.subscribed.set()
            else:
                self.subscribed.clear()

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop handling ``topic_filter`` now, and tell the broker now or, with no session
        open, at the next CONNACK (a persistent session would keep the filter).
        ``wait_subscribed`` waits for the broker's acknowledgement of this too."""
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
            client = self._client  # once: close() may clear it meanwhile
            send_now = self._session_open and client is not None
            if not send_now:
                self._unsent_unsubscribes.add(topic_filter)
        # Two tries: the first can meet a connection just lost; if a new session opened since,
        # its CONNACK's snapshot did not hold the filter either, so send on that one.
        for _ in range(2):
            if not send_now:
                return
            if self._send_unsubscribe(client, topic_filter):
                self._update_subscribed()
                return
            with self._lock:
                send_now = self._session_open
                if not send_now:
                    self._unsent_unsubscribes.add(topic_filter)
        with self._lock:
            self._unsent_unsubscribes.add(topic_filter)

    def _send_unsubscribe(self, client, topic_filter: str) -> bool:
        """Send an UNSUBSCRIBE; until its UNSUBACK, ``subscribed`` is clear (the broker may
        still route the filter here). False if paho could not send it (no connection)."""
        import paho.mqtt.client as mqtt

        result, mid = client.unsubscribe(topic_filter)
        if result != mqtt.MQTT_ERR_SUCCESS:
            return False
        reason_codes = self._await_broker_ack(self._unacked_unsubscribes, mid, topic_filter)
        if reason_codes is not None:
            self._note_unsubscribe_refusals(topic_filter, reason_codes)
        return True

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties=None) -> None:
        topic_filter = self._ack_arrived(self._unacked_unsubscribes, mid, reason_codes)
        if topic_filter is not None:
            self._note_unsubscribe_refusals(topic_filter, reason_codes)
        self._update_subscribed()

    def _note_unsubscribe_refusals(self, topic_filter: str, reason_codes) -> None:
        # "No subscription existed" (17) is as good as "unsubscribed"; any other failure (MQTT 5:
        # not authorised, unspecified) means the broker keeps routing the filter here.
        for code in reason_codes:
            if getattr(code, "is_failure", False) and getattr(code, "value", None) != 17:
                log.warning("the broker at %s refused to unsubscribe %s: %s; its messages still arrive and are "
                            "acknowledged unhandled", self.address.url(), topic_filter, code)  # fmt: skip

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float = 60.0,
                extras: "Mqtt5Extras | None" = None) -> None:
        """Publish and wait until the broker acknowledged it (QoS 1) or it left (QoS 0)."""
        self.publish_many([(topic, payload)], qos=qos, retain=retain, timeout=timeout, extras=extras)

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                       extras: "Mqtt5Extras | None" = None) -> None:
        """Publish without waiting, e.g. acks: the message goes through the window (module doc)
        after every nowait message before it. paho keeps a QoS 1 message it was handed and
        sends it again after a reconnect; the backlog keeps the rest."""
        properties = extras.to_properties() if extras is not None and self.protocol == "5" else None
        self._queue_nowait((topic, payload, qos, retain, properties))

    def publish_stream(self, messages: Iterable[tuple[str, bytes]], *, qos: int = 1, retain: bool = False) -> None:
        """Publish ``(topic, payload)`` messages without waiting, made lazily: ``messages`` is
        pulled (on whichever thread has room in the window) only as the broker confirms the
        ones before, so 10,000 selections cost one generator, not 10,000 messages in memory.
        Keep what the generator reads unchanged until it is done."""
        self._queue_nowait((iter(messages), qos, retain))

    @property
    def backlog_length(self) -> int:
        """Nowait publishes (and generators of them) waiting for room in the window."""
        with self._window_lock:
            return len(self._backlog)

    def _queue_nowait(self, item: tuple) -> None:
        if self._client is None:
            raise BrokerUnavailable("not connected: call connect() first")
        with self._window_lock:
            self._backlog.append(item)
        self._fill_window()

    def _fill_window(self, confirmed_mid: int | None = None) -> None:
        """Hand waiting messages to paho while fewer than ``publish_window`` are there.

        Runs on the publishing thread and on paho's (``_on_publish``). paho's own lock is
        taken inside ``client.publish``, and paho's thread holds it while it reports a
        PUBACK, so the window's lock is never held across ``client.publish``: room is
        reserved under it (``_handing``), the messages are handed over outside it.
        """
        client = self._client
        if client is None:
            return
        with self._window_lock:
            if confirmed_mid is not None:
                self._in_paho.pop(confirmed_mid, None)
            self._refill_wanted = True
        # One thread hands over at a time, or two batches taken in order could reach paho in the
        # other order. Never waited for: paho's thread may report a PUBACK while the holder waits
        # for paho's lock inside client.publish; it leaves the refill to the holder instead.
        while self._handing_over.acquire(blocking=False):
            try:
                self._hand_over(client)
            finally:
                self._handing_over.release()
            with self._window_lock:
                if not self._refill_wanted:  # else a refill asked for after the holder's last look
                    return

    def _hand_over(self, client) -> None:
        while True:
            with self._window_lock:
                self._refill_wanted = False
                room = self.publish_window - len(self._in_paho) - self._handing
                if room <= 0 and self._in_paho:
                    self._forget_confirmed()
                    room = self.publish_window - len(self._in_paho) - self._handing
                batch = []
                self._window_changed.notify_all()  # room was made, or the backlog emptied
                while room > 0 and self._backlog:
                    item = self._backlog[0]
                    if len(item) == 5:
                        batch.append(self._backlog.popleft())
                    else:  # a generator: pull one message from it
                        messages, qos, retain = item
                        message = next(messages, None)
                        if message is None:
                            self._backlog.popleft()
                            continue
                        batch.append((message[0], message[1], qos, retain, None))
                    room -= 1
                if not batch:
                    return
                self._handing += len(batch)
            infos = []
            for topic, payload, qos, retain, properties in batch:
                try:
                    infos.append((qos, client.publish(topic, payload, qos=qos, retain=retain, properties=properties)))
                except Exception:  # one bad message (paho refuses it) must not take the others with it
                    log.exception("could not publish a message to %s", topic)
            with self._window_lock:
                self._handing -= len(batch)
                # QoS 0 leaves paho once written. A QoS 1 message handed over while
                # disconnected is queued by paho and confirmed after the reconnect.
                for qos, info in infos:
                    if qos > 0 and not info._published:
                        self._in_paho[info.mid] = info

    def publish_many(self, messages: Iterable[tuple[str, bytes]], *, qos: int = 1, retain: bool = False,
                     timeout: float = 60.0, window: int = 32, extras: "Mqtt5Extras | None" = None) -> None:
        """Publish ``(topic, payload)`` messages in order, keeping up to ``window`` unacknowledged.

        ``messages`` is consumed lazily, so a generator can produce each message while the
        ones before it travel (``SignedUpload.chunks``).

        Waiting for each acknowledgement before the next chunk would cost one round trip per
        chunk; a window keeps the link busy while bounding memory (window x chunk size).
        Returns once the broker acknowledged every message; QoS 1 messages still in flight
        at a disconnect are re-sent by paho after the reconnect. Nowait messages published
        before go first (they are handed to paho before these): the link publishes in order.
        """
        if self._client is None:
            raise BrokerUnavailable("not connected: call connect() first")
        deadline = time.monotonic() + timeout
        self._wait_window(lambda: not self._backlog, deadline,
                          f"the messages published before could not be handed over within {timeout:.0f} s")
        properties = extras.to_properties() if extras is not None and self.protocol == "5" else None
        in_flight: collections.deque = collections.deque()
        for topic, payload in messages:
            if len(in_flight) >= window:
                self._await_ack(in_flight.popleft(), deadline, timeout)
            in_flight.append((topic, self._enqueue(topic, payload, qos, retain, deadline, properties)))
        while in_flight:
            self._await_ack(in_flight.popleft(), deadline, timeout)

    def flush(self, timeout: float) -> bool:
        """Wait until every nowait message is handed to paho and confirmed by the broker; True
        if that happened within ``timeout`` seconds."""
        try:
            self._wait_window(lambda: not self._backlog and not self._in_paho and not self._handing,
                              time.monotonic() + timeout, "")  # fmt: skip
        except BrokerUnavailable:
            return False
        return True

    def _wait_window(self, done: Callable[[], bool], deadline: float, failure: str) -> None:
        with self._window_changed:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerUnavailable(failure)
                # Short waits: a PUBACK that came before its packet id was recorded notifies nobody.
                self._window_changed.wait(min(remaining, 0.1))
                self._forget_confirmed()

    def _forget_confirmed(self) -> None:
        """Drop from the window the messages paho already marks published (window lock held).

        A PUBACK may come before its packet id was recorded in the window: paho marks the
        message published right after reporting it, so ``_on_publish`` found nothing to pop.
        """
        for mid in [mid for mid, info in self._in_paho.items() if info._published]:
            del self._in_paho[mid]

    def _enqueue(self, topic: str, payload: bytes, qos: int, retain: bool, deadline: float, properties=None):
        import paho.mqtt.client as mqtt

        while True:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            # While disconnected paho still queues a QoS 1/2 message and sends it after the
            # reconnect: publishing it again would duplicate it.
            if info.rc == 0 or (qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN):
                return info
            # QoS 0 while disconnected is dropped by paho: wait for the reconnect and try again.
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"could not publish to {topic}: broker at {self.address.url()} unreachable")
            self.connected.wait(timeout=0.5)

    def _await_ack(self, sent: tuple, deadline: float, timeout: float) -> None:
        # Tracked through on_publish rather than MQTTMessageInfo.wait_for_publish: paho marks a
        # message queued while disconnected with an error code that wait_for_publish raises
        # on, although it sends the message after the reconnect and reports it then.
        # The message's own info object, not its packet id: ids are reused, and messages
        # published without waiting (publish_nowait) are acknowledged too. Its condition and
        # flag directly: ``is_published`` raises for a message queued while disconnected.
        topic, info = sent
        with info._condition:
            while not info._published:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerUnavailable(
                        f"the broker did not acknowledge a message on {topic} within {timeout:.0f} s")
                info._condition.wait(min(remaining, 0.5))

    def _on_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:
        # paho marks the message's info as published right after this callback. A PUBACK
        # makes room in the window for the next nowait message (any publish's PUBACK may
        # land here: popping a packet id the window does not hold does nothing).
        if getattr(reason_code, "is_failure", False):
            # An MQTT 5 broker that does not allow the topic says so here and drops the
            # message: say it, or an account set up without its ACL loses every publish silently.
            log.warning("the broker refused message %s from %s: %s (check this account's ACL)",
                        mid, self.address.username or self.client_id, reason_code)  # fmt: skip
        if self._backlog or self._in_paho:
            try:
                self._fill_window(confirmed_mid=mid)
            except Exception:  # a bad message or generator must not kill the network thread
                log.exception("could not publish a waiting message")

    def _tls_context(self) -> ssl.SSLContext:
        """TLS settings from the address; a file that is missing or not PEM is named in a UsageError."""
        address = self.address
        try:
            context = ssl.create_default_context(cafile=address.ca_file)
        except (OSError, ssl.SSLError) as error:
            raise UsageError(f"cannot use the CA file {address.ca_file!r} (--ca-file): {_reason(error)}; "
                             "give a readable PEM certificate of the authority that signed the broker's") from None
        if address.cert_file:
            try:
                context.load_cert_chain(address.cert_file, address.key_file)
            except (OSError, ssl.SSLError) as error:
                raise UsageError(f"cannot use the client certificate {address.cert_file!r} (--cert-file) with key "
                                 f"{address.key_file or address.cert_file!r} (--key-file): {_reason(error)}; give "
                                 "a readable PEM certificate and its matching private key") from None
        return context

    def close(self, final: tuple[str, bytes] | None = None, *, drain_s: float = 10.0) -> None:
        """Deliver what waits in the publish window (up to ``drain_s`` seconds: a hub's last
        acks), publish ``final`` (topic, payload; retained) if connected, then disconnect."""
        self._closing = True
        if self._client is None:
            return
        if self.connected.is_set() and not self.flush(drain_s):
            log.warning("closing with %d message(s) not yet confirmed by the broker at %s",
                        len(self._backlog) + len(self._in_paho), self.address.url())  # fmt: skip
        if final is not None and self.connected.is_set():
            try:
                self.publish(final[0], final[1], retain=True, timeout=5)
            except BrokerUnavailable:
                pass
        self._client.disconnect()
        self._client.loop_stop()
        self._client = None
        self.connected.clear()


def _reason(error: OSError | ssl.SSLError) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


# Packets paho's network thread reads before it writes what is waiting.
_READS_BEFORE_WRITING = 8
_FAIR_CLIENT: type | None = None


def _fair_client_class() -> type:
    """paho's Client, reading at most ``_READS_BEFORE_WRITING`` packets per pass of its loop.

    paho reads as many packets in one pass as it has messages in flight, and writes only
    after. A hub under load has thousands in flight (acks to devices), and the broker always
    has more chunks to deliver, so it read for seconds at a time while its PUBACKs and acks
    waited unsent, piling up in memory (and more in flight meant longer reads). With a
    small bound, writes go out between reads.
    """
    global _FAIR_CLIENT
    if _FAIR_CLIENT is None:
        import paho.mqtt.client as mqtt

        class FairClient(mqtt.Client):
            def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
                if not hasattr(self, "_packet_read") or not hasattr(self, "_loop_rc_handle"):
                    return super().loop_read(max_packets)  # another paho: its own behaviour
                for _ in range(_READS_BEFORE_WRITING):
                    if self._sock is None:
                        return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
                    rc = self._packet_read()
                    if rc > 0:
                        return self._loop_rc_handle(rc)
                    if rc == mqtt.MQTTErrorCode.MQTT_ERR_AGAIN:
                        break
                return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

        _FAIR_CLIENT = FairClient
    return _FAIR_CLIENT


def topic_matcher(topic_filter: str) -> Callable[[str], bool]:
    """A test of whether a topic matches ``topic_filter`` (``$share/GROUP/`` prefix ignored),
    as paho's ``topic_matches_sub`` answers it, made once per subscription.

    Why not ``topic_matches_sub`` itself: it builds a matcher object (a trie) on every call,
    and a hub calls it for each subscription on every message: 24 µs per update chunk on
    paho's thread, as much as the rest of the message's handling there. A filter that is
    not well formed (``#`` not last, a wildcard inside a level) is left to paho.
    """
    plain = _plain_filter(topic_filter)
    levels = plain.split("/")
    if "#" not in plain and "+" not in plain:
        return plain.__eq__
    if any(("#" in level or "+" in level) and len(level) > 1 for level in levels) or "#" in levels[:-1]:
        import paho.mqtt.client as mqtt

        return lambda topic: mqtt.topic_matches_sub(plain, topic)
    count = len(levels)
    multi = levels[-1] == "#"
    fixed = count - 1 if multi else count  # the levels before a trailing "#"

    def matches(topic: str) -> bool:
        parts = topic.split("/")
        if len(parts) < fixed or (not multi and len(parts) != count):
            return False
        # Wildcards at the first level do not match topics that start with "$" (MQTT 4.7.2).
        if topic.startswith("$") and (levels[0] == "+" or levels[0] == "#"):
            return False
        for level, part in zip(levels[:fixed], parts):
            if level != "+" and level != part:
                return False
        return True

    return matches


def _plain_filter(topic_filter: str) -> str:
    """``$share/group/a/b`` matches messages on ``a/b``."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter
