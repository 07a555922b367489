"""The hub service: runs a federation's rounds over MQTT, durably.

Threads: paho's network thread only hands over what arrives (update chunks and reconnects
on a bounded queue; announcements into the presence tracker's inbox, the latest per
client); one hub thread takes events off the queue and owns everything else (reassembly,
verification, aggregation, SQLite, publishing), so none of that needs locks, and events
are handled in the order they arrived. The hub thread never waits for the broker while
it works through updates: acks, selections and the state are published without waiting,
through the link's bounded publish window (selections made lazily as the window has room);
only a new global version's chunks are confirmed before its manifest.

Update chunks are acknowledged to the broker manually, once their update is committed or
refused (intake.py), and the hub asks the broker (MQTT 5 receive maximum) for at most
``inflight_window`` unacknowledged chunks: that window bounds the queue and the hub's
memory, and whatever the hub had not judged when it died is still with the broker.
Handlers are registered before the connection, so a resumed session's backlog finds them.

Who does what: ``UpdateIntake`` judges updates (intake.py), ``PresenceTracker`` follows
announcements (presence.py), ``RoundLifecycle`` decides when rounds open, close or retry
(rounds.py), ``GlobalPublisher`` puts global versions on the broker (publisher.py); this
module wires them to the MQTT link, the store and the clock, and publishes the state.

Crash safety: what is acknowledged is on disk. On start the hub reloads the open round,
its aggregator from the committed running sum, re-acknowledges the round's receipts (an
ack may have been lost with the crash), republishes its latest global version (identical
bytes), its state and the selections, and carries on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from fedvlm.shared import tensor_codec
from fedvlm.shared.mqtt_link import BrokerAddress, BrokerUnavailable, MqttLink, Will
from fedvlm.shared.protocol import (
    Ack,
    GlobalManifest,
    HubState,
    Presence,
    ProtocolError,
    RoundPhase,
    Selection,
    Topics,
    expected_chunk_count,
)

from .broker import EmbeddedBroker
from .broker_config import publisher_address
from .checkpoints import CheckpointStore
from .config import HubConfig
from .console import Console
from .errors import HubConfigError, StateDirMismatch
from .event_loop import serve_events
from .intake import UpdateIntake
from .intake_queue import INBOX_BYTES, IntakeQueue
from .norm_bound import MEDIANS_META_KEY, NormBoundedAggregator, NormBoundedStrategy, NormHistory
from .presence import PresenceTracker
from .publisher import GlobalPublisher, global_payload
from .rounds import LifecyclePhase, OpenRound, Outcome, RoundLifecycle, RoundPolicy
from .store import GlobalVersionRecord, HubStore, RoundRecord
from .worker_partials import merge_worker_partials
from .worker_readiness import begin_coordinator_run, unsubscribed_workers
from .worker_settings import SETTINGS_META_KEY, federation_settings
from .updates import PIN_BASE_FINGERPRINT, PIN_TENSOR_SPEC, FederationPins, UpdateRules

__all__ = ["HubService"]

log = logging.getLogger(__name__)

# How often the hub thread looks at the clock (deadlines, expired reassemblies).
_TICK_S = 0.1
_PROGRESS_EVERY_S = 10.0
# With workers: how often the coordinator reads the receipts they committed.
_WORKER_POLL_S = 0.2
_RETRY_PUBLISH_AFTER_S = 2.0
# Presence is written to SQLite at most this often (in one transaction).
_PRESENCE_FLUSH_S = 0.2
# While waiting for clients, the registry is read as a whole at most this often.
_FULL_ONLINE_CHECK_S = 0.5
# Update chunks (bytes) waiting for the hub thread at most: a few megabytes keep it busy,
# more only holds memory (intake_queue.py).
# Console lines per batch of announcements before one summary line replaces them.
_ANNOUNCEMENT_LINES = 10
# Client ids listed on the console when a round opens.
_LISTED_CLIENTS = 10
_PHASES = {LifecyclePhase.WAITING: RoundPhase.WAITING, LifecyclePhase.COLLECTING: RoundPhase.COLLECTING,
           LifecyclePhase.DONE: RoundPhase.DONE}  # fmt: skip


class HubService:
    """Runs one federation: ``start()`` it, then ``serve()`` (blocking) or ``stop()`` it.

    Attributes:
        config: the hub's configuration.
        finished: set once the configured number of rounds is done.
        broker: the embedded broker, when the hub runs one (None otherwise).
        store: the hub's SQLite state while the hub runs.

    Typical use::

        hub = HubService(HubConfig(federation="demo", rounds=3, min_clients=3))
        hub.serve()            # until the rounds are done (or request_stop())

    ``on_checkpoint(point)``, when given, is called at the two points of a round where a
    crash must leave a consistent state: ``"aggregating"`` (every update of the round
    committed, the new version not yet computed) and ``"publishing"`` (the version
    committed, its chunks and manifest on the broker, not yet marked published). Fault
    tests freeze the hub there to kill it; it also suits tracing.
    """

    def __init__(self, config: HubConfig, *, console: Console | None = None,
                 clock: Callable[[], float] = time.time,
                 on_checkpoint: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.config = config
        self._on_checkpoint = on_checkpoint
        self.console = console if console is not None else Console()
        self.topics = Topics(config.federation)
        self.strategy = config.build_strategy()
        self._clock = clock
        # Norm bounding wraps the strategy, so every update the intake adds (live, or
        # re-added from disk after a restart) is bounded by the same rule and reference.
        self._norm_history = NormHistory(load=lambda: self._require_store().get_meta(MEDIANS_META_KEY),
                                         save=lambda text: self._require_store().set_meta({MEDIANS_META_KEY: text}))
        shared_strategy: Any = self.strategy
        if config.norm_bound.enabled:
            shared_strategy = NormBoundedStrategy(self.strategy, config.norm_bound, self._norm_history,
                                                  reference=self._load_previous_global,
                                                  round_number=self._collecting_round)  # fmt: skip
        self._rules = UpdateRules(federation=config.federation, strategy=shared_strategy,
                                  lora_config_hash=self.strategy.layout_hash(config.lora),
                                  max_update_bytes=config.max_update_bytes,
                                  max_sample_count=config.max_sample_count)  # fmt: skip
        self._policy = RoundPolicy(min_clients=config.min_clients, fraction=config.fraction, quorum=config.quorum,
                                   round_timeout_s=config.round_timeout_s, seed=config.selection_seed,
                                   rounds=config.rounds, clients_per_round=config.clients_per_round)  # fmt: skip
        self._lifecycle = RoundLifecycle(self._policy)
        self._files = CheckpointStore(config.state_dir)
        self.finished = threading.Event()
        self.broker: EmbeddedBroker | None = None
        self.store: HubStore | None = None
        self._intake: UpdateIntake | None = None
        self._presence: PresenceTracker | None = None
        self._link: MqttLink | None = None
        # What the hub publishes goes out on its own connection (``_out``), where the broker
        # has one: on ``_link`` its acks waited for their PUBACKs behind the update chunks the
        # broker had queued for the hub (8,741 acks at once at 10,000 devices). ``_link`` when
        # there is no second connection (the embedded broker, or a broker that refuses it).
        self._out: MqttLink | None = None
        self._publisher: GlobalPublisher | None = None
        # Update chunks and control events. Bounded in chunks (the broker's window) and bytes
        # whether or not the broker keeps its window: a full inbox stops paho's thread
        # reading, and the broker holds the rest.
        self._events = self._new_inbox()
        self._stop_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._previous_global: dict[str, Any] | None = None
        self._previous_global_loaded = False
        self._state_dirty = True
        self._unpublished_version: int | None = None
        self._next_publish_attempt = 0.0
        self._last_progress = 0.0
        self._last_worker_poll = 0.0
        self._last_presence_flush = 0.0
        self._last_full_online_check = 0.0
        self._told_workers_missing = False

    # ================================================================== public API
    @property
    def address(self) -> BrokerAddress:
        """The broker the hub uses (with login and TLS settings)."""
        return self.config.broker_address()

    @property
    def broker_url(self) -> str:
        """The broker's URL without credentials, as clients should be told."""
        return self.address.url()

    @property
    def round_number(self) -> int:
        """The round being collected, the next one to open, or the last one when done."""
        return self._lifecycle.round_number

    @property
    def phase(self) -> LifecyclePhase:
        return self._lifecycle.phase

    def start(self, connect_timeout: float = 15.0) -> HubService:
        """Open the state, start the embedded broker if any, connect, resume, and start serving."""
        if self._started:
            return self
        self.console.event(f"hub for federation {self.config.federation!r} (strategy {self.strategy.name}), "
                           f"state in {self.config.state_dir}")  # fmt: skip
        if self.config.state_dir.exists() and not self.config.state_dir.is_dir():
            raise HubConfigError(f"the state directory {str(self.config.state_dir)!r} is a file; pass --state-dir "
                                 "a directory (it is created if missing)")  # fmt: skip
        self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = HubStore.in_state_dir(self.config.state_dir, secrets_key_file=self.config.secrets_key_file)
        try:
            self._open_state(self.store)
            if self.config.uses_embedded_broker:
                self.broker = EmbeddedBroker(self.config.embedded_host, self.config.embedded_port).start()
            protocol = "3.1.1" if self.config.uses_embedded_broker else self.config.mqtt_protocol
            self._events = self._new_inbox()  # open again after a stop
            offline = self._hub_state(status=Presence.OFFLINE)
            self._link = MqttLink(self.address, f"fedvlm-hub-{self.config.federation}", protocol=protocol,
                                  will=Will(self.topics.hub_state(), offline.to_json()),
                                  receive_maximum=self.config.inflight_window)  # fmt: skip
            # Handlers before the connection: a resumed persistent session delivers what
            # the broker kept for the hub right after CONNACK, before any SUBSCRIBE.
            self._link.on_reconnect.append(lambda: self._events.put(("reconnected",)))
            self._link.subscribe(self.topics.client_announcements_filter(), self._receive_announcement)
            if not self.config.workers:  # else the workers take them (shared subscription)
                self._link.subscribe(self.topics.updates_filter(), self._receive_update_chunk, manual_ack=True)
            self._link.connect(connect_timeout)
            self._out = self._connect_publisher(connect_timeout)
        except BaseException:
            self._release()
            raise
        self._publisher = GlobalPublisher(self._out, self.topics)
        self.console.event(f"connected to {'the embedded broker at ' if self.broker else ''}{self.broker_url} "
                           f"(MQTT {self._link.protocol}); {len(self.store.active_client_ids())} client(s) "
                           f"registered, rounds need {self._policy.clients_needed()} online")  # fmt: skip
        if not self.store.active_client_ids():
            self.console.event(f"no clients registered yet: register each device with `fedvlm-hub clients add NAME "
                               f"--state-dir {self.config.state_dir}` (the hub picks them up while running)")
        self._started = True
        self._events.put(("republish",))
        self._thread = threading.Thread(target=self._run, name=f"fedvlm-hub-{self.config.federation}", daemon=True)
        self._thread.start()
        return self

    def serve(self) -> None:
        """Start if needed and run until the rounds are done or ``request_stop``; then stop.

        With the embedded broker the hub lingers after the last round (up to
        ``done_linger_s``, or until every client has gone offline), because stopping the
        hub stops the broker that holds the last global version.
        """
        self.start()
        try:
            while not self._stop_requested.is_set() and not self.finished.wait(0.2):
                pass
            if self.finished.is_set() and self.broker is not None and not self._stop_requested.is_set():
                linger_until = time.monotonic() + self.config.done_linger_s
                while (time.monotonic() < linger_until and self._presence is not None
                       and self._presence.online_count() and not self._stop_requested.wait(0.2)):  # fmt: skip
                    pass
        finally:
            self.stop()

    def request_stop(self) -> None:
        """Ask ``serve`` to return (safe from a signal handler)."""
        self._stop_requested.set()

    def wait_finished(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: publish the offline state, disconnect, stop the embedded broker."""
        self._stop_requested.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._started and self._link is not None:
            # Nobody takes chunks any more, and closing delivers the acks still waiting, whose
            # PUBACKs paho's thread must be free to read.
            self._events.close()
            self._close_publisher()  # its last acks and states first: the final state must come after them
            final = self._hub_state(status=Presence.OFFLINE)
            self._link.close(final=(self.topics.hub_state(), final.to_json()))
            self._remember_state(final)
            self.console.event("hub stopped")
        self._started = False
        self._release()

    def _connect_publisher(self, timeout: float) -> MqttLink:
        """The hub's second connection, for what it publishes; the first one if there is none.

        On its own account where the broker has logins (``broker_config.publisher_address``:
        derived from the hub's, written by ``fedvlm-hub broker-config``), because a broker that
        makes the username the client id would let two connections of one account knock each
        other off. A broker that refuses it (set up before the publisher account existed) gets
        everything on the one connection, as before, and the console says how to change that.
        """
        assert self._link is not None
        if self.config.uses_embedded_broker:
            return self._link  # a loopback broker for small federations: one connection does
        if self.address.username and not self.address.password:
            # The publisher's password is derived from the hub's: from an empty one anybody
            # could derive it, so broker-config never makes that account.
            return self._link
        address = publisher_address(self.address)
        # No session to keep: it subscribes to nothing, and paho re-sends its unconfirmed
        # messages. The same last will as the first connection: the hub's state goes out on
        # this one, so only its own will comes after its last state if the hub dies.
        offline = self._hub_state(status=Presence.OFFLINE)
        link = MqttLink(address, f"fedvlm-hub-{self.config.federation}-publisher",
                        protocol=self._link.protocol or "auto", persistent_session=False,
                        will=Will(self.topics.hub_state(), offline.to_json()))  # fmt: skip
        # Back after a drop (its will said offline meanwhile): the state, global and acks again.
        link.on_reconnect.append(lambda: self._events.put(("reconnected",)))
        try:
            link.connect(timeout)
        except BrokerUnavailable as error:
            self.console.event(f"publishing on the hub's one connection: a second one for the hub's own publishes "
                               f"could not connect ({error}). Under load acks then wait behind the updates; to give "
                               f"them their own, run `fedvlm-hub broker-config` again and reload the broker (it adds "
                               f"the account {address.username or 'of the hub publisher'})")  # fmt: skip
            return self._link
        return link

    def _close_publisher(self) -> None:
        """Deliver what waits on the second connection, then close it."""
        out, self._out = self._out, None
        if out is not None and out is not self._link:
            out.close()

    def _new_inbox(self) -> IntakeQueue:
        return IntakeQueue(max_chunks=self.config.inflight_window, max_bytes=INBOX_BYTES)

    def __enter__(self) -> HubService:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ================================================================== startup and resume
    def _open_state(self, store: HubStore) -> None:
        store.bind_federation(self.config.federation, self.strategy.name, self._rules.lora_config_hash)
        pinned, configured = store.get_meta(PIN_BASE_FINGERPRINT), self.config.base_fingerprint
        if configured is not None and pinned is not None and configured != pinned:
            raise StateDirMismatch(f"the federation in {self.config.state_dir} is pinned to base model {pinned}, "
                                   f"not the configured {configured}; use another --state-dir for a new federation")
        if configured is not None and pinned is None:
            store.set_meta({PIN_BASE_FINGERPRINT: configured})
        # Workers judge updates by these settings (fedvlm-hub worker), and record their
        # subscriptions again for this run before a round opens.
        begin_coordinator_run(store)
        store.set_meta({SETTINGS_META_KEY: federation_settings(self.config)})
        store.reset_presence()
        self._presence = PresenceTracker(store, self._clock)
        self._intake = UpdateIntake(
            rules=self._rules, scaling=self.config.lora.scaling, round_timeout_s=self.config.round_timeout_s,
            store=store, files=self._files, lifecycle=lambda: self._lifecycle, send_ack=self._send_ack,
            console=self.console, clock=self._clock, on_accepted=lambda _: self._report_progress(),
            on_pinned=lambda _: self._mark_state_dirty(), keep_updates=self.config.keep_updates,
            commit_batch=self.config.commit_batch, max_held_chunks=max(1, self.config.inflight_window // 2),
            reassembly_slots=self.config.reassembly_slots,
        )  # fmt: skip
        self._intake.pins = FederationPins.from_meta({key: store.get_meta(key)
                                                      for key in (PIN_BASE_FINGERPRINT, PIN_TENSOR_SPEC)})
        self._resume_rounds(store, self._intake)
        latest = store.latest_global()
        if latest is not None and not latest.published:
            self._unpublished_version = latest.version

    def _resume_rounds(self, store: HubStore, intake: UpdateIntake) -> None:
        latest = store.latest_round()
        completed = store.completed_rounds()
        if latest is None or latest.outcome == "aggregated":
            self._lifecycle = RoundLifecycle(self._policy, completed_rounds=completed)
            return
        if self.config.workers:
            # The workers hold the round's sums; a seal from before the restart is lifted
            # so they commit to it again until it is aggregated.
            answered = store.answered_clients(latest.round)
            store.unseal_round(latest.round)
        else:
            answered = intake.rebuild_aggregate(latest.round)
        if not latest.is_open:  # the last attempt missed its quorum: the next one waits for clients
            self._lifecycle = RoundLifecycle(self._policy, completed_rounds=completed, next_attempt=latest.attempt + 1,
                                             carried=answered)  # fmt: skip
            self.console.event(f"resumed: round {latest.round} waits for attempt {latest.attempt + 1}, keeping "
                               f"{len(answered)} accepted update(s)")  # fmt: skip
            return
        now, deadline = self._clock(), latest.deadline
        if deadline <= now:
            # Clients could not reach a dead hub: give the round a fresh deadline.
            deadline = now + self._policy.round_timeout_s
            store.extend_deadline(latest.round, latest.attempt, deadline)
        current = OpenRound(number=latest.round, attempt=latest.attempt, selected=latest.selected,
                            quorum=latest.quorum, opened_at=latest.opened_at, deadline=deadline,
                            answered=answered & set(latest.selected))  # fmt: skip
        self._lifecycle = RoundLifecycle(self._policy, completed_rounds=completed, current=current)
        self.console.event(f"resumed round {latest.round} (attempt {latest.attempt}) with {len(answered)} accepted "
                           f"update(s): {_listed(answered) or 'none'}")  # fmt: skip

    def _republish(self) -> None:
        """After (re)connecting: the latest global version, the state, and acks that may have been lost."""
        store = self._require_store()
        latest = store.latest_global()
        if latest is not None:
            self._publish_global(latest)
        self._publish_state()
        current, out = self._lifecycle.current, self._out
        if current is not None and out is not None:
            acks = ((self.topics.client_ack(receipt.client_id),
                     Ack.accept(receipt.client_id, receipt.round, bytes.fromhex(receipt.message_id)).to_json())
                    for receipt in store.receipts(current.number))  # fmt: skip
            try:
                out.publish_stream(acks, qos=1)
            except BrokerUnavailable as error:
                log.warning("could not acknowledge round %d's receipts again (%s)", current.number, error)
            # Retained already, unless the broker lost its retained messages: cheap to repeat.
            self._publish_selections(current)

    def _release(self) -> None:
        self._events.close()  # paho's thread may wait for room that nobody will make any more
        self._close_publisher()
        if self._link is not None:
            self._link.close()
            self._link = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self.store is not None:
            self.store.reset_presence()
            self.store.close()
            self.store = None

    def _require_store(self) -> HubStore:
        if self.store is None:
            raise RuntimeError("the hub is not started")
        return self.store

    def _require_intake(self) -> UpdateIntake:
        if self._intake is None:
            raise RuntimeError("the hub is not started")
        return self._intake

    # ================================================================== the hub thread
    def _receive_announcement(self, topic: str, payload: bytes, retained: bool) -> None:
        """paho's thread: into the presence inbox (the latest per client), O(1)."""
        try:
            client_id = self.topics.parse(topic).client_id
        except ProtocolError as error:
            log.warning("ignoring an announcement on %s: %s", topic, error)
            return
        if client_id is not None and self._presence is not None:
            self._presence.receive(client_id, payload)

    def _receive_update_chunk(self, topic: str, payload: bytes, retained: bool, ack: Callable[[], None]) -> None:
        """paho's thread: into the bounded inbox (waits for room), acknowledged by the intake once judged."""
        self._events.put(("update", topic, payload, ack), size=len(payload))

    def _run(self) -> None:
        serve_events(self._events, self._stop_requested, handle=self._dispatch,
                     commit=lambda: self._require_intake().flush(),
                     commit_due=lambda: self._require_intake().commit_due(), tick=lambda _: self._tick(), tick_s=_TICK_S,
                     owner="hub")  # fmt: skip

    def _dispatch(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "update":
            self._on_update_chunk(event[1], event[2], event[3])
        elif kind in ("reconnected", "republish"):
            self._republish()

    def _tick(self) -> None:
        now = self._clock()
        self._on_announcements()
        if time.monotonic() - self._last_presence_flush >= _PRESENCE_FLUSH_S and self._presence is not None:
            self._last_presence_flush = time.monotonic()
            self._presence.flush()
        self._require_intake().drain_expired()
        if self._unpublished_version is not None and time.monotonic() >= self._next_publish_attempt:
            record = self._require_store().global_version(self._unpublished_version)
            if record is not None:
                self._publish_global(record)
        lifecycle = self._lifecycle
        if lifecycle.phase is LifecyclePhase.WAITING:
            opened = self._try_open(lifecycle, now)
            if opened is not None:
                self._on_round_opened(opened)
        elif lifecycle.phase is LifecyclePhase.COLLECTING:
            if self.config.workers:
                self._take_worker_answers(lifecycle)
            outcome = lifecycle.outcome(now)
            if outcome is Outcome.AGGREGATE:
                self._aggregate_and_publish()
            elif outcome is Outcome.RETRY:
                self._retry_round()
            elif time.monotonic() - self._last_progress >= _PROGRESS_EVERY_S:
                self._report_progress()
        elif not self.finished.is_set():
            self.finished.set()
            self._state_dirty = True
            self.console.event(f"all {lifecycle.completed_rounds} round(s) done")
        if self._state_dirty:
            self._publish_state()

    def _on_update_chunk(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        try:
            parsed = self.topics.parse(topic)
        except ProtocolError as error:
            log.warning("ignoring a message on %s: %s", topic, error)
            ack()
            return
        assert parsed.client_id is not None and parsed.message_id is not None
        self._require_intake().on_chunk(parsed.client_id, parsed.message_id, payload, ack)

    def _on_announcements(self) -> None:
        """Apply the announcements that came in since the last tick; a line each for a
        handful, one summary line for a burst (10,000 devices coming online)."""
        if self._presence is None:
            return
        results = self._presence.drain()
        if not results:
            return
        lines: list[str] = []
        changed = 0
        for client_id, change in results:
            if isinstance(change, ProtocolError):
                log.warning("ignoring an announcement of %s: %s", client_id, change)
            elif not change.registered:
                if change.first_seen:
                    lines.append(f"unregistered client {client_id!r} announced itself; register it with "
                                 f"`fedvlm-hub clients add {client_id}`")  # fmt: skip
            elif change.changed:
                changed += 1
                lines.append(f"client {client_id} {change.presence.value}")
        if len(lines) <= _ANNOUNCEMENT_LINES:
            for line in lines:
                self.console.event(line)
        else:
            self.console.event(f"{len(results)} announcement(s), {changed} presence change(s): "
                               f"{self._presence.online_count()} registered client(s) online")  # fmt: skip
        if changed and self._lifecycle.phase is LifecyclePhase.WAITING:
            online = self._presence.online_count()
            if online + len(self._lifecycle.carried) < self._policy.clients_needed():
                self.console.event(f"waiting for clients: {online} of {self._policy.clients_needed()} needed "
                                   "are online")  # fmt: skip

    def _try_open(self, lifecycle: RoundLifecycle, now: float) -> OpenRound | None:
        """Open the next attempt if enough registered clients are online. The O(1) counts
        decide whether to look; the exact online set (a registry read) at most every
        ``_FULL_ONLINE_CHECK_S``."""
        presence = self._presence
        if presence is None:
            return None
        needed = self._policy.clients_needed() - len(lifecycle.carried)
        if presence.online_count() < needed and presence.announced_online_count() < needed:
            return None
        if time.monotonic() - self._last_full_online_check < _FULL_ONLINE_CHECK_S:
            return None
        self._last_full_online_check = time.monotonic()
        if self.config.workers and not self._workers_subscribed():
            return None  # devices would send into a subscription that does not exist yet
        return lifecycle.try_open(presence.online(), now)

    def _workers_subscribed(self) -> bool:
        missing = unsubscribed_workers(self._require_store(), self.config.workers)
        if missing and not self._told_workers_missing:
            self._told_workers_missing = True
            self.console.event(f"waiting for hub worker(s) {', '.join(map(str, missing))} to subscribe before a round "
                               f"opens (`fedvlm-hub worker --index I --workers {self.config.workers}`)")  # fmt: skip
        return not missing

    # ================================================================== rounds
    def _on_round_opened(self, opened: OpenRound) -> None:
        self._require_store().open_round(RoundRecord(round=opened.number, attempt=opened.attempt,
                                                     selected=opened.selected, quorum=opened.quorum,
                                                     deadline=opened.deadline, opened_at=opened.opened_at))  # fmt: skip
        retry = f" (attempt {opened.attempt})" if opened.attempt > 1 else ""
        self.console.event(f"round {opened.number}{retry} opened: {len(opened.selected)} client(s) selected "
                           f"({_listed(opened.selected)}), quorum {opened.quorum}, deadline "
                           f"{time.strftime('%H:%M:%S', time.localtime(opened.deadline))}")  # fmt: skip
        self._publish_selections(opened)
        self._state_dirty = True
        self._report_progress()

    def _publish_selections(self, opened: OpenRound) -> None:
        """Tell each selected client that has not answered yet, with its own retained message.

        Streamed through the link's publish window: each Selection is made when the broker
        has confirmed enough of those before it, so a round of 10,000 costs a generator, not
        10,000 messages waiting in paho. Made on whichever thread has room (paho's, mostly):
        it reads only ``opened``'s fixed fields, and ``answered`` for membership.
        """
        out = self._out  # read once: stop() may clear it from another thread
        if out is None:
            return

        def selections():
            for client_id in opened.selected:
                if self._lifecycle.current is not opened:
                    return  # a later attempt (or none) replaced it: its own selections follow
                if client_id in opened.answered:
                    continue
                selection = Selection(federation=self.config.federation, client_id=client_id, round=opened.number,
                                      attempt=opened.attempt, deadline=opened.deadline)  # fmt: skip
                yield self.topics.client_selection(client_id), selection.to_json()

        try:
            out.publish_stream(selections(), qos=1, retain=True)
        except BrokerUnavailable as error:
            log.warning("could not publish the selections of round %d (%s); they go out on reconnect",
                        opened.number, error)  # fmt: skip

    def _retry_round(self) -> None:
        self._require_intake().flush()
        failed = self._lifecycle.retry()
        self._require_store().close_round_for_retry(failed.number, failed.attempt, self._clock())
        self.console.event(f"round {failed.number} missed its quorum at the deadline ({len(failed.answered)} of "
                           f"{failed.quorum} needed); retrying with a new attempt")  # fmt: skip
        self._state_dirty = True

    def _report_progress(self) -> None:
        current = self._lifecycle.current
        if current is None:
            return
        self._last_progress = time.monotonic()
        self.console.progress(current.number, current.attempt, len(current.answered), len(current.selected),
                              current.quorum, current.seconds_left(self._clock()))  # fmt: skip

    def _take_worker_answers(self, lifecycle: RoundLifecycle) -> None:
        """With workers: the round's answers are the receipts they committed."""
        current = lifecycle.current
        if current is None or time.monotonic() - self._last_worker_poll < _WORKER_POLL_S:
            return
        self._last_worker_poll = time.monotonic()
        before = len(current.answered)
        current.answered.update(client for client in self._require_store().answered_clients(current.number)
                                if current.is_selected(client))  # fmt: skip
        if len(current.answered) != before:
            self._report_progress()

    def _aggregate_and_publish(self) -> None:
        store, intake = self._require_store(), self._require_intake()
        intake.flush()  # every accepted update committed, and in the running sum, first
        if self._lifecycle.outcome(self._clock()) is not Outcome.AGGREGATE:
            return  # the commit failed and took answers back: keep collecting
        current = self._lifecycle.current
        assert current is not None
        self._publish_state(phase=RoundPhase.AGGREGATING)
        self._checkpoint("aggregating")
        latest = store.latest_global()
        version = (latest.version if latest is not None else 0) + 1
        aggregator = intake.aggregator
        if self.config.workers:
            # Sealed and read in one transaction: the partials hold exactly the round's receipts.
            aggregator = merge_worker_partials(self._rules.strategy, store, current.number, self._clock())
            current.answered.update(store.answered_clients(current.number))
        tensors = aggregator.result(self._load_previous_global())
        payload = global_payload(tensors, federation=self.config.federation, version=version,
                                 round_number=current.number, strategy=self.strategy.name)  # fmt: skip
        digest = tensor_codec.sha256_hex(payload)
        path = self._files.write_global(version, payload)
        now = self._clock()
        manifest = GlobalManifest(
            federation=self.config.federation, version=version, round=current.number, strategy=self.strategy.name,
            payload_sha256=digest, total_size=len(payload),
            chunk_count=expected_chunk_count(len(payload), self.config.chunk_size), chunk_size=self.config.chunk_size,
            base_fingerprint=intake.pins.base_fingerprint or "unpinned",
            lora_config_hash=self._rules.lora_config_hash, created_at=now,
        )  # fmt: skip
        record = GlobalVersionRecord(version=version, round=current.number, sha256=digest, file_path=str(path),
                                     total_size=len(payload), chunk_count=manifest.chunk_count,
                                     chunk_size=manifest.chunk_size, manifest=manifest.to_json().decode("utf-8"),
                                     created_at=now, published=False)  # fmt: skip
        if isinstance(aggregator, NormBoundedAggregator):
            # Before the version is committed, so a hub killed in between never leaves the
            # next round without a bound. Harmless if the round is aggregated again after a
            # restart: a round's bound comes only from the rounds before it, and recording
            # the same round again replaces its median.
            self._norm_history.record(current.number, aggregator.norms)
            if aggregator.clipped:
                self.console.event(f"round {current.number}: {aggregator.clipped} update(s) clipped to the update "
                                   f"norm bound")  # fmt: skip
        store.add_global_version(record, closes_attempt=current.attempt, now=now)
        if self.config.workers:
            store.drop_worker_partials(current.number)
        samples = store.round_sample_total(current.number)
        self._lifecycle.complete()
        intake.start_new_aggregate()
        self._previous_global, self._previous_global_loaded = tensors, True
        self.console.event(f"round {current.number} aggregated: {len(current.answered)} update(s), {samples} samples "
                           f"-> global version {version} ({len(payload)} bytes)")  # fmt: skip
        self._unpublished_version = version
        self._publish_global(record)
        self._state_dirty = True

    def _collecting_round(self) -> int:
        """The round updates are being collected for (the one after the last aggregated round).

        The open round's number while one is open (asked for every update the norm bound
        takes in: no database read); read back only while none is, e.g. while resuming."""
        if self._lifecycle.current is not None:
            return self._lifecycle.current.number
        latest = self._require_store().latest_round_outcome()
        if latest is None:
            return 1
        round_number, outcome = latest
        return round_number + 1 if outcome == "aggregated" else round_number

    def _load_previous_global(self) -> dict[str, Any] | None:
        """The latest global version's tensors (FedEx folds its base deltas forward)."""
        if not self._previous_global_loaded:
            latest = self._require_store().latest_global()
            if latest is not None:
                self._previous_global, _ = tensor_codec.decode(self._files.read(latest.file_path))
            self._previous_global_loaded = True
        return self._previous_global

    def _publish_global(self, record: GlobalVersionRecord) -> None:
        """Publish a stored version byte for byte, then clear the one before it."""
        assert self._publisher is not None
        store = self._require_store()
        try:
            # The broker's confirmations are awaited here. On the one connection paho's thread
            # must be free to read them, so meanwhile the inbox takes every chunk without
            # waiting for room; the publisher connection reads its own, and the inbox stays
            # bounded (a publisher reconnecting after the first must not let chunks pile up).
            one_connection = self._out is self._link
            with self._events.unbounded() if one_connection else contextlib.nullcontext():
                if not record.published:
                    self._publish_state(phase=RoundPhase.PUBLISHING)
                self._publisher.publish(self._files.read(record.file_path), GlobalManifest.from_json(record.manifest))
                if not record.published:
                    self._checkpoint("publishing")
                    store.mark_published(record.version)
                    self.console.event(f"published global version {record.version} ({record.chunk_count} chunk(s))")
                previous = store.global_version(record.version - 1)
                if previous is not None:
                    self._publisher.clear(previous.version, previous.chunk_count)
        except BrokerUnavailable as error:
            log.warning("could not publish global version %d (%s); retrying", record.version, error)
            self._next_publish_attempt = time.monotonic() + _RETRY_PUBLISH_AFTER_S
            return
        if self._unpublished_version == record.version:
            self._unpublished_version = None
        self._state_dirty = True

    # ================================================================== state and acks
    def _round_config(self) -> dict[str, Any]:
        pins = self._intake.pins if self._intake is not None else FederationPins()
        config: dict[str, Any] = {
            "strategy": self.strategy.name,
            "strategy_options": self.strategy.options(),
            "lora": self.config.lora.to_dict(),
            "lora_config_hash": self._rules.lora_config_hash,
            "base_fingerprint": pins.base_fingerprint,
            "round_timeout_s": self.config.round_timeout_s,
        }
        config["objective"] = self.config.objective
        if self.config.objective == "dpo":
            config["dpo_beta"] = self.config.dpo_beta
        if self.config.local_steps is not None:
            config["local_steps"] = self.config.local_steps
        if self.config.learning_rate is not None:
            config["learning_rate"] = self.config.learning_rate
        current = self._lifecycle.current
        if current is not None:
            config["attempt"] = current.attempt
            config["quorum"] = current.quorum
        return config

    def _hub_state(self, *, status: Presence = Presence.ONLINE, phase: RoundPhase | None = None) -> HubState:
        lifecycle = self._lifecycle
        current = lifecycle.current
        phase = phase or _PHASES[lifecycle.phase]
        collecting = phase is RoundPhase.COLLECTING and current is not None
        return HubState(federation=self.config.federation, status=status, round=lifecycle.round_number, phase=phase,
                        global_version=self._latest_published_version(),
                        selected_count=len(current.selected) if collecting else 0,
                        deadline=current.deadline if collecting else None,
                        round_config=self._round_config())  # fmt: skip

    def _latest_published_version(self) -> int:
        latest = self.store.latest_global() if self.store is not None else None
        if latest is None:
            return 0
        return latest.version if latest.published else latest.version - 1

    def _mark_state_dirty(self) -> None:
        self._state_dirty = True

    def _checkpoint(self, point: str) -> None:
        if self._on_checkpoint is not None:
            self._on_checkpoint(point)

    def _publish_state(self, phase: RoundPhase | None = None) -> None:
        """Publish the retained state; ``phase`` overrides it for a transient phase."""
        out = self._out  # read once: stop() may clear it from another thread
        if out is None:
            return
        state = self._hub_state(phase=phase)
        try:
            # Pipelined: paho keeps it (QoS 1) and sends it again after a reconnect.
            out.publish_nowait(self.topics.hub_state(), state.to_json(), qos=1, retain=True)
        except BrokerUnavailable as error:
            log.warning("could not publish the hub state (%s); will retry", error)
            self._state_dirty = True
            return
        self._remember_state(state)
        if phase is None:
            self._state_dirty = False

    def _remember_state(self, state: HubState) -> None:
        """Keep the last published state in SQLite, for ``fedvlm-hub status``."""
        if self.store is None:
            return
        self.store.set_meta({"hub_state": state.to_json().decode("utf-8"), "hub_pid": str(os.getpid()),
                             "hub_host": socket.gethostname(), "hub_state_at": repr(self._clock())})  # fmt: skip

    def _send_ack(self, ack: Ack) -> None:
        out = self._out  # read once: stop() may clear it from another thread
        if out is None:
            return
        try:
            out.publish_nowait(self.topics.client_ack(ack.client_id), ack.to_json(), qos=1, retain=False)
        except BrokerUnavailable as error:
            # The verdict stands either way; a client without an ack re-sends and is answered then.
            log.warning("could not acknowledge %s's message %s: %s", ack.client_id, ack.message_id, error)


def _listed(client_ids) -> str:
    """A few client ids for a console line, and how many more."""
    ids = sorted(client_ids)
    shown = ", ".join(ids[:_LISTED_CLIENTS])
    return shown + (f" and {len(ids) - _LISTED_CLIENTS} more" if len(ids) > _LISTED_CLIENTS else "")
