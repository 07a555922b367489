"""``fedvlm-hub worker``: processes that share a federation's uploads with MQTT 5 shared subscriptions.

How the work is split:

- Every worker subscribes to ``$share/<group>/fedvlm/v1/<federation>/updates/+/+``: the
  broker hands each message to one member of the group.
- A one-chunk update (up to 256 KiB by default) is judged where it lands. The chunks of a
  larger update must meet in one place, but mosquitto hands shared messages out round
  robin, so each such update has an owner (its message id modulo ``workers``): a worker
  that receives a chunk it does not own relays it to the owner's relay topic and
  acknowledges the original only once the broker has the relayed copy.
- Judging is the hub's own ``UpdateIntake`` (reassembly, signature, round and layout
  checks, the running sum, group commits), given a ``WorkerLedger`` for a store: it reads
  clients, rounds and pins from the hub's database and commits each batch's receipts
  together with this worker's running partial sum in one transaction of that database.
  The receipts table's key (round, client) makes "one update per client per round" hold
  across workers; a commit for a round that is no longer collecting fails, so nothing is
  counted after the coordinator took the partial sums.
- Chunks are acknowledged to the broker only once their update is committed or refused:
  a worker killed at any moment leaves every update it had not committed with the broker,
  which delivers it again when the worker comes back (same ``--index``: the same
  persistent session), and its committed partial sum is read back from the database.
- The coordinator (``fedvlm-hub start --workers N``) opens rounds, sees the answers in
  the receipts table and merges the partial sums (``worker_partials``).

Workers read the hub's state directory (its database and key file): they run on the
hub's machine, or where that directory is shared. The embedded broker (amqtt, MQTT 3.1.1)
has no shared subscriptions: workers need mosquitto 2, EMQX or another MQTT 5 broker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fedvlm.shared.mqtt_link import BrokerAddress, BrokerUnavailable, MqttLink
from fedvlm.shared.protocol import Ack, ProtocolError, Topics, parse_chunk_header, validate_share_group

from .checkpoints import CheckpointStore
from .config import HubConfig
from .console import Console
from .errors import HubConfigError, HubError
from .event_loop import serve_events
from .intake_queue import INBOX_BYTES, IntakeQueue
from .intake import UpdateIntake
from .norm_bound import MEDIANS_META_KEY, NormBoundedStrategy, NormHistory
from .rounds import RoundPolicy
from .store import HubStore
from .worker_partials import RoundMirror, WorkerLedger
from .worker_readiness import coordinator_run, record_subscribed
from .worker_settings import DEFAULT_GROUP
from .updates import PIN_BASE_FINGERPRINT, PIN_TENSOR_SPEC, FederationPins, UpdateRules

__all__ = ["HubWorker", "owner_of", "DEFAULT_GROUP"]

log = logging.getLogger(__name__)

_TICK_S = 0.1
_REFRESH_EVERY_S = 0.25
_PUBLISH_TIMEOUT_S = 10.0


def owner_of(message_id: bytes, workers: int) -> int:
    """The worker that reassembles a multi-chunk update (message ids are random: even spread)."""
    return int.from_bytes(message_id[:4], "big") % workers


def partial_name(index: int) -> str:
    return f"worker-{index}"


class HubWorker:
    """One worker: ``start()`` it, then ``serve()`` (blocking) or ``stop()`` it."""

    def __init__(self, config: HubConfig, *, index: int, workers: int, group: str = DEFAULT_GROUP,
                 relay: bool = True, console: Console | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        """``relay=False``: the broker keeps each device's messages on one worker (EMQX's
        ``hash_clientid`` or ``hash_topic`` strategy), so chunks need no relaying."""
        if config.uses_embedded_broker:
            raise HubConfigError("hub workers need an MQTT 5 broker with shared subscriptions, which the embedded "
                                 "broker lacks: run mosquitto 2 or EMQX and pass --broker mqtt://HOST:PORT to both "
                                 "`fedvlm-hub start --workers N` and every worker")  # fmt: skip
        if not 0 <= index < workers:
            raise HubConfigError(f"--index {index} is not one of the {workers} workers (0 to {workers - 1})")
        try:
            validate_share_group(group)
        except ProtocolError as error:
            raise HubConfigError(f"--group: {error}") from None
        self.config = config
        self.index, self.workers, self.group, self.relay = index, workers, group, relay
        self.name = partial_name(index)
        self.console = console if console is not None else Console()
        self.topics = Topics(config.federation)
        self._clock = clock
        self.store: HubStore | None = None
        self._intake: UpdateIntake | None = None
        self._mirror: RoundMirror | None = None
        self._link: MqttLink | None = None
        # Bounded like the hub's inbox: the broker, not this process, holds the backlog.
        self._events = IntakeQueue(max_chunks=config.inflight_window, max_bytes=INBOX_BYTES)
        self._stop_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self._aggregate_round: int | None = None
        self._last_refresh = 0.0
        self._recorded_run: str | None = None
        self.relayed = 0

    # ================================================================== public API
    @property
    def address(self) -> BrokerAddress:
        return self.config.broker_address()

    def start(self, connect_timeout: float = 15.0) -> HubWorker:
        config = self.config
        self.store = HubStore.in_state_dir(config.state_dir, create=False, secrets_key_file=config.secrets_key_file)
        strategy = config.build_strategy()
        self.store.bind_federation(config.federation, strategy.name, strategy.layout_hash(config.lora))
        rules = self._rules(strategy)
        policy = RoundPolicy(min_clients=config.min_clients, fraction=config.fraction, quorum=config.quorum,
                             round_timeout_s=config.round_timeout_s, seed=config.selection_seed,
                             rounds=config.rounds)  # fmt: skip
        self._mirror = RoundMirror(self.store, policy)
        self._mirror.refresh()
        self._intake = UpdateIntake(
            rules=rules, scaling=config.lora.scaling, round_timeout_s=config.round_timeout_s,
            store=WorkerLedger(self.store, self.name), files=CheckpointStore(config.state_dir),
            lifecycle=lambda: self._require_mirror().lifecycle, send_ack=self._send_ack, console=self.console,
            clock=self._clock, on_accepted=lambda _: None, on_pinned=lambda _: None,
            commit_batch=config.commit_batch, max_held_chunks=max(1, config.inflight_window // 2),
            reassembly_slots=config.reassembly_slots,
        )  # fmt: skip
        self._reload_pins()
        self._follow_round()
        self._link = MqttLink(self.address, f"fedvlm-hub-worker-{config.federation}-{self.index}", protocol="5",
                              receive_maximum=config.inflight_window)  # fmt: skip
        # Handlers before connect: a resumed session delivers what it held at once.
        self._link.subscribe(self.topics.shared_updates_filter(self.group),
                             lambda topic, payload, retained, ack: self._events.put(("chunk", topic, payload, ack),
                                                                                     size=len(payload)),
                             manual_ack=True)  # fmt: skip
        self._link.subscribe(self.topics.worker_relay_filter(self.index),
                             lambda topic, payload, retained, ack: self._events.put(("relayed", topic, payload, ack),
                                                                                     size=len(payload)),
                             manual_ack=True)  # fmt: skip
        # Until this thread's loop runs nothing drains the inbox, and a resumed session's backlog
        # would fill it and stop paho's thread before it reads the SUBACKs awaited here.
        with self._events.unbounded():
            try:
                self._link.connect(connect_timeout)
            except BrokerUnavailable as error:
                self._release()
                raise BrokerUnavailable(f"{error} Hub workers need MQTT 5 (shared subscriptions): mosquitto 2, EMQX "
                                        "or HiveMQ; the embedded broker (MQTT 3.1.1) cannot serve them.") from None
            if not self._link.wait_subscribed(connect_timeout):
                log.warning("the broker has not acknowledged the shared subscription yet; the coordinator opens no "
                            "round until it does")  # fmt: skip
        if self._link.refused_subscriptions:
            refused = "; ".join(f"{f}: {reason}" for f, reason in self._link.refused_subscriptions.items())
            self._release()
            raise HubError(f"the broker refused the worker's subscriptions ({refused}); hub workers need shared "
                           "subscriptions (MQTT 5: mosquitto 2, EMQX, HiveMQ) and an ACL that lets them subscribe "
                           f"to {self.topics.shared_updates_filter(self.group)}")  # fmt: skip
        self._record_subscribed()
        self.console.event(f"worker {self.index} of {self.workers} for federation {config.federation!r}: shared "
                           f"subscription group {self.group!r} on {self.address.url()}")  # fmt: skip
        self._thread = threading.Thread(target=self._run, name=f"fedvlm-hub-worker-{self.index}", daemon=True)
        self._thread.start()
        return self

    def serve(self) -> None:
        """Start if needed and run until ``request_stop``."""
        if self._thread is None:
            self.start()
        try:
            while not self._stop_requested.wait(0.2):
                pass
        finally:
            self.stop()

    def request_stop(self) -> None:
        self._stop_requested.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_requested.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
            self.console.event(f"worker {self.index} stopped")
        self._release()

    # ================================================================== the worker thread
    def _run(self) -> None:
        serve_events(self._events, self._stop_requested, handle=lambda event: self._on_chunk(*event),
                     commit=lambda: self._require_intake().flush(),
                     commit_due=lambda: self._require_intake().commit_due(), tick=self._tick, tick_s=_TICK_S,
                     owner=f"worker {self.index}")  # fmt: skip
        try:
            self._require_intake().flush()
        except Exception:
            log.exception("the worker could not commit its last batch; the broker re-sends those updates")

    def _tick(self, now: float) -> None:
        intake = self._require_intake()
        intake.drain_expired()
        if now - self._last_refresh >= _REFRESH_EVERY_S:
            self._last_refresh = now
            if self._require_mirror().refresh():
                self._follow_round()
            if self._recorded_run != coordinator_run(self._require_store()):  # a coordinator (re)started
                self._record_subscribed()

    def _record_subscribed(self) -> None:
        """Tell the coordinator this worker's subscription is in place (it opens no round before)."""
        link = self._link
        if link is not None and link.subscribed.is_set():
            self._recorded_run = record_subscribed(self._require_store(), self.index)

    def _follow_round(self) -> None:
        """The partial sum belongs to one round: when the coordinator moved on, start the next."""
        intake, lifecycle = self._require_intake(), self._require_mirror().lifecycle
        round_number = lifecycle.round_number
        if round_number == self._aggregate_round:
            return
        intake.flush()
        intake.rebuild_aggregate(round_number)  # this worker's committed partial, if it had one
        self._aggregate_round = round_number
        self._reload_pins()

    def _reload_pins(self) -> None:
        store, intake = self._require_store(), self._require_intake()
        intake.pins = FederationPins.from_meta({key: store.get_meta(key)
                                                for key in (PIN_BASE_FINGERPRINT, PIN_TENSOR_SPEC)})  # fmt: skip

    def _on_chunk(self, kind: str, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        try:
            parsed = self.topics.parse_worker_relay(topic) if kind == "relayed" else self.topics.parse(topic)
        except ProtocolError as error:
            log.warning("ignoring a message on %s: %s", topic, error)
            ack()
            return
        assert parsed.client_id is not None and parsed.message_id is not None
        if kind == "chunk" and self.relay and self.workers > 1 and self._relay_if_not_mine(parsed.client_id, parsed.message_id,
                                                                            payload):  # fmt: skip
            ack()
            return
        mirror = self._require_mirror()
        current = mirror.lifecycle.current
        if current is None or not current.is_selected(parsed.client_id):
            # Not collecting from this device as far as this worker knows: the coordinator may have
            # opened a round (or a new attempt) since the last tick's read. Read it again now, not
            # after a rate limit: the devices it selected send at once, and an update judged
            # against the stale view would be refused for good.
            self._last_refresh = time.monotonic()
            if mirror.refresh():
                self._follow_round()
        self._require_intake().on_chunk(parsed.client_id, parsed.message_id, payload, ack)

    def _relay_if_not_mine(self, client_id: str, message_id: bytes, payload: bytes) -> bool:
        """Relay a chunk of another worker's multi-chunk update; True once the broker has it."""
        try:
            header = parse_chunk_header(payload, sender=client_id)
        except ProtocolError:
            return False  # refused here, by the intake, like any broken chunk
        if header.count <= 1:
            return False
        owner = owner_of(message_id, self.workers)
        if owner == self.index:
            return False
        link = self._link
        assert link is not None
        # The broker's confirmation is awaited here, and paho's thread must be free to read it.
        with self._events.unbounded():
            link.publish(self.topics.worker_relay(owner, client_id, message_id), payload, qos=1,
                         timeout=_PUBLISH_TIMEOUT_S)  # fmt: skip
        self.relayed += 1
        return True

    def _send_ack(self, ack: Ack) -> None:
        if self._link is None:
            return
        try:
            self._link.publish_nowait(self.topics.client_ack(ack.client_id), ack.to_json(), qos=1)
        except BrokerUnavailable as error:
            log.warning("could not acknowledge %s's message %s: %s", ack.client_id, ack.message_id, error)

    # ================================================================== helpers
    def _rules(self, strategy: Any) -> UpdateRules:
        """The hub's rules for an update, norm bound included (the coordinator records the medians)."""
        config, store = self.config, self._require_store()
        shared: Any = strategy
        if config.norm_bound.enabled:
            history = NormHistory(load=lambda: store.get_meta(MEDIANS_META_KEY), save=lambda text: None)
            shared = NormBoundedStrategy(strategy, config.norm_bound, history, reference=self._previous_global,
                                         round_number=lambda: self._require_mirror().lifecycle.round_number)
        return UpdateRules(federation=config.federation, strategy=shared,
                           lora_config_hash=strategy.layout_hash(config.lora),
                           max_update_bytes=config.max_update_bytes, max_sample_count=config.max_sample_count)

    def _previous_global(self) -> dict[str, Any] | None:
        from fedvlm.shared import tensor_codec

        latest = self._require_store().latest_global()
        if latest is None:
            return None
        tensors, _ = tensor_codec.decode(CheckpointStore(self.config.state_dir).read(latest.file_path))
        return tensors

    def _release(self) -> None:
        self._events.close()  # paho's thread may wait for room that nobody will make any more
        if self._link is not None:
            self._link.close()
            self._link = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def _require_store(self) -> HubStore:
        return _started(self.store)

    def _require_intake(self) -> UpdateIntake:
        return _started(self._intake)

    def _require_mirror(self) -> RoundMirror:
        return _started(self._mirror)


def _started(part: Any) -> Any:
    if part is None:
        raise RuntimeError("the worker is not started")
    return part
