"""An MQTT broker inside the hub process (amqtt), for a federation that needs nothing installed.

amqtt is asyncio-based and speaks MQTT 3.1.1 only; the hub's MQTT client is paho
(threaded). The broker therefore runs in its own thread with its own event loop, and
``start``/``stop`` block the caller with time limits. amqtt's shutdown waits for every
client connection's reader and could hang for a keep-alive interval (see ``_shutdown``
for the cause and the cure); as a backstop, ``stop`` gives up after ``stop_timeout``
seconds, closes the listening socket itself and abandons the (daemon) thread.

The embedded broker binds to loopback by default, keeps nothing on disk (retained
messages live in memory; the hub republishes its state and latest global version when it
starts), and allows anonymous clients. For production use a real broker (mosquitto, EMQX,
HiveMQ) with authentication and TLS, and pass ``--broker``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
from typing import Any

from fedvlm.shared.mqtt_link import BrokerAddress

from .errors import BrokerPortInUse, HubError

__all__ = ["EmbeddedBroker", "silence_broker_logs"]

log = logging.getLogger(__name__)

# amqtt logs every connection, packet and plugin event, and a traceback for every client
# that vanishes without DISCONNECT (a killed device): noise for a hub operator.
_NOISY_LOGGERS = ("amqtt", "amqtt.broker.plugins", "transitions")


def silence_broker_logs() -> None:
    """Quiet amqtt (set FEDVLM_DEBUG=1 to keep its logs)."""
    if os.environ.get("FEDVLM_DEBUG"):
        return
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


class EmbeddedBroker:
    """An amqtt broker listening on ``host:port`` (MQTT 3.1.1, anonymous, in memory).

    Use as a context manager, or call ``start()`` and ``stop()``::

        with EmbeddedBroker(port=18830) as broker:
            link = MqttLink(broker.address, "hub", protocol="3.1.1").connect()
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, *, start_timeout: float = 10.0,
                 stop_timeout: float = 5.0) -> None:  # fmt: skip
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(host=self.host, port=self.port)

    @property
    def running(self) -> bool:
        return self._broker is not None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> EmbeddedBroker:
        """Start listening; raises :class:`BrokerPortInUse` if another process has the port."""
        if self.running:
            return self
        try:
            from amqtt.broker import Broker
        except ImportError as error:  # pragma: no cover - depends on the install
            raise HubError("the embedded broker needs amqtt: pip install 'fedvlm[hub]', "
                           "or use an existing broker with --broker mqtt://host:port") from error  # fmt: skip
        silence_broker_logs()
        self._check_port_free()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # Only anonymous auth: no $SYS publisher, no packet and event loggers.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_run_loop, args=(loop,), name=f"embedded-broker-{self.port}", daemon=True)
        thread.start()

        async def create_and_start() -> Any:
            broker = Broker(config, loop=loop)
            # amqtt iterates its subscription table across awaits (a connecting client's
            # retained messages, broadcasts); another client subscribing meanwhile raised
            # "dictionary changed size during iteration" and dropped the connecting client.
            broker._subscriptions = _SnapshotDict(broker._subscriptions)
            await broker.start()
            return broker

        future = asyncio.run_coroutine_threadsafe(create_and_start(), loop)
        try:
            self._broker = future.result(timeout=self.start_timeout)
        except Exception as error:
            future.cancel()
            _stop_loop(loop, thread, timeout=self.stop_timeout)
            if _is_address_in_use(error):
                raise self._port_in_use() from None
            raise HubError(f"the embedded MQTT broker could not start on {self.host}:{self.port}: {error}") from error
        self._loop, self._thread = loop, thread
        log.debug("embedded broker listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop the broker; returns within about ``stop_timeout`` seconds even if amqtt hangs."""
        if self._loop is None or self._thread is None:
            return
        loop, thread, broker = self._loop, self._thread, self._broker
        self._loop = self._thread = self._broker = None
        future = asyncio.run_coroutine_threadsafe(_shutdown(broker), loop)
        try:
            future.result(timeout=self.stop_timeout)
        except Exception as error:  # timeout, or amqtt failing half-way: free the port ourselves
            log.debug("embedded broker shutdown did not finish cleanly (%r); closing its listeners", error)
            future.cancel()
            loop.call_soon_threadsafe(_close_listeners, broker)
        _stop_loop(loop, thread, timeout=self.stop_timeout)

    def _check_port_free(self) -> None:
        # amqtt reports a taken port as a generic startup error after logging a traceback;
        # a bind test first gives the operator a clear message.
        probe = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as amqtt binds: TIME_WAIT is fine
        try:
            probe.bind((self.host, self.port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise self._port_in_use() from None
            raise HubError(f"the embedded MQTT broker cannot listen on {self.host}:{self.port}: {error}") from None
        finally:
            probe.close()

    def _port_in_use(self) -> BrokerPortInUse:
        return BrokerPortInUse(
            f"port {self.port} on {self.host} is already in use, probably by another MQTT broker. "
            f"To use that broker, start the hub with --broker mqtt://{self.host}:{self.port}; "
            "to run the embedded broker elsewhere, pick a free port with --port PORT"
        )


class _SnapshotDict(dict):
    """A dict whose iteration walks a copy of its keys or items, so the owner may change it
    while an iteration is suspended at an ``await`` (amqtt's subscription table)."""

    def __iter__(self):
        return iter(list(super().keys()))

    def keys(self):  # type: ignore[override]
        return list(super().keys())

    def items(self):  # type: ignore[override]
        return list(super().items())


async def _shutdown(broker: Any) -> None:
    """amqtt's shutdown, re-delivering cancellations that Python's ``asyncio.wait_for`` lost.

    On Python 3.11 ``wait_for`` can swallow a cancellation that races with its inner
    read (fixed in 3.12). amqtt cancels each connection's reader that way, and a reader
    that missed it waits for the client's next packet, up to a keep-alive interval,
    while shutdown waits for the reader. Cancelling again what amqtt already asked to
    cancel lets shutdown finish in milliseconds.
    """
    shutdown = asyncio.ensure_future(broker.shutdown())
    while not shutdown.done():
        await asyncio.wait([shutdown], timeout=0.1)
        for task in asyncio.all_tasks():
            cancelling = getattr(task, "cancelling", None)  # Python 3.11+
            if task is not shutdown and not task.done() and cancelling is not None and cancelling():
                task.cancel()
    shutdown.result()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
        except Exception:  # the loop is going away; nothing left to report to
            pass
        loop.close()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread, *, timeout: float) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout)
    if thread.is_alive():
        log.warning("the embedded broker's thread did not stop within %.0f s; abandoning it", timeout)


def _close_listeners(broker: Any) -> None:
    """Close amqtt's listening sockets directly, for a shutdown that hung before doing so."""
    for server in getattr(broker, "_servers", {}).values():
        instance = getattr(server, "instance", None)
        if instance is not None:
            instance.close()


def _is_address_in_use(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            return True
        error = error.__cause__ or error.__context__
    return False
