"""Thousands of simulated devices in one process, each on its own MQTT connection.

One selector thread drives every connection through paho's external-loop hooks
(``on_socket_open``/``register_write``…, then ``loop_read``/``loop_write``), so 10,000
connections cost 10,000 sockets and no threads. Every paho call happens on that thread;
other threads hand it work through ``Swarm.call``.

A device behaves like ``fedvlm-edge join`` on the wire: it connects (MQTT 5 when the
broker speaks it, a persistent session, a last will that says offline), subscribes to its
ack topic and the hub state, announces itself online (retained), and when the hub state
selects it for a round it signs its update with the project's real protocol code
(``SignedUpload``: envelope, HMAC, chunks) and publishes it at QoS 1. A refusal that
means "not now" (``overloaded``, ``hub_error``, ``expired``) is sent again after the
hub's ``retry_after_s`` when the ack carries one, else after a short back-off, like the
edge SDK; other refusals are final. Devices never re-send on a timer.

Only ``window`` uploads are on their way to the broker at a time (until the broker's
PUBACK of their last chunk): the queue of updates then waits in the broker, not in this
process's memory, as it would with real devices.

Each device's update is the same pattern of lora_B values times a per-device scale, with
a per-device sample count, so the exact weighted mean the hub must publish is known
(``UpdateRecipe.expected_mean``) without keeping the updates.
"""

from __future__ import annotations

import collections
import dataclasses
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from fedvlm.shared import tensor_codec
from fedvlm.shared.mqtt_link import Will, connect_options, paho_client
from fedvlm.shared.protocol import (
    DEFAULT_CHUNK_SIZE,
    Ack,
    Announcement,
    EnvelopeMetadata,
    HubState,
    Presence,
    ReasonCode,
    RoundPhase,
    SignedUpload,
    Topics,
)

__all__ = ["UpdateRecipe", "Swarm", "SwarmCounts"]

try:  # protocol 3: each selected device is told by its own retained Selection message
    from fedvlm.shared.protocol import Selection as _Selection
except ImportError:  # protocol 2: the hub state lists the selected devices
    _Selection = None

BASE_FINGERPRINT = "bench-base-0001"
_SDK_VERSION = "bench"
# Refusals a device answers by sending the same update again later.
_RETRYABLE = frozenset({ReasonCode.OVERLOADED, ReasonCode.HUB_ERROR, ReasonCode.EXPIRED})
_DEFAULT_RETRY_S = 1.0
_MISC_EVERY_S = 5.0
# Distinct hub-state payloads kept parsed (a round has a handful; more means a long run).
_PARSED_STATES_KEPT = 64
# Readable connections served in one pass before what waits to be written goes out.
_READS_BEFORE_WRITING = 64
# What a carry run signs its updates for (no hub is running then): the same sizes and work.
_CARRY_STATE = SimpleNamespace(round=1, round_config={"strategy": "plora", "lora_config_hash": "0" * 64})


@dataclasses.dataclass(frozen=True)
class UpdateRecipe:
    """What the devices send: lora_B factors of about ``update_bytes`` bytes in all."""

    update_bytes: int
    rank: int = 8
    layers: int = 2
    projections: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def out_features(self) -> int:
        floats = max(self.update_bytes // 4, self.rank * self.layers * len(self.projections))
        return max(1, floats // (self.rank * self.layers * len(self.projections)))

    def keys(self) -> list[str]:
        return [f"base_model.model.model.language_model.layers.{layer}.self_attn.{projection}.lora_B.weight"
                for layer in range(self.layers) for projection in self.projections]  # fmt: skip

    def pattern(self) -> dict[str, np.ndarray]:
        # Small integers: with the scales (quarters) and sample counts below, every weighted
        # sum of up to ~20,000 updates is a multiple of 1/4 under 2**22, exact in float32, so
        # the published mean is off by one rounding at most and a lost or doubled update
        # shows (far above 1e-6).
        rng = np.random.default_rng(1234)
        return {key: rng.integers(-8, 9, (self.out_features, self.rank)).astype(np.float32) for key in self.keys()}

    @staticmethod
    def scale(index: int) -> float:
        return 1.0 + (index % 7) / 4.0  # exact in float32

    @staticmethod
    def samples(index: int) -> int:
        return 10 + index % 5

    def expected_mean(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The sample-weighted mean of the updates of ``indices``, each counted once."""
        weights = np.array([self.samples(i) for i in indices], dtype=np.float64)
        scales = np.array([self.scale(i) for i in indices], dtype=np.float64)
        factor = float((weights * scales).sum() / weights.sum())
        return {key: value.astype(np.float64) * factor for key, value in self.pattern().items()}


@dataclasses.dataclass
class SwarmCounts:
    connected: int = 0
    announced: int = 0
    uploads_started: int = 0
    uploads_delivered: int = 0  # every chunk PUBACKed by the broker
    resends: int = 0
    accepted_acks: int = 0
    devices_accepted: int = 0
    rejections: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    carried: int = 0
    last_accepted_at: float | None = None  # monotonic time of the latest device's first accepted ack


class _Device:
    __slots__ = ("index", "client_id", "secret", "client", "sock", "round_sent", "message_id", "upload",
                 "pending_mids", "pending_kind", "accepted", "announce_mid", "final_reason", "selection", "upload_state",
                 "write_armed", "state")

    def __init__(self, index: int, client_id: str, secret: str) -> None:
        self.index = index
        self.client_id = client_id
        self.secret = secret
        self.client: mqtt.Client | None = None
        self.sock: socket.socket | None = None
        self.round_sent: int | None = None
        self.message_id: bytes | None = None
        self.upload: list[tuple[str, bytes]] | None = None
        self.upload_state: Any = None  # the state of the round whose update is yet to be built
        self.pending_mids: set[int] = set()
        self.pending_kind = ""  # "update" or "carry": what the pending PUBACKs are for
        self.accepted = 0
        self.announce_mid: int | None = None
        self.final_reason: str | None = None
        self.selection: Any = None  # the hub's latest Selection for this device (protocol 3)
        self.write_armed = False  # its socket is in the selector for EVENT_WRITE (see _write_fresh)
        self.state: Any = None  # (HubState, selected ids) of the latest state this device read


class Swarm:
    """``devices`` (client id, secret) pairs as MQTT connections to ``host:port``."""

    def __init__(self, host: str, port: int, federation: str, devices: Sequence[tuple[str, str]],
                 recipe: UpdateRecipe, *, window: int = 256, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 protocol: int = mqtt.MQTTv5) -> None:  # fmt: skip
        self.host, self.port = host, port
        self.topics = Topics(federation)
        self.federation = federation
        self.recipe = recipe
        self.window = window
        self.chunk_size = chunk_size
        self.protocol = protocol
        self.devices = [_Device(i, client_id, secret) for i, (client_id, secret) in enumerate(devices)]
        self._by_id = {device.client_id: device for device in self.devices}
        self.counts = SwarmCounts()
        self._pattern = recipe.pattern()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        # (device, "update" or "carry") waiting for a place in the window.
        self._to_send: collections.deque[tuple[_Device, str]] = collections.deque()
        self._retry_at: list[tuple[float, _Device]] = []
        self._in_flight = 0
        # Devices that have had bytes to write since they were last written (paho asked for
        # EVENT_WRITE; see _write_fresh), and the sockets of the uploads on their way (a
        # second epoll set, for their PUBACKs; see _serve_uploads).
        self._fresh_writers: list[_Device] = []
        self._uploading = selectors.DefaultSelector()
        # Each distinct state payload parsed once (see _on_state).
        self._parsed_states: dict[bytes, tuple[HubState, frozenset[str]]] = {}
        self._carry_prefix = "bench/carry"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device-swarm", daemon=True)
        self._thread.start()

    # ================================================================== the public side
    def call(self, function: Callable[[], None]) -> None:
        """Run ``function`` on the swarm's thread (paho clients are not thread-safe)."""
        self._calls.append(function)
        self._wake_w.send(b"x")

    def connect_all(self, batch: int = 200) -> None:
        """Open every device's connection (in batches, so CONNACKs flow while others connect)."""
        for start in range(0, len(self.devices), batch):
            done = threading.Event()
            chunk = self.devices[start:start + batch]
            self.call(lambda chunk=chunk, done=done: (self._connect_devices(chunk), done.set()))
            done.wait()

    def wait(self, predicate: Callable[[SwarmCounts], bool], timeout: float,
             progress: Callable[[SwarmCounts], None] | None = None) -> bool:  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if progress is not None:
                progress(self.counts)
            if predicate(self.counts):
                return True
            time.sleep(0.1)
        return predicate(self.counts)

    def carry(self, topic_prefix: str) -> None:
        """Every device publishes its signed update once, chunk by chunk (QoS 1), on
        ``<topic_prefix>/<client id>/<chunk index>``: built, signed and chunked exactly as for
        a round (``_build_upload``, when the device's turn in the window comes), so the swarm
        does the same work as in a round and only the receiver differs."""
        def start() -> None:
            self._carry_prefix = topic_prefix
            self._to_send.extend((device, "carry") for device in self.devices)
            self._pump()
        self.call(start)

    def upload_shape(self) -> tuple[int, int]:
        """(bytes, chunks) of one signed update as the devices send it."""
        chunks = [chunk for _, chunk in self._build_upload(self.devices[0], _CARRY_STATE, keep_id=False)]
        return sum(len(chunk) for chunk in chunks), len(chunks)

    def accepted_indices(self) -> list[int]:
        return [device.index for device in self.devices if device.accepted]

    def final_reasons(self) -> collections.Counter:
        return collections.Counter(d.final_reason for d in self.devices if d.final_reason is not None)

    def close(self) -> None:
        """Disconnect every device (a clean DISCONNECT: no last will) and stop the thread."""
        done = threading.Event()
        self.call(lambda: (self._disconnect_all(), done.set()))
        done.wait(60)
        self._stop.set()
        self._wake_w.send(b"x")
        self._thread.join(30)
        self._selector.close()
        self._uploading.close()
        self._wake_r.close()
        self._wake_w.close()

    # ================================================================== the swarm's thread
    def _run(self) -> None:
        next_misc = time.monotonic() + _MISC_EVERY_S
        while not self._stop.is_set():
            reads = 0
            for key, mask in self._selector.select(timeout=0.05):
                device = key.data
                if device is None:
                    try:
                        self._wake_r.recv(65536)
                    except BlockingIOError:
                        pass
                    continue
                client = device.client
                if client is None:
                    continue
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                    reads += 1
                    if reads % _READS_BEFORE_WRITING == 0:
                        self._serve_uploads()
                if mask & selectors.EVENT_WRITE and device.client is not None:
                    client.loop_write()
            while self._calls:
                self._calls.popleft()()
            now = time.monotonic()
            if self._retry_at and self._retry_at[0][0] <= now:
                self._resend_due(now)
            if now >= next_misc:
                next_misc = now + _MISC_EVERY_S
                for device in self.devices:
                    if device.client is not None:
                        device.client.loop_misc()
            self._write_fresh()  # before the next select waits: nothing is left unwritten

    def _connect_devices(self, devices: Sequence[_Device]) -> None:
        protocol = "5" if self.protocol == mqtt.MQTTv5 else "3.1.1"
        for device in devices:
            # Set up as the edge client's connection is (a persistent session, the last will).
            will = Will(self.topics.client_announce(device.client_id), self._announcement(device, Presence.OFFLINE))
            client = paho_client(f"bench-{device.client_id}", protocol, will=will, max_inflight=32, userdata=device)
            client.on_socket_open = self._on_socket_open
            client.on_socket_close = self._on_socket_close
            client.on_socket_register_write = self._on_register_write
            client.on_socket_unregister_write = self._on_unregister_write
            client.on_connect = self._on_connect
            client.on_message = self._on_message
            client.on_publish = self._on_publish
            device.client = client
            client.connect(self.host, self.port, **connect_options(protocol, keepalive=600))

    def _disconnect_all(self) -> None:
        for device in self.devices:
            if device.client is not None:
                client, device.client = device.client, None
                client.disconnect()
                client.loop_write()
                if device.sock is not None:
                    try:
                        self._selector.unregister(device.sock)
                    except (KeyError, ValueError):
                        pass
                    device.sock.close()
                    device.sock = None

    # ---- paho's external-loop hooks
    def _on_socket_open(self, client, device: _Device, sock) -> None:
        device.sock = sock
        self._selector.register(sock, selectors.EVENT_READ, device)

    def _on_socket_close(self, client, device: _Device, sock) -> None:
        self._track_upload(device, False, sock)
        device.write_armed = False
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _serve_uploads(self) -> None:
        """Between the reads of one pass: read the PUBACKs of the uploads on their way (each
        lets the next upload start) and write what waits. The round's state reaches all
        10,000 devices at once, and one pass read all of them first: the first window's
        uploads waited seconds for their PUBACKs to be read and no other upload started (at
        10,000 devices, 256 sent in the round's first ~4 s while the 10,000 states were
        read), a stall of the load generator that real devices, each on its own, never have."""
        for key, _ in self._uploading.select(timeout=0):
            device = key.data
            if device.client is not None:
                device.client.loop_read()
        self._write_fresh()

    def _write_fresh(self) -> None:
        """Write what the devices queued since the last call (PUBACKs of the states, selections
        and acks they read, subscriptions, chunks); only a socket that is full waits for
        EVENT_WRITE. Arming EVENT_WRITE for every queued packet cost two epoll_ctl calls
        (through selectors' Python) and a pass of the loop for each, and in a round every
        device PUBACKs half a dozen messages, which the carry run's devices never do."""
        fresh, self._fresh_writers = self._fresh_writers, []
        for device in fresh:
            client = device.client
            if client is None:
                continue
            client.loop_write()
            # paho asks once (register) until its queue is empty (unregister): a socket it
            # could not empty is armed here, and disarmed in _on_unregister_write.
            if client.want_write() and not device.write_armed and device.sock is not None:
                try:
                    self._selector.modify(device.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, device)
                    device.write_armed = True
                except (KeyError, ValueError, OSError):
                    pass

    def _track_upload(self, device: _Device, on_its_way: bool, sock=None) -> None:
        sock = sock if sock is not None else device.sock  # paho names the socket it closes
        try:
            if on_its_way:
                self._uploading.register(sock, selectors.EVENT_READ, device)
            else:
                self._uploading.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass

    def _on_register_write(self, client, device: _Device, sock) -> None:
        self._fresh_writers.append(device)  # written by _write_fresh, armed there if need be

    def _on_unregister_write(self, client, device: _Device, sock) -> None:
        if not device.write_armed:
            return
        device.write_armed = False
        try:
            self._selector.modify(sock, selectors.EVENT_READ, device)
        except (KeyError, ValueError):
            pass

    # ---- MQTT
    def _announcement(self, device: _Device, status: Presence) -> bytes:
        return Announcement(device.client_id, status, _SDK_VERSION).to_json()

    def _on_connect(self, client, device: _Device, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            device.final_reason = f"connect: {reason_code}"
            return
        self.counts.connected += 1
        # Handlers first, then the announcement: a hub never selects a device that cannot hear it.
        subscriptions = [(self.topics.client_ack(device.client_id), 1), (self.topics.hub_state(), 1)]
        if _Selection is not None:
            subscriptions.append((self.topics.client_selection(device.client_id), 1))
        client.subscribe(subscriptions)
        info = client.publish(self.topics.client_announce(device.client_id),
                              self._announcement(device, Presence.ONLINE), qos=1, retain=True)  # fmt: skip
        device.announce_mid = info.mid

    def _on_publish(self, client, device: _Device, mid, reason_code=None, properties=None) -> None:
        if mid == device.announce_mid:
            device.announce_mid = None
            self.counts.announced += 1
            return
        if mid in device.pending_mids:
            device.pending_mids.discard(mid)
            if not device.pending_mids:
                self._track_upload(device, False)
                self._in_flight -= 1
                if device.pending_kind == "carry":
                    self.counts.carried += 1
                else:
                    self.counts.uploads_delivered += 1
                self._pump()

    def _on_message(self, client, device: _Device, message) -> None:
        if message.topic.endswith("/ack"):
            self._on_ack(device, Ack.from_json(message.payload))
        elif not message.payload:
            return
        elif message.topic.endswith("/selection"):
            device.selection = _Selection.from_json(message.payload)
            if device.state is not None:  # its own latest state: at a round's end another
                self._maybe_send(device, *device.state)  # device may have read a newer one
        else:
            self._on_state(device, message.payload)

    def _on_state(self, device: _Device, payload: bytes) -> None:
        # Every device receives the same few states: parse each distinct payload once, not
        # once per device. Keyed by payload, not just the last one: a device reads up to 8
        # packets a pass (FairClient), so at a round's end the sockets deliver aggregating,
        # publishing, done, aggregating, publishing, … and a one-entry cache missed nearly
        # every time (py-spy at 10,000 devices: HubState.from_json was an eighth of the
        # generator's CPU in a round). A state is a frozen, validated message: the parse of
        # the same bytes is the same for every device.
        parsed = self._parsed_states.get(payload)
        if parsed is None:
            state = HubState.from_json(payload)
            selected = frozenset(getattr(state, "selected_clients", ()))  # protocol 2 listed them here
            if len(self._parsed_states) >= _PARSED_STATES_KEPT:
                self._parsed_states.clear()
            parsed = self._parsed_states[bytes(payload)] = (state, selected)
        device.state = parsed
        self._maybe_send(device, *parsed)

    def _maybe_send(self, device: _Device, state: HubState, selected: frozenset[str]) -> None:
        """Send this round's update once the state collects a round this device is selected for."""
        if state.phase is not RoundPhase.COLLECTING or device.round_sent == state.round:
            return
        if _Selection is not None:
            chosen = device.selection is not None and device.selection.matches(state)
        else:
            chosen = device.client_id in selected
        if chosen:
            device.round_sent = state.round
            # Built when its turn to send comes (_pump), as in the carry run: built here, the
            # 10,000 selections of a round arriving together made this one thread sign every
            # update (seconds) before it sent more than the first window's worth, a stall of
            # the load generator that real devices, each signing its own, never have.
            device.upload, device.upload_state = None, state
            self._to_send.append((device, "update"))
            self._pump()

    def _on_ack(self, device: _Device, ack: Ack) -> None:
        if device.message_id is None or ack.message_id != device.message_id.hex():
            return
        if ack.accepted:
            self.counts.accepted_acks += 1
            if device.accepted == 0:
                self.counts.devices_accepted += 1
                self.counts.last_accepted_at = time.monotonic()
            device.accepted += 1
            device.final_reason = None
            return
        self.counts.rejections[ack.reason_code.value] += 1
        if ack.reason_code in _RETRYABLE:
            retry_after = getattr(ack, "retry_after_s", None) or _DEFAULT_RETRY_S
            self._retry_at.append((time.monotonic() + retry_after, device))
            self._retry_at.sort(key=lambda item: item[0])
        else:
            device.final_reason = ack.reason_code.value

    def _resend_due(self, now: float) -> None:
        while self._retry_at and self._retry_at[0][0] <= now:
            _, device = self._retry_at.pop(0)
            self.counts.resends += 1
            self._to_send.append((device, "update"))
        self._pump()

    # ---- uploads
    def _build_upload(self, device: _Device, state: Any, *, keep_id: bool = True) -> list[tuple[str, bytes]]:
        """The device's signed update for ``state.round``, chunked by the protocol's own code."""
        config = state.round_config
        metadata = EnvelopeMetadata(federation=self.federation, round=state.round, client_id=device.client_id,
                                    sample_count=self.recipe.samples(device.index), strategy=config["strategy"],
                                    base_fingerprint=config.get("base_fingerprint") or BASE_FINGERPRINT,
                                    lora_config_hash=config["lora_config_hash"])  # fmt: skip
        body_metadata = {key: str(value) for key, value in metadata.to_dict().items() if key != "type"}
        scale = np.float32(self.recipe.scale(device.index))
        body = tensor_codec.encode({key: value * scale for key, value in self._pattern.items()}, body_metadata)
        upload = SignedUpload(body, metadata, device.client_id, device.secret, chunk_size=self.chunk_size)
        if keep_id:
            device.message_id = upload.message_id
        topic = self.topics.update(device.client_id, upload.message_id)
        return [(topic, chunk) for chunk in upload.chunks()]

    def _pump(self) -> None:
        """Start uploads while fewer than ``window`` are on their way to the broker."""
        while self._to_send and self._in_flight < self.window:
            device, kind = self._to_send.popleft()
            client = device.client
            if client is None or device.pending_mids:
                continue
            if kind == "carry":
                built = self._build_upload(device, _CARRY_STATE, keep_id=False)
                messages = [(f"{self._carry_prefix}/{device.client_id}/{index}", chunk)
                            for index, (_, chunk) in enumerate(built)]  # fmt: skip
            else:
                if device.upload is None and device.upload_state is not None:
                    device.upload = self._build_upload(device, device.upload_state)  # re-sends reuse it
                messages = device.upload or []
                self.counts.uploads_started += 1
            self._in_flight += 1
            device.pending_kind = kind
            for topic, payload in messages:
                device.pending_mids.add(client.publish(topic, payload, qos=1).mid)
            if device.pending_mids:
                self._track_upload(device, True)


def raise_open_files_limit(needed: int) -> int:
    """Raise this process's soft limit on open files towards ``needed`` (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(max(soft, needed), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

