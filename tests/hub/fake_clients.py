"""Devices played by the tests: real MQTT connections speaking the shared protocol.

A ``FakeClient`` announces itself, follows the hub state, signs real envelopes around
safetensors bodies made from numpy arrays, publishes them in chunks and collects the
hub's acks. Its knobs (wrong secret, other federation, extra tensors, …) build each kind
of bad update the hub must refuse.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from fedvlm.shared import tensor_codec
from fedvlm.shared.lora_config import LoraSettings
from fedvlm.shared.mqtt_link import MqttLink, Will
from fedvlm.shared.protocol import (
    MIN_CHUNK_SIZE,
    Ack,
    Announcement,
    EnvelopeMetadata,
    GlobalManifest,
    HubState,
    Presence,
    Reassembler,
    Selection,
    Topics,
    new_message_id,
    sign,
    split_payload,
)
from tests.brokers import RunningBroker

BASE_FINGERPRINT = "tiny-base-0001"
MODULES = ("q_proj", "v_proj")


def lora_key(layer: int, projection: str, factor: str) -> str:
    return f"base_model.model.model.language_model.layers.{layer}.self_attn.{projection}.lora_{factor}.weight"


def b_factors(seed: int, *, rank: int = 4, out_features: int = 6) -> dict[str, np.ndarray]:
    """A client's shared lora_B tensors (tiny, deterministic)."""
    rng = np.random.default_rng(seed)
    return {lora_key(0, p, "B"): rng.standard_normal((out_features, rank)).astype(np.float32) for p in MODULES}


def a_factors(seed: int, *, rank: int = 4, in_features: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return {lora_key(0, p, "A"): rng.standard_normal((rank, in_features)).astype(np.float32) for p in MODULES}


def weighted_mean(updates: list[tuple[Mapping[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    total = sum(weight for _, weight in updates)
    names = updates[0][0].keys()
    return {name: sum(tensors[name].astype(np.float64) * weight for tensors, weight in updates) / total
            for name in names}  # fmt: skip


class FakeClient:
    """One simulated device on its own MQTT connection."""

    def __init__(self, broker: RunningBroker, federation: str, client_id: str, secret: str | None, *,
                 lora: LoraSettings | None = None, strategy: str = "plora") -> None:  # fmt: skip
        self.broker = broker
        self.federation = federation
        self.client_id = client_id
        self.secret = secret
        self.lora = lora or LoraSettings()
        self.strategy = strategy
        self.topics = Topics(federation)
        self.acks: queue.Queue[Ack] = queue.Queue()
        self.states: list[HubState] = []
        self.selections: list[Selection] = []
        self._state_changed = threading.Condition()
        self.link: MqttLink | None = None

    # ------------------------------------------------------------------ connection
    def connect(self, *, announce: bool = True) -> FakeClient:
        offline = Announcement(self.client_id, Presence.OFFLINE, "0.1.0").to_json()
        self.link = MqttLink(self.broker.address, f"fake-{self.federation}-{self.client_id}",
                             will=Will(self.topics.client_announce(self.client_id), offline),
                             protocol=self.broker.protocol, persistent_session=False)  # fmt: skip
        # Handlers before the connection, as the edge client does.
        self.link.subscribe(self.topics.client_ack(self.client_id), self._on_ack)
        self.link.subscribe(self.topics.hub_state(), self._on_state)
        self.link.subscribe(self.topics.client_selection(self.client_id), self._on_selection)
        self.link.connect(10)
        if announce:
            self.announce(Presence.ONLINE)
            # Online again after a reconnect, as the edge client says (a restarted embedded
            # broker has lost the retained announcement). Not waited on: this runs on paho's
            # thread, which must stay free to read the PUBACK.
            online = Announcement(self.client_id, Presence.ONLINE, "0.1.0").to_json()
            self.link.on_reconnect.append(
                lambda: self.link.publish_nowait(self.topics.client_announce(self.client_id), online, retain=True))
        return self

    def announce(self, status: Presence) -> None:
        assert self.link is not None
        self.link.publish(self.topics.client_announce(self.client_id),
                          Announcement(self.client_id, status, "0.1.0").to_json(), retain=True)  # fmt: skip

    def close(self, *, announce_offline: bool = True) -> None:
        if self.link is None:
            return
        final = None
        if announce_offline:
            final = (self.topics.client_announce(self.client_id),
                     Announcement(self.client_id, Presence.OFFLINE, "0.1.0").to_json())  # fmt: skip
        self.link.close(final=final)
        self.link = None

    def _on_ack(self, topic: str, payload: bytes, retained: bool) -> None:
        self.acks.put(Ack.from_json(payload))

    def _on_selection(self, topic: str, payload: bytes, retained: bool) -> None:
        if not payload:
            return
        with self._state_changed:
            self.selections.append(Selection.from_json(payload))
            self._state_changed.notify_all()

    def is_selected(self, state: HubState | None = None) -> bool:
        """Whether the latest selection names the attempt ``state`` (default: the latest) collects."""
        state = state or self.state
        return bool(state is not None and self.selections and self.selections[-1].matches(state))

    def wait_selected(self, state: HubState, timeout: float = 10.0) -> Selection:
        """This client's selection for the attempt ``state`` collects (TimeoutError if none comes)."""
        deadline = time.monotonic() + timeout
        with self._state_changed:
            while not (self.selections and self.selections[-1].matches(state)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.client_id}: not selected for round {state.round}; "
                                       f"selections: {self.selections[-3:]}")  # fmt: skip
                self._state_changed.wait(left)
            return self.selections[-1]

    def _on_state(self, topic: str, payload: bytes, retained: bool) -> None:
        if not payload:
            return
        with self._state_changed:
            self.states.append(HubState.from_json(payload))
            self._state_changed.notify_all()

    # ------------------------------------------------------------------ hub state
    @property
    def state(self) -> HubState | None:
        return self.states[-1] if self.states else None

    def wait_state(self, predicate: Callable[[HubState], bool], timeout: float = 15.0) -> HubState:
        deadline = time.monotonic() + timeout
        with self._state_changed:
            while True:
                if self.states and predicate(self.states[-1]):
                    return self.states[-1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.client_id}: hub state never matched; last: {self.state}")
                self._state_changed.wait(left)

    def wait_collecting(self, round_number: int, timeout: float = 15.0) -> HubState:
        return self.wait_state(lambda s: s.phase.value == "collecting" and s.round == round_number, timeout)

    # ------------------------------------------------------------------ updates
    def envelope(self, tensors: Mapping[str, np.ndarray], round_number: int, sample_count: int = 10, *,
                 federation: str | None = None, strategy: str | None = None, lora_hash: str | None = None,
                 base_fingerprint: str = BASE_FINGERPRINT, secret: str | None = None,
                 body_metadata: Mapping[str, str] | None = None) -> bytes:  # fmt: skip
        """A signed update as the edge client builds it (envelope metadata repeated in the body)."""
        metadata = EnvelopeMetadata(federation=federation or self.federation, round=round_number,
                                    client_id=self.client_id, sample_count=sample_count,
                                    strategy=strategy or self.strategy, base_fingerprint=base_fingerprint,
                                    lora_config_hash=lora_hash or self.lora.config_hash())  # fmt: skip
        body_meta = {key: str(value) for key, value in metadata.to_dict().items()}
        body_meta.update(body_metadata or {})
        body = tensor_codec.encode(dict(tensors), body_meta)
        return sign(body, metadata, self.client_id, secret or self.secret)

    def publish(self, envelope: bytes, *, message_id: bytes | None = None, topic_client: str | None = None,
                chunk_size: int = MIN_CHUNK_SIZE) -> bytes:  # fmt: skip
        """Publish ``envelope`` in chunks (small ones: several chunks even for tiny updates)."""
        assert self.link is not None
        message_id = message_id or new_message_id()
        topic = self.topics.update(topic_client or self.client_id, message_id)
        for chunk in split_payload(envelope, chunk_size=chunk_size, message_id=message_id):
            self.link.publish(topic, chunk, qos=1)
        return message_id

    def send(self, tensors: Mapping[str, np.ndarray], round_number: int, sample_count: int = 10,
             **envelope_options: object) -> bytes:  # fmt: skip
        return self.publish(self.envelope(tensors, round_number, sample_count, **envelope_options))

    def wait_ack(self, message_id: bytes | None = None, timeout: float = 10.0) -> Ack:
        """The next ack (for ``message_id`` when given; others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.client_id}: no ack for {message_id.hex() if message_id else 'any message'}")
            try:
                ack = self.acks.get(timeout=left)
            except queue.Empty:
                continue
            if message_id is None or ack.message_id == message_id.hex():
                return ack


def fetch_global(broker: RunningBroker, federation: str, timeout: float = 10.0) -> tuple[GlobalManifest, bytes]:
    """Subscribe like a late-joining device: retained manifest, then that version's retained chunks."""
    topics = Topics(federation)
    manifests: queue.Queue[GlobalManifest] = queue.Queue()
    payloads: queue.Queue[bytes] = queue.Queue()
    reassembler = Reassembler()
    link = MqttLink(broker.address, f"late-{new_message_id().hex()[:8]}", protocol=broker.protocol,
                    persistent_session=False).connect(10)  # fmt: skip

    def on_chunk(topic: str, payload: bytes, retained: bool) -> None:
        if payload:
            done = reassembler.feed(payload, sender="hub")
            if done is not None:
                payloads.put(done.payload)

    try:
        link.subscribe(topics.global_manifest(), lambda t, p, r: manifests.put(GlobalManifest.from_json(p)) if p else None)
        manifest = manifests.get(timeout=timeout)
        link.subscribe(topics.global_chunks_filter(manifest.version), on_chunk)
        return manifest, payloads.get(timeout=timeout)
    finally:
        link.close()


def retained_chunk_topics(broker: RunningBroker, federation: str, version: int, wait: float = 0.5) -> list[str]:
    """Topics of the retained (non-empty) chunks a new subscriber receives for ``version``, each once.

    Each once: the embedded broker (amqtt) was seen delivering one retained set twice to a
    single subscription on a loaded machine; which chunks are retained is what is asked."""
    topics = Topics(federation)
    seen: list[str] = []
    link = MqttLink(broker.address, f"probe-{new_message_id().hex()[:8]}", protocol=broker.protocol,
                    persistent_session=False).connect(10)  # fmt: skip
    try:
        link.subscribe(topics.global_chunks_filter(version),
                       lambda t, p, retained: seen.append(t) if p and retained else None)  # fmt: skip
        time.sleep(wait)
    finally:
        link.close()
    return sorted(set(seen))
