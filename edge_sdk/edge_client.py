"""The device side of a federation: join a hub over MQTT and take part in its rounds.

The client reacts to the hub's retained messages:

* the hub state names the round, the strategy and the LoRA layout; the model is built
  from it, so every device uses the layout the hub announced;
* the device's own retained selection says that the hub picked it for a round attempt
  (protocol 3: no message lists every selected device);
* the global manifest names the latest global version; the client fetches its retained
  chunks, checks the manifest's SHA-256, and absorbs the shared factors (the personal ones
  stay as they are);
* when it is selected for a round and holds the latest global version, it trains on its
  local data, evaluates, and publishes its signed update (only the tensors its strategy
  lets leave the device), then waits for the hub's acknowledgement.

The update is written to the state directory while its first chunks are published (a
thread; the last chunk waits for it), so a device that crashes mid-upload or after
sending re-sends the identical bytes under the same message id (the hub completes or
counts it once) instead of a different update. An update refused for load (``overloaded``)
is sent again after the hub's ``retry_after_s``, backed off with jitter; one that gets no
answer is sent again as soon as the hub state shows the hub back online (after a hub
restart), a timer being only the last resort. State is committed atomically after every
round and every new global version. MQTT callbacks only enqueue events; the work happens
on the caller's thread, the save alone on its own.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import queue
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from fedvlm.edge.device_inbox import DeviceInbox
from fedvlm.edge.device_state import DeviceState, check_compatible, load_state, save_state
from fedvlm.edge.errors import EdgeError
from fedvlm.edge.privacy import DPConfig, PrivacySpent, UpdatePrivatizer
from fedvlm.edge.objectives import DEFAULT_DPO_BETA, DpoObjective, build_objective, unpaired_examples
from fedvlm.edge.training import QAExample, TrainingConfig
from fedvlm.shared import tensor_codec
from fedvlm.shared.durable_files import write_durably
from fedvlm.shared.lora_config import LoraSettings
from fedvlm.shared.strategies import build_strategy, is_base_delta_key
from fedvlm.shared.usage_error import UsageError
from fedvlm.shared.mqtt_link import BrokerAddress, Mqtt5Extras, MqttLink, Will
from fedvlm.shared.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Announcement,
    EnvelopeMetadata,
    GlobalManifest,
    HubState,
    Presence,
    ProtocolError,
    Reassembler,
    ReasonCode,
    RETRYABLE_AFTER_HINT,
    RetryBackoff,
    RoundPhase,
    Selection,
    SignedUpload,
    Topics,
    seal_envelope,
    speaks_current_protocol,
    split_payload,
)
from fedvlm.shared.protocol.chunks import DEFAULT_CHUNK_SIZE

log = logging.getLogger(__name__)

# Rejections that mean this device is set up wrongly: stop and tell the user.
_MISCONFIGURED = frozenset({ReasonCode.UNKNOWN_CLIENT, ReasonCode.BAD_SIGNATURE, ReasonCode.CLIENT_MISMATCH,
                            ReasonCode.WRONG_FEDERATION, ReasonCode.INCOMPATIBLE, ReasonCode.TOO_LARGE,
                            ReasonCode.UNSUPPORTED_VERSION})
# Rejections caused by timing or load: the same round may still take an update from us.
_TRY_AGAIN = frozenset({ReasonCode.LATE, ReasonCode.NOT_SELECTED, ReasonCode.WRONG_ROUND, ReasonCode.HUB_ERROR,
                        ReasonCode.OVERLOADED, ReasonCode.EXPIRED, ReasonCode.CORRUPT})

# A global version whose chunks fail the manifest's hash this often is left until the hub
# publishes it again (after a reconnect resets the count).
_MAX_REFETCHES = 3
# Seconds without an acknowledgement before the same update is published again (the last
# resort: a hub coming back online triggers a re-send at once); doubles up to the maximum.
_RESEND_AFTER_S = 15.0
_MAX_RESEND_AFTER_S = 120.0

_PENDING_UPDATE = "pending_signed_part.bin"  # the envelope without its MAC (sealed again to re-send)
_PENDING_ADAPTER = "pending_adapter.safetensors"  # the factors the pending update was trained into
_PENDING_INFO = "pending_update.json"


@dataclasses.dataclass(frozen=True)
class _Outgoing:
    """An update on its way to the hub: the chunks to publish now (produced lazily for a new
    update), and what to re-send until the hub answers."""

    message_id: bytes
    envelope_size: int
    chunks: Iterable[bytes]
    sent: Callable[[], list[bytes]]
    train_metrics: dict
    eval_metrics: dict | None


class EdgeClientError(EdgeError):
    """The client cannot take part: wrong secret, rejected update, incompatible hub."""


@dataclasses.dataclass
class RoundReport:
    """What one round did on this device."""

    round: int
    accepted: bool
    reason: str
    samples: int
    train: dict
    evaluation: dict | None
    bytes_sent: int
    global_version: int
    privacy: dict | None = None  # (ε, δ) spent, with differential privacy on (see fedvlm.edge.privacy)


@dataclasses.dataclass
class ConnectionOptions:
    """How to reach the broker (see ``BrokerAddress.parse``)."""

    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    mqtt_protocol: str = "auto"
    chunk_size: int = DEFAULT_CHUNK_SIZE


class EdgeClient:
    """A device in a federation.

    Args:
        model_dir: local directory of the base VLM (the hub checks its fingerprint).
        train_examples: the device's training examples (image, question, chosen).
        hub_url: ``mqtt://host:port`` or ``mqtts://…`` of the federation's broker.
        federation: the federation's name.
        client_id: this device's id, registered with the hub.
        secret: the secret the hub issued for ``client_id``.
        state_dir: where personal factors, the last global version and the round are kept.
        eval_examples: held-out examples scored after each round's training (optional).
        training: local training settings; the hub's round config may override
            ``steps`` (``local_steps``), ``learning_rate`` and the ``objective`` (with
            ``dpo_beta``): a device follows the objective its federation announces.
        quantization, device: as in :func:`fedvlm.edge.model_loading.load_vlm`.
        privacy: differential privacy of the shared update (clip, noise multiplier, δ);
            None sends the trained factors as they are.
        lora_rank: this device's LoRA rank, for strategies whose devices may differ in rank
            (e.g. flexlora): at most the federation's r. None: the federation's r.
        skip_unpaired: when the federation trains with DPO, train on the examples that have a
            rejected answer and drop the others (``--skip-bad``); False stops the device with
            the reason instead.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        train_examples: Sequence[QAExample],
        hub_url: str,
        federation: str,
        client_id: str,
        secret: str,
        state_dir: str | os.PathLike,
        *,
        eval_examples: Sequence[QAExample] | None = None,
        training: TrainingConfig | None = None,
        quantization: str = "auto",
        device: str = "auto",
        connection: ConnectionOptions | None = None,
        privacy: DPConfig | None = None,
        lora_rank: int | None = None,
        skip_unpaired: bool = False,
    ) -> None:
        if not train_examples:
            raise EdgeClientError("the device has no training examples")
        self.model_dir = Path(model_dir)
        self.train_examples = train_examples
        self.eval_examples = eval_examples
        self.federation = federation
        self.client_id = client_id
        self.secret = secret
        self.state_dir = Path(state_dir)
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise EdgeClientError(f"the state directory {str(self.state_dir)!r} is a file; give --state-dir a "
                                  "directory (it is created if missing)")  # fmt: skip
        self.training = training or TrainingConfig(progress=False)
        self.quantization = quantization
        self.device = device
        self.connection = connection or ConnectionOptions()
        self.privacy = UpdatePrivatizer(privacy, self.state_dir) if privacy is not None else None
        self.lora_rank = lora_rank
        self.skip_unpaired = skip_unpaired
        self.topics = Topics(federation)
        self.address = BrokerAddress.parse(
            hub_url, username=self.connection.username, password=self.connection.password,
            ca_file=self.connection.ca_file, cert_file=self.connection.cert_file, key_file=self.connection.key_file,
        )
        self.model = None  # built from the hub's announced layout (PersonalVLM)
        self._initial_shared: dict = {}  # with DP, the shared factors as initialised (global version 0)
        self.state: DeviceState | None = None
        self.hub_state: HubState | None = None
        self.manifest: GlobalManifest | None = None
        self.selection: Selection | None = None  # the latest the hub sent this device
        self.reports: list[RoundReport] = []
        self._events = DeviceInbox()
        self._reassembler = Reassembler(timeout_s=120)
        self._fetching_version: int | None = None
        self._refetches: dict[int, int] = {}  # global version -> failed fetches
        self._link: MqttLink | None = None
        self._saving: concurrent.futures.Future | None = None  # the update being saved, if any

    # ---- MQTT callbacks: enqueue only -----------------------------------------------------------

    def _on_hub_state(self, topic: str, payload: bytes, retained: bool) -> None:
        if payload:
            self._events.put(("hub_state", payload))

    def _on_manifest(self, topic: str, payload: bytes, retained: bool) -> None:
        if payload:
            self._events.put(("manifest", payload))

    def _on_selection(self, topic: str, payload: bytes, retained: bool) -> None:
        if payload:
            self._events.put(("selection", payload))

    def _on_ack(self, topic: str, payload: bytes, retained: bool) -> None:
        if payload:
            self._events.put(("ack", payload))

    def _on_global_chunk(self, topic: str, payload: bytes, retained: bool) -> None:
        if not payload:
            return  # a retained message being cleared
        try:
            done = self._reassembler.feed(payload, sender="hub")
        except ProtocolError as problem:
            self._events.put(("chunk_error", str(problem)))
            return
        if done is not None:
            self._events.put(("global_payload", done.payload))

    def _announce(self, status: Presence) -> bytes:
        return Announcement(
            client_id=self.client_id, status=status, sdk_version=_sdk_version(),
            last_round=self.state.round if self.state and self.state.round else None,
        ).to_json()

    # ---- lifecycle --------------------------------------------------------------------------------

    def connect(self, timeout: float = 15.0) -> None:
        self._restore_state_if_any()
        will = Will(self.topics.client_announce(self.client_id), self._announce(Presence.OFFLINE))
        self._link = MqttLink(self.address, f"fedvlm-{self.federation}-{self.client_id}", will=will,
                              protocol=self.connection.mqtt_protocol)
        # Handlers before the connection: a resumed session delivers acks the broker kept
        # for this device right after CONNACK.
        self._link.on_reconnect.append(lambda: self._events.put(("reconnected", b"")))
        self._link.subscribe(self.topics.client_ack(self.client_id), self._on_ack)
        self._link.subscribe(self.topics.client_selection(self.client_id), self._on_selection)
        self._link.subscribe(self.topics.hub_state(), self._on_hub_state)
        self._link.subscribe(self.topics.global_manifest(), self._on_manifest)
        self._link.connect(timeout)
        self._link.publish(self.topics.client_announce(self.client_id), self._announce(Presence.ONLINE), retain=True)
        log.info("%s joined federation %s at %s", self.client_id, self.federation, self.address.url())

    def close(self) -> None:
        self._finish_saving()
        if self._link is not None:
            self._link.close(final=(self.topics.client_announce(self.client_id), self._announce(Presence.OFFLINE)))
            self._link = None

    def run(self, rounds: int | None = None, *, timeout: float | None = None) -> list[RoundReport]:
        """Take part until the hub is done, ``rounds`` rounds were sent, or ``timeout`` s passed."""
        own_link = self._link is None
        if own_link:
            self.connect()
        deadline = None if timeout is None else time.monotonic() + timeout
        sent_here = 0
        try:
            # With a round budget, stay until the hub merged the last update we sent.
            while rounds is None or sent_here < rounds or not self._has_global_of_last_round():
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{self.client_id}: no round finished within {timeout:.0f} s")
                try:
                    kind, payload = self._events.get(timeout=0.5)
                except queue.Empty:
                    continue
                try:
                    report = self._handle(kind, payload)
                except (ProtocolError, ValueError, KeyError) as problem:
                    # One malformed retained message or global version must not end the device.
                    log.warning("%s: ignored a %s message: %s", self.client_id, kind, problem)
                    continue
                if report is not None and self.state.round == report.round:
                    sent_here += 1  # the round is over for this device (accepted, or refused for good)
                if self.hub_state is not None and self.hub_state.phase is RoundPhase.DONE and self._up_to_date():
                    break
        finally:
            if own_link:
                self.close()
        return self.reports

    def run_rounds(self, n: int, *, timeout: float | None = None) -> list[RoundReport]:
        return self.run(rounds=n, timeout=timeout)

    # ---- event handling ---------------------------------------------------------------------------

    def _handle(self, kind: str, payload: bytes) -> RoundReport | None:
        if kind == "hub_state":
            hub_state = HubState.from_json(payload)
            if hub_state.protocol_version != PROTOCOL_VERSION:
                older = "device" if hub_state.protocol_version > PROTOCOL_VERSION else "hub"
                problem = (f"{self.client_id}: the hub speaks FedVLM protocol {hub_state.protocol_version} and this "
                           f"SDK speaks {PROTOCOL_VERSION}; upgrade the {older} (pip install -U fedvlm) so both "
                           "speak the same version")  # fmt: skip
                if hub_state.status is Presence.ONLINE:
                    raise EdgeClientError(problem)
                # An offline hub's last word, e.g. while it is being upgraded: wait for its successor.
                log.warning("%s (the hub is offline; waiting for it to come back)", problem)
                return None
            self.hub_state = hub_state
            self._ensure_model()
            self._fetch_global_if_newer()
            return self._maybe_take_part()
        if kind == "selection":
            selection = Selection.from_json(payload)
            if selection.client_id == self.client_id and selection.federation == self.federation:
                self.selection = selection
            return self._maybe_take_part()
        if kind == "manifest":
            manifest = GlobalManifest.from_json(payload)
            # Never back to an older version: the device would wait for chunks long cleared.
            newer = self.manifest is None or manifest.version >= self.manifest.version
            if manifest.federation == self.federation and newer:
                self.manifest = manifest
                self._fetch_global_if_newer()
            return self._maybe_take_part()
        if kind == "global_payload":
            self._absorb_global(payload)
            return self._maybe_take_part()
        if kind == "chunk_error":
            log.warning("%s: dropped a global chunk: %s", self.client_id, payload)
        if kind == "reconnected" and self._link is not None:
            self._link.publish(self.topics.client_announce(self.client_id), self._announce(Presence.ONLINE), retain=True)
            self._fetching_version = None
            self._refetches.clear()
            self._fetch_global_if_newer()
        return None

    def _restore_state_if_any(self) -> None:
        self.state = load_state(self.state_dir)

    def _ensure_model(self) -> None:
        """Build the model from the hub's announced strategy and LoRA layout (once)."""
        if self.model is not None or self.hub_state is None:
            return
        from fedvlm.edge.personal_model import PersonalVLM

        config = self.hub_state.round_config
        lora = LoraSettings.from_dict(config.get("lora", {}))
        try:
            # The strategy exactly as the hub built it; a strategy or option this SDK does not
            # know, or a device rank the strategy does not take, stops the device with the reason.
            strategy = build_strategy(config.get("strategy", "plora"), config.get("strategy_options") or {}, lora)
            self.model = PersonalVLM.from_pretrained(self.model_dir, lora=lora, strategy=strategy,
                                                     quantization=self.quantization, device=self.device,
                                                     rank=self.lora_rank)  # fmt: skip
        except UsageError as problem:
            raise EdgeClientError(f"{self.client_id}: cannot take part in federation {self.federation!r}: {problem} "
                                  "(a strategy or option unknown here: pip install -U fedvlm)") from None
        if self.privacy is not None:  # global version 0: DP measures changes from here
            self._initial_shared = self.model.shared_update()
        pinned = config.get("base_fingerprint")
        if pinned and pinned != self.model.fingerprint:
            raise EdgeClientError(
                f"the hub's federation uses base model {pinned}, {self.model_dir} is {self.model.fingerprint}: "
                "load the same base model as the other devices"
            )
        if self.state is not None:
            check_compatible(self.state, federation=self.federation, client_id=self.client_id,
                             base_fingerprint=self.model.fingerprint, lora=lora.to_dict(),
                             strategy=self.model.strategy.name)
            self.model.restore(self.state)
        else:
            self.state = self.model.device_state(federation=self.federation, client_id=self.client_id,
                                                 round=0, global_version=0, global_state={})

    def _has_global_of_last_round(self) -> bool:
        if self.hub_state is not None and self.hub_state.phase is RoundPhase.DONE and self._up_to_date():
            return True
        return self.state is not None and self.state.global_version >= self.state.round

    def _up_to_date(self) -> bool:
        latest = self.manifest.version if self.manifest else 0
        if self.hub_state is not None:
            latest = max(latest, self.hub_state.global_version)
        return self.state is not None and self.state.global_version >= latest

    def _fetch_global_if_newer(self) -> None:
        if self.manifest is None or self.model is None or self._link is None:
            return
        if self.manifest.version <= self.state.global_version or self._fetching_version == self.manifest.version:
            return
        if self._refetches.get(self.manifest.version, 0) > _MAX_REFETCHES:
            return
        if self._fetching_version is not None:
            self._link.unsubscribe(self.topics.global_chunks_filter(self._fetching_version))
        self._fetching_version = self.manifest.version
        self._link.subscribe(self.topics.global_chunks_filter(self.manifest.version), self._on_global_chunk)

    def _absorb_global(self, payload: bytes) -> None:
        manifest = self.manifest
        if manifest is None or self._fetching_version != manifest.version:
            return
        if tensor_codec.sha256_hex(payload) != manifest.payload_sha256 or len(payload) != manifest.total_size:
            self._link.unsubscribe(self.topics.global_chunks_filter(manifest.version))
            self._fetching_version = None
            self._refetches[manifest.version] = self._refetches.get(manifest.version, 0) + 1
            if self._refetches[manifest.version] <= _MAX_REFETCHES:
                log.warning("%s: global version %d does not match its manifest; fetching it again",
                            self.client_id, manifest.version)
                self._fetch_global_if_newer()  # the retained chunks are delivered again
            else:
                log.warning("%s: global version %d keeps failing its manifest's check; waiting for the hub "
                            "to publish it again", self.client_id, manifest.version)
            return
        tensors, metadata = tensor_codec.decode(payload)
        self.model.apply_global({k: v.copy() for k, v in tensors.items()})
        if manifest.round == self.state.round and self.hub_state is not None:
            # The global version of a round this device took part in: refit the personal factors
            # to it, with the steps the strategy kept from that round (none: nothing happens).
            config = self._round_training(self.hub_state, manifest.round)
            refit = self.model.refit_personal(self.model.encoded(self.train_examples, config.objective),
                                              dataclasses.replace(config, seed=config.seed + 500),
                                              description=f"{self.client_id} refit {manifest.round}")  # fmt: skip
            if refit is not None:  # recorded with the round it belongs to
                self.state.metrics = [{**entry, "refit": refit.to_dict()} if entry.get("round") == manifest.round
                                      else entry for entry in self.state.metrics]  # fmt: skip
        self._link.unsubscribe(self.topics.global_chunks_filter(manifest.version))
        self._fetching_version = None
        self.state.global_version = manifest.version
        self.state.global_state = {k: v for k, v in tensors.items()}
        self._commit_state()
        log.info("%s: absorbed global version %d", self.client_id, manifest.version)

    def _commit_state(self) -> None:
        self.state.personal = self.model.personal_factors()
        self.state.current_shared = self.model.shared_update()
        save_state(self.state_dir, self.state, write_peft_adapter=self.model.save_pretrained)

    # ---- taking part in a round -------------------------------------------------------------------

    def _maybe_take_part(self) -> RoundReport | None:
        hub = self.hub_state
        if hub is None or self.model is None or hub.phase is not RoundPhase.COLLECTING:
            return None
        if self.selection is None or not self.selection.matches(hub) or self.state.round >= hub.round:
            return None
        if self.state.global_version < hub.global_version:
            return None  # train on the latest global state only; it is being fetched
        return self._take_part(hub)

    def _take_part(self, hub: HubState) -> RoundReport | None:
        self._finish_saving()  # a save still running from an interrupted round
        pending = self._pending_update(hub.round)
        outgoing = self._saved_update(pending, hub) if pending is not None else self._new_update(hub)
        topic = self.topics.update(self.client_id, outgoing.message_id)
        # MQTT 5: chunks nobody can reassemble after the round's deadline expire in the broker.
        extras = Mqtt5Extras(
            expiry_s=max(int((hub.deadline or time.time() + 600) - time.time()), 60),
            content_type="application/vnd.fedvlm.chunk",
            user_properties=(("fedvlm-kind", "update"), ("fedvlm-client", self.client_id),
                             ("fedvlm-round", str(hub.round))),
        )
        try:
            self._link.publish_many(((topic, chunk) for chunk in outgoing.chunks), qos=1, extras=extras)
        except Exception:
            self._finish_saving()  # kept for a re-send, unless the save itself failed (logged)
            raise
        messages = [(topic, chunk) for chunk in outgoing.sent()]
        # Re-sent unchanged while no ack comes: after a broker restart the hub may have missed
        # it; the hub counts one message id once and answers a repeat with the same verdict.
        resend = lambda: self._link.publish_many(messages, qos=1, extras=extras)  # noqa: E731
        backoff = RetryBackoff()
        ack = self._wait_for_ack(outgoing.message_id, hub, resend=resend)
        while (ack is not None and ack.reason_code.value in RETRYABLE_AFTER_HINT
               and time.time() < (hub.deadline or time.time())):  # fmt: skip
            # Refused for load (or lost in reassembly): not a verdict on the update. The same
            # message again after the hub's hint, backed off with jitter, within the round.
            delay = min(backoff.next_delay(ack.retry_after_s), max(0.0, (hub.deadline or 0) - time.time()))
            log.info("%s: update of round %d refused for now (%s); sending it again in %.1f s", self.client_id,
                     hub.round, ack.reason_code.value, delay)  # fmt: skip
            time.sleep(delay)
            resend()
            ack = self._wait_for_ack(outgoing.message_id, hub, resend=resend)
        if ack is None:
            # The hub or the broker is away: keep the saved update; it is re-sent, byte for
            # byte, when the hub's state arrives again (e.g. after a reconnect).
            log.warning("%s: no acknowledgement for round %d yet; will re-send the same update",
                        self.client_id, hub.round)
            return None
        return self._settle(ack, hub, outgoing)

    def _saved_update(self, pending: tuple, hub: HubState) -> _Outgoing:
        """The update saved before a restart, sealed again: byte for byte what was being sent."""
        envelope, message_id, chunk_size, train_metrics, eval_metrics, trained_adapter = pending
        # The factors this update was trained into, so what is committed on acceptance is
        # what the update came from, not the state from before the crash.
        self.model.load_adapter_state(trained_adapter)
        log.info("%s: re-sending the update of round %d saved before a restart", self.client_id, hub.round)
        # The chunk size it was first sent with: chunks of another size would contradict
        # the hub's partial copy of the message.
        chunks = split_payload(envelope, chunk_size=chunk_size, message_id=message_id)
        return _Outgoing(message_id, len(envelope), chunks, lambda: chunks, train_metrics, eval_metrics)

    def _new_update(self, hub: HubState) -> _Outgoing:
        """Train on the local data, then sign, chunk and save the update as it is published."""
        config = self._round_training(hub, hub.round)
        if self.privacy is not None:
            self.privacy.before_training(self._dp_reference())
        # The reward margin is measured against the adapter this round started from, DPO's reference.
        start = self.model.likelihood_scores(self.eval_examples) if self.eval_examples else None
        train_metrics = self.model.train(self.train_examples, config,
                                         description=f"{self.client_id} round {hub.round}").to_dict()
        train_metrics["objective"] = config.objective.name
        eval_metrics = (self.model.evaluate(self.eval_examples, reference=start, beta=_beta(config)).to_dict()
                        if self.eval_examples else None)
        upload = self._signed_upload(hub.round, train_metrics, eval_metrics)
        # A thread saves the update while its chunks are hashed and published; the last chunk
        # waits for the save, so the hub cannot complete, let alone accept, an update this
        # device has not kept. A device killed mid-upload re-sends the same message after a
        # restart and the hub completes it. The save also runs to its end when publishing
        # fails or the user interrupts (the process exits once the update is kept).
        saver = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedvlm-save")
        self._saving = saver.submit(self._save_pending, hub.round, upload.signed_part, upload.message_id,
                                    upload.chunk_size, train_metrics, eval_metrics)  # fmt: skip
        saver.shutdown(wait=False)
        chunks = upload.chunks(before_last_chunk=self._saving.result)
        return _Outgoing(upload.message_id, upload.envelope_size, chunks, lambda: upload.sent, train_metrics,
                         eval_metrics)  # fmt: skip

    def _round_training(self, hub: HubState, round_number: int) -> TrainingConfig:
        """This device's training settings with the hub's hints (local steps, learning rate) and
        the federation's objective (a hub that announces none leaves the device's own)."""
        config = hub.round_config
        objective = self.training.objective
        if "objective" in config:
            objective = build_objective(config["objective"], config.get("dpo_beta", _beta(self.training)))
        if isinstance(objective, DpoObjective):
            self._keep_preference_pairs()
        return dataclasses.replace(
            self.training,
            steps=int(config.get("local_steps", self.training.steps)),
            learning_rate=float(config.get("learning_rate", self.training.learning_rate)),
            seed=self.training.seed + round_number,
            objective=objective,
        )

    def _keep_preference_pairs(self) -> None:
        """The federation trains with DPO, which the device learns only from the hub (the data
        was read before): drop the examples without a rejected answer (``skip_unpaired``), or
        stop with the reason rather than fail inside training."""
        unpaired = unpaired_examples(self.train_examples)
        if not unpaired:
            return
        total = len(self.train_examples)
        if not self.skip_unpaired or len(unpaired) == total:
            first = getattr(self.train_examples[unpaired[0]], "source", "") or f"example {unpaired[0]}"
            remedy = ("give this device preference pairs (a rejected answer per record)" if len(unpaired) == total
                      else "pass --skip-bad to train on the pairs only, or give every record a rejected answer")
            raise EdgeClientError(f"federation {self.federation!r} trains with DPO (announced by its hub), but "
                                  f"{len(unpaired)} of {total} training records of {self.client_id} have no rejected "
                                  f"answer (first: {first}): {remedy}")
        unpaired_set = set(unpaired)
        self.train_examples = [e for i, e in enumerate(self.train_examples) if i not in unpaired_set]
        log.warning("%s: the federation trains with DPO: skipped %d of %d training records without a rejected "
                    "answer (--skip-bad)", self.client_id, len(unpaired), total)

    def _finish_saving(self) -> None:
        """Wait for the update being saved, if any; a failed save is logged (the round is then
        trained again), the error that interrupted publishing being the one to report."""
        saving, self._saving = self._saving, None
        if saving is not None and saving.exception() is not None:
            log.warning("%s: could not keep the last update for re-sending (%s); its round will be trained again",
                        self.client_id, saving.exception())  # fmt: skip

    def _settle(self, ack: Ack, hub: HubState, outgoing: _Outgoing) -> RoundReport:
        """Record the hub's verdict: commit the round, wait for another, or stop."""
        spent = self._privacy_spent(hub.round)
        report = RoundReport(round=hub.round, accepted=ack.accepted, reason=ack.reason_text or ack.reason_code.value,
                             samples=len(self.train_examples), train=outgoing.train_metrics,
                             evaluation=outgoing.eval_metrics, bytes_sent=outgoing.envelope_size,
                             global_version=self.state.global_version,
                             privacy=spent.to_dict() if spent is not None else None)  # fmt: skip
        self.reports.append(report)
        self._clear_pending()
        if ack.accepted:
            self.state.round = hub.round
            self.state.metrics = self.state.metrics + [dataclasses.asdict(report)]
            self._commit_state()
            log.info("%s: round %d accepted", self.client_id, hub.round)
        elif ack.reason_code in _MISCONFIGURED:
            raise EdgeClientError(f"{self.client_id}: the hub refused our update ({ack.reason_code.value}): "
                                  f"{report.reason}")
        elif ack.reason_code in _TRY_AGAIN:
            # Timing, not content: train and send again if the round reopens with us in it.
            log.warning("%s: round %d not taken now (%s); waiting for the next round", self.client_id,
                        hub.round, report.reason)
        else:
            # This update will not become acceptable by re-sending it: the round is over for us.
            self.state.round = hub.round
            self._commit_state()
            log.warning("%s: round %d rejected: %s", self.client_id, hub.round, report.reason)
        return report

    def _signed_upload(self, round_number: int, train_metrics: dict, eval_metrics: dict | None) -> SignedUpload:
        """This round's update, ready to be signed and chunked as it is published."""
        shared = self.model.shared_update()
        if self.privacy is not None:  # clipped and noised before it is signed; personal factors untouched
            shared = self.privacy.privatize(shared, round_number)
        metadata = EnvelopeMetadata(
            federation=self.federation, round=round_number, client_id=self.client_id,
            sample_count=len(self.train_examples), strategy=self.model.strategy.name,
            base_fingerprint=self.model.fingerprint, lora_config_hash=self.model.layout_hash,
        )
        body_metadata = {k: str(v) for k, v in metadata.to_dict().items() if k != "type"}
        if self.privacy is None:
            metrics = {"train": train_metrics, "eval": eval_metrics}
        else:
            # Under DP only the accounting leaves the device: losses, accuracies and the
            # pre-clip norm are functions of the private data that the noise does not cover.
            spent = self._privacy_spent(round_number)
            metrics = {"privacy": spent.public_dict() if spent is not None else None}
        body_metadata["metrics"] = json.dumps(metrics)
        body = tensor_codec.encode(shared, body_metadata)
        return SignedUpload(body, metadata, self.client_id, self.secret, chunk_size=self.connection.chunk_size)

    def _dp_reference(self) -> dict:
        """The shared factors of the global version this device trains from: DP clips the
        change from them. Not the factors before this training run: after a retried round
        those already hold an earlier, unclipped training run."""
        global_state = self.state.global_state if self.state.global_version > 0 else {}
        shapes = {name: initial.shape for name, initial in self._initial_shared.items()}
        received = self.model.strategy.starting_point(global_state, shapes)  # e.g. this device's rank of it
        return {name: received.get(name, initial) for name, initial in self._initial_shared.items()}

    def _privacy_spent(self, round_number: int) -> PrivacySpent | None:
        """What this round's update spent, with differential privacy on."""
        spent = self.privacy.last_spent if self.privacy is not None else None
        return spent if spent is not None and spent.round == round_number else None

    def _wait_for_ack(self, message_id: bytes, hub: HubState, timeout: float | None = None,
                      resend=None) -> Ack | None:
        wait = timeout or max((hub.deadline or time.time()) - time.time(), 0) + 60
        deadline = time.monotonic() + wait
        resend_every = _RESEND_AFTER_S
        next_resend = time.monotonic() + resend_every
        hub_was_offline = False
        deferred = []
        try:
            while time.monotonic() < deadline:
                if resend is not None and time.monotonic() > next_resend:
                    resend()  # the last resort: nothing heard, not even the hub going away
                    resend_every = min(2 * resend_every, _MAX_RESEND_AFTER_S)
                    next_resend = time.monotonic() + resend_every
                try:
                    kind, payload = self._events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if kind == "ack":
                    ack = Ack.from_json(payload)
                    if ack.message_id == message_id.hex():
                        return ack
                    continue
                if kind == "hub_state":
                    status = _hub_status(payload)
                    if status is Presence.OFFLINE:
                        hub_was_offline = True
                    elif status is Presence.ONLINE and hub_was_offline and resend is not None:
                        # The hub is back (restarted): what it had not committed it may not
                        # get from the broker again, so send now rather than on the timer.
                        hub_was_offline = False
                        resend()
                        next_resend = time.monotonic() + resend_every
                deferred.append((kind, payload))
        finally:
            self._events.put_back(deferred)  # handled after the round, before anything newer
        return None

    # ---- the update kept until acknowledged -------------------------------------------------------

    def _save_pending(self, round_number: int, signed_part: bytes | Sequence[bytes | memoryview], message_id: bytes,
                      chunk_size: int, train: dict, evaluation) -> None:  # fmt: skip
        """Keep an update until it is acknowledged: its signed part (the envelope without the
        MAC, sealed again on a re-send), the factors it was trained into, and its round."""
        # The update and the trained factors first: the info file's presence is what marks
        # a pending update complete.
        write_durably(self.state_dir / _PENDING_UPDATE, signed_part)
        write_durably(self.state_dir / _PENDING_ADAPTER, tensor_codec.encode(self.model.adapter_state(), {}))
        info = {"round": round_number, "message_id": message_id.hex(), "chunk_size": chunk_size, "train": train,
                "evaluation": evaluation}  # fmt: skip
        write_durably(self.state_dir / _PENDING_INFO, json.dumps(info).encode())

    def _pending_update(self, round_number: int):
        info_path, body_path = self.state_dir / _PENDING_INFO, self.state_dir / _PENDING_UPDATE
        adapter_path = self.state_dir / _PENDING_ADAPTER
        if not info_path.exists() or not body_path.exists() or not adapter_path.exists():
            return None
        info = json.loads(info_path.read_text())
        adapter, _ = tensor_codec.decode(adapter_path.read_bytes())
        if info["round"] != round_number:
            if info["round"] < round_number:
                # The hub moved on while we were away, perhaps having accepted this update:
                # keep the personal factors it was trained with (the shared ones come with
                # the next global version); re-sending it is pointless now.
                _, personal = self.model.strategy.split(adapter)
                # Not FedEx's base deltas: they come with the global versions.
                self.model.load_personal({name: value for name, value in personal.items()
                                          if not is_base_delta_key(name)})  # fmt: skip
            self._clear_pending()
            return None
        signed_part = body_path.read_bytes()
        try:
            if not speaks_current_protocol(signed_part):
                # Saved by an older SDK, so the hub would refuse it and has aggregated nothing
                # of it: the round is trained again from the committed state.
                raise ProtocolError(ReasonCode.UNSUPPORTED_VERSION, "saved in an older protocol version")
            envelope = seal_envelope(signed_part, self.secret)  # byte for byte what was sent before
        except ProtocolError as problem:
            log.warning("%s: dropping the saved update of round %d (%s); training the round again",
                        self.client_id, round_number, problem)  # fmt: skip
            self._clear_pending()
            return None
        return (envelope, bytes.fromhex(info["message_id"]), info["chunk_size"], info["train"], info["evaluation"],
                adapter)  # fmt: skip

    def _clear_pending(self) -> None:
        # The info file first: without it the others are ignored, so a crash midway is harmless.
        for name in (_PENDING_INFO, _PENDING_UPDATE, _PENDING_ADAPTER):
            (self.state_dir / name).unlink(missing_ok=True)


def _beta(config: TrainingConfig) -> float:
    """DPO's beta of a training config (the default one under SFT: it scales the reported margin)."""
    return getattr(config.objective, "beta", DEFAULT_DPO_BETA)


def _hub_status(payload: bytes) -> Presence | None:
    """The status of a hub state message, or None if it is not one."""
    try:
        return HubState.from_json(payload).status
    except ProtocolError:
        return None


def _sdk_version() -> str:
    from fedvlm import __version__

    return __version__
