"""Update intake: chunks in, one verdict per update out, accepted updates made durable.

An update travels: chunks → ``Reassembler`` (bounded, keyed by sender and message id)
→ ``open_envelope`` (the HMAC is checked before anything inside is read) → addressing,
receipt, round and compatibility checks → tensors decoded and checked against the pinned
layout → added to the round's streaming aggregator → batched → group commit (``flush``:
the batch's receipts and the round's running sum in one SQLite transaction) → ``Ack``
accepted. Every refusal is counted, logged and acked with its reason; an unexpected
exception becomes a ``hub_error`` ack and the intake keeps going.

Nothing is acknowledged before it is safe. Each chunk arrives with ``broker_ack``, the
MQTT acknowledgement the hub owes the broker; it is called only once the chunk's update
is committed or refused (or the chunk is a duplicate, or ignored). A hub killed at any
moment leaves every update it had not committed with the broker, which delivers it
again to the next session. The broker's in-flight window is the back-pressure: the hub
holds at most that many chunks. So that chunks of incomplete updates can never fill the
window (nothing could complete), the intake holds at most ``max_held_chunks`` of them
and acknowledges the oldest early beyond that (such an update then relies on its
device's re-send, as before manual acknowledgements).

A new update refused because reassembly is full (``overloaded``) is told when to retry
(``Ack.retry_after_s``), and the same message id is admitted when it is sent again.

Key entry points (for hub workers too): ``UpdateIntake.on_chunk(client, message_id,
payload, broker_ack)``, ``flush()`` (group commit; call when ``commit_due()`` has passed),
``drain_expired()``, ``rebuild_aggregate(round)`` (resume), ``aggregator`` (the round's
running sum), ``start_new_aggregate()``.

The intake owns the round's aggregator and the federation's pins; the round lifecycle
(which round is open, who is selected) belongs to the service and is only read here,
except for recording which selected client answered.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping

from fedvlm.shared import tensor_codec
from fedvlm.shared.aggregation import AggregationError
from fedvlm.shared.protocol import (
    MAC_SIZE,
    Ack,
    CompletedMessage,
    ProtocolError,
    Reassembler,
    ReasonCode,
    VerifiedEnvelope,
    open_envelope,
    parse_chunk_header,
)
from fedvlm.shared.protocol.reassembly import DEFAULT_MAX_PENDING_BYTES, DEFAULT_MAX_PENDING_MESSAGES, DEFAULT_TIMEOUT_S
from fedvlm.shared.strategies import Aggregator

from .checkpoints import CheckpointStore
from .console import Console
from .partial_sums import decode_aggregate, encode_aggregate
from .rounds import LifecyclePhase, OpenRound, RoundLifecycle
from .store import ClientStanding, HubStore, Receipt, RejectionRecord
from .updates import (
    FederationPins,
    LayoutVerdicts,
    UpdateRejected,
    UpdateRules,
    check_addressing,
    check_compatibility,
    decode_update,
)

__all__ = ["UpdateIntake"]

log = logging.getLogger(__name__)

# Verdicts on completed updates remembered for answering a re-sent message id, which the
# reassembler ignores (it has already completed that message).
# Why 1,024 and not more is safe: forgetting a verdict never changes an answer. A re-sent
# accepted update whose verdict was forgotten is reassembled and verified again and then
# answered from its committed receipt (``_admit``); a forgotten refusal is judged afresh by the
# same rules. Only the cost of a late re-send grows, and re-sends come soon after the
# first copy (the broker's redelivery, a device that lost its ack), within ~1,000 updates at
# this hub's speed. Each entry is ~0.3 KB: 4,096 of them held ~1 MiB at 10,000 devices.
_RECENT_ACKS_KEPT = 1024
# The group commit's bounded delay: a batch is committed once it holds ``commit_batch``
# updates or its oldest update has waited this long, not whenever the inbox is empty for
# an instant (which made many transactions, each with its own fsync, one update long).
# Why 100 ms and not a few: at 10,000 devices on one CPU slot a 10 ms bound made 1,151
# transactions of ~9 updates where the empty-inbox rule made 333 (148 of one update, most
# of the rest full batches of 64, the inbox rarely empty under a backlog); 100 ms lets a
# batch fill to 64 at ~640 updates/s. Nothing is acknowledged before the commit, so the
# delay costs a device at most 100 ms on its ack and the broker's window at most the 64
# updates' chunks a full batch always held, never safety. The round's end does not wait
# for it: the round counts an update when it is judged and commits before aggregating.
# A lone update does not wait for it either: the event loop commits once the inbox has been
# quiet for 5 ms (``serve_events``).
COMMIT_DELAY_S = 0.1
# Verdicts that say "not now" rather than "not this update": they hold only while the round
# stays where it was, so the same message sent again after the round moved on (it opened,
# reopened, or the next one started) is judged afresh instead of answered from memory.
_TIMING_REASONS = frozenset({ReasonCode.LATE, ReasonCode.WRONG_ROUND, ReasonCode.NOT_SELECTED,
                             ReasonCode.HUB_ERROR})
_MAX_REASON_TEXT = 2000
# Retry hints for updates refused for load: at least this long, at most that long.
_MIN_RETRY_AFTER_S = 0.25
_MAX_RETRY_AFTER_S = 30.0
_OVERLOAD_WINDOW_S = 5.0

BrokerAck = Callable[[], None]


def _no_ack() -> None:
    pass


@dataclasses.dataclass
class _Accepted:
    """An accepted update waiting for the group commit."""

    receipt: Receipt
    ack: Ack
    pins: dict[str, str]
    broker_acks: list[BrokerAck]


class UpdateIntake:
    """Judges every update of one federation and acknowledges it through ``send_ack``."""

    def __init__(self, *, rules: UpdateRules, scaling: float, round_timeout_s: float, store: HubStore,
                 files: CheckpointStore, lifecycle: Callable[[], RoundLifecycle], send_ack: Callable[[Ack], None],
                 console: Console, clock: Callable[[], float], on_accepted: Callable[[OpenRound], None],
                 on_pinned: Callable[[FederationPins], None], keep_updates: bool = False, commit_batch: int = 64,
                 commit_delay_s: float = COMMIT_DELAY_S, max_held_chunks: int = 512, quiet_accepts_after: int = 20,
                 reassembly_slots: int = DEFAULT_MAX_PENDING_MESSAGES) -> None:  # fmt: skip
        self.rules = rules
        self.scaling = scaling
        self.store = store
        self.files = files
        self._lifecycle = lifecycle
        self._send_ack = send_ack
        self.console = console
        self._clock = clock
        self._on_accepted = on_accepted
        self._on_pinned = on_pinned
        self.pins = FederationPins()
        self._layouts = LayoutVerdicts()
        self.keep_updates = keep_updates
        self.commit_batch = commit_batch
        self.commit_delay_s = commit_delay_s
        self.max_held_chunks = max_held_chunks
        # Beyond this many accepted updates per round, one progress line replaces a line each.
        self.quiet_accepts_after = quiet_accepts_after
        self.aggregator: Aggregator = rules.strategy.new_aggregator(scaling)
        # Accepted updates not committed yet, in order, and by (round, client) for duplicates.
        self._batch: list[_Accepted] = []
        self._batched: dict[tuple[int, str], _Accepted] = {}
        self._batch_round: int | None = None
        self._batch_since = 0.0  # time.monotonic() when the batch's oldest update joined it
        # Broker acks of chunks whose update is being reassembled, oldest update first.
        self._held: collections.OrderedDict[tuple[str, bytes], list[BrokerAck]] = collections.OrderedDict()
        self._held_count = 0
        self.early_acks = 0  # chunks acknowledged before their update was judged (window valve)
        self._overloads: collections.deque[float] = collections.deque()
        # When each update in reassembly began, and a running mean of how long one takes:
        # the retry hint is the time the room needs to take in those refused lately.
        self._started: dict[tuple[str, bytes], float] = {}
        self._mean_reassembly_s = 0.25
        self._reassembler = Reassembler(
            max_message_bytes=rules.max_update_bytes,
            max_pending_messages=reassembly_slots,
            # Room for several senders at their per-sender limit (max_message_bytes each).
            max_pending_bytes=max(DEFAULT_MAX_PENDING_BYTES, 4 * rules.max_update_bytes),
            timeout_s=min(DEFAULT_TIMEOUT_S, round_timeout_s),  # an update must arrive within its round anyway
            # The signed part's SHA-256 comes from the hashing pass made as chunks arrive,
            # so verifying an update costs an HMAC of the digest, not a second pass.
            trailer_size=MAC_SIZE,
        )  # fmt: skip
        # (client, message id) -> (verdict, the round context it holds in; None: for good).
        # An accepted verdict is held as its round number alone (``_remember_verdict``).
        self._recent_acks: collections.OrderedDict[tuple[str, bytes], int | tuple[Ack, tuple | None]] = (
            collections.OrderedDict())
        # At least as many as the reassembler remembers finished messages (it ignores a copy
        # of one, and the copy is answered from here).
        self._recent_acks_kept = max(_RECENT_ACKS_KEPT, self._reassembler.finished_kept)
        # (client, message id, reason) of messages refused chunk by chunk, each answered once.
        self._told_once: collections.OrderedDict[tuple[str, bytes, ReasonCode], None] = collections.OrderedDict()

    # ------------------------------------------------------------------ the round's aggregate
    def start_new_aggregate(self) -> None:
        """A fresh aggregator for the next round."""
        self.aggregator = self.rules.strategy.new_aggregator(self.scaling)

    def rebuild_aggregate(self, round_number: int) -> set[str]:
        """An aggregator holding exactly the round's committed updates; returns their clients.

        From the round's committed running sum when there is one (it is committed with the
        receipts, so it holds exactly them); else, for a round of an older hub, read back
        from the update files. Receipts whose file is unusable are dropped, so those
        clients' re-sends count as new."""
        receipts = self.store.receipts(round_number)
        stored = self.store.round_aggregate(round_number)
        if stored is not None:
            data, count = stored
            try:
                if count != len(receipts):
                    raise ValueError(f"it holds {count} update(s), the round has {len(receipts)} receipt(s)")
                self.aggregator = self.rules.strategy.aggregator_from_state(decode_aggregate(data))
                return {receipt.client_id for receipt in receipts}
            except (ValueError, AggregationError) as error:
                log.error("the stored running sum of round %d is unusable (%s); rebuilding it from update files",
                          round_number, error)  # fmt: skip
        aggregator = self.rules.strategy.new_aggregator(self.scaling)
        answered: set[str] = set()
        for receipt in receipts:
            try:
                if not receipt.file_path:
                    raise ValueError("no update file was kept and the round's running sum is unusable")
                body = self.files.read(receipt.file_path)
                if tensor_codec.sha256_hex(body) != receipt.body_sha256:
                    raise ValueError("its SHA-256 does not match the receipt")
                tensors, _ = tensor_codec.decode(body)
                if self.rules.strategy.shared_factors:
                    aggregator.add(tensors, self.rules.weight_of(receipt.sample_count))
            except (OSError, ValueError) as error:
                log.error("dropping the accepted update of %s in round %d: file %s is unusable (%s)",
                          receipt.client_id, round_number, receipt.file_path, error)  # fmt: skip
                self.store.delete_receipt(round_number, receipt.client_id)
                continue
            answered.add(receipt.client_id)
        self.aggregator = aggregator
        return answered

    # ------------------------------------------------------------------ chunks
    def on_chunk(self, client_id: str, topic_message_id: bytes, payload: bytes,
                 broker_ack: BrokerAck = _no_ack) -> None:  # fmt: skip
        """One chunk from ``updates/<client_id>/<topic_message_id>``; ``broker_ack`` is called
        once the chunk is safe (its update committed or refused, or the chunk not needed)."""
        if not payload:
            broker_ack()
            return
        held = False
        try:
            held = self._on_chunk(client_id, topic_message_id, payload, broker_ack)
        finally:
            if not held:
                broker_ack()

    def _on_chunk(self, client_id: str, topic_message_id: bytes, payload: bytes, broker_ack: BrokerAck) -> bool:
        """Returns True when ``broker_ack`` is now held (the chunk belongs to an update in
        reassembly or waiting for the group commit)."""
        try:
            header = parse_chunk_header(payload, sender=client_id)
        except ProtocolError as error:
            if error.reason is ReasonCode.UNSUPPORTED_VERSION:
                # An older or newer device: every chunk of its message would be refused alike.
                self._reject_once(client_id, topic_message_id, error.reason, str(error))
            else:
                self.reject(client_id, None, topic_message_id, error.reason, str(error))
            return False
        if header.message_id != topic_message_id:
            self.reject(client_id, None, topic_message_id, ReasonCode.MALFORMED,
                        f"chunk header carries message id {header.message_id.hex()}, but it was published on the "
                        f"topic of message {topic_message_id.hex()}; publish each chunk on its own message's topic")
            return False
        key = (client_id, header.message_id)
        earlier = self._recent_acks.get(key)
        if earlier is not None:
            ack, context = (Ack.accept(client_id, earlier, header.message_id), None) if isinstance(earlier, int) \
                else earlier  # fmt: skip
            if context is None or context == self._round_context():
                # A re-send of a message already answered (QoS 1 redelivery, or the client
                # lost the ack): answer again once its last chunk is in; never judge it twice.
                if header.index == header.count - 1:
                    self._send_ack(ack)
                return False
            if header.index != 0:
                return False  # a stray redelivery; a re-send starts from chunk 0
            # Refused as "not now" and the round has moved on since: judge the re-send again.
            del self._recent_acks[key]
            self._reassembler.forget(client_id, header.message_id)
        # One read of the database per chunk (for a one-chunk update, per update): is the
        # client active, its secret, its receipt for the round. Not cached across updates, so
        # a revocation by another process refuses the client's very next update.
        standing = self.store.standing(client_id, self._lifecycle().round_number)
        if standing is None:
            # Nobody the hub knows: refused before reassembly, so strangers take no reassembly
            # room, and told once per message. Not remembered as a verdict: once the client is
            # registered, the same message sent again is reassembled and judged.
            self._reject_once(client_id, header.message_id, ReasonCode.UNKNOWN_CLIENT,
                              f"updates on the topic of {client_id!r}, a client this hub has no secret for; "
                              "register the client with the hub first (or it was revoked)")  # fmt: skip
            return False
        self._told_once.pop((client_id, header.message_id, ReasonCode.UNKNOWN_CLIENT), None)
        receipt = standing.receipt
        if receipt is not None and receipt.message_id == header.message_id.hex() and \
                (not header.states_sha256 or header.sha256.hex() == receipt.payload_sha256):
            # A copy of the update this round already committed for the client (a redelivery
            # after a reconnect, a chunk relayed again, a lost ack) that neither the verdicts
            # above nor the reassembler remember any more: answered from its receipt once its
            # last chunk is in, never reassembled (a partial copy held a reassembly slot until
            # it expired, then drew an "expired" refusal for an accepted update). A chunk that
            # states its message's digest must state the receipt's: other bytes under the same
            # id (a device reusing an id) are judged, and refused as a duplicate.
            if header.index == header.count - 1:
                self._send_ack(Ack.accept(client_id, receipt.round, header.message_id))
            return False
        key = (client_id, header.message_id)
        try:
            completed = self._reassembler.feed(payload, sender=client_id)
        except ProtocolError as error:
            retry_after = self._retry_after() if error.reason is ReasonCode.OVERLOADED else None
            self.reject(client_id, None, error.message_id or topic_message_id, error.reason, str(error),
                        retry_after_s=retry_after)  # fmt: skip
            if not self._reassembler.is_pending(client_id, header.message_id):
                self._release_held(key)  # the message was dropped (one refused chunk leaves it going)
            return False
        if completed is None:
            if not self._reassembler.is_pending(client_id, header.message_id):
                return False  # a duplicate or the rest of a refused message: nothing to keep
            self._hold(key, broker_ack)
            return True
        acks = self._take_held(key) + [broker_ack]
        accepted = self._judge(completed, standing)
        if accepted is not None:
            accepted.broker_acks.extend(acks)
            if len(self._batch) >= self.commit_batch:
                self.flush()
            return True
        for ack in acks[:-1]:
            ack()
        return False

    def _reject_once(self, client_id: str, message_id: bytes, reason: ReasonCode, text: str) -> None:
        """Refuse a message whose every chunk is refused alike: one answer and one record,
        not one per chunk."""
        key = (client_id, message_id, reason)
        if key in self._told_once:
            return
        self._told_once[key] = None
        while len(self._told_once) > _RECENT_ACKS_KEPT:
            self._told_once.popitem(last=False)
        self.reject(client_id, None, message_id, reason, text)

    def drain_expired(self) -> None:
        """Answer updates whose chunks stopped arriving before the reassembly timeout."""
        for dropped in self._reassembler.drain_expired():
            self.reject(dropped.sender, None, dropped.message_id, dropped.reason, dropped.detail)
            self._release_held((dropped.sender, dropped.message_id))

    # ------------------------------------------------------------------ broker acks held
    def _hold(self, key: tuple[str, bytes], broker_ack: BrokerAck) -> None:
        if key not in self._held:
            self._started[key] = time.monotonic()
        self._held.setdefault(key, []).append(broker_ack)
        self._held_count += 1
        # The valve: chunks of incomplete updates must never fill the broker's window.
        while self._held_count > self.max_held_chunks and self._held:
            oldest = next(iter(self._held))
            acks = self._held[oldest]
            acks.pop(0)()
            self._held_count -= 1
            self.early_acks += 1
            if not acks:
                del self._held[oldest]
                self._started.pop(oldest, None)

    def _take_held(self, key: tuple[str, bytes]) -> list[BrokerAck]:
        started = self._started.pop(key, None)
        if started is not None:
            self._mean_reassembly_s += 0.1 * (time.monotonic() - started - self._mean_reassembly_s)
        acks = self._held.pop(key, [])
        self._held_count -= len(acks)
        return acks

    def _release_held(self, key: tuple[str, bytes]) -> None:
        for ack in self._take_held(key):
            ack()

    @property
    def held_chunks(self) -> int:
        """Chunks received and not yet acknowledged to the broker (reassembling or batched)."""
        return self._held_count + sum(len(item.broker_acks) for item in self._batch)

    def _retry_after(self) -> float:
        """How long a device refused for load should wait: about the time the reassembly room
        needs to take in every update refused lately (their count / slots x the mean time one
        update spends in reassembly). Devices add jitter and back off on their side."""
        now = time.monotonic()
        self._overloads.append(now)
        while self._overloads and self._overloads[0] < now - _OVERLOAD_WINDOW_S:
            self._overloads.popleft()
        slots = max(1, self._reassembler.max_pending_messages)
        wait = len(self._overloads) / slots * self._mean_reassembly_s
        return round(min(_MAX_RETRY_AFTER_S, max(_MIN_RETRY_AFTER_S, wait)), 2)

    # ------------------------------------------------------------------ group commit
    @property
    def uncommitted(self) -> int:
        """Accepted updates waiting for the group commit."""
        return len(self._batch)

    def commit_due(self) -> float | None:
        """When the batch must be committed (``time.monotonic()``), or None when it is empty."""
        return self._batch_since + self.commit_delay_s if self._batch else None

    def flush(self) -> int:
        """Commit the accepted updates of the batch (one transaction with the round's running
        sum), then acknowledge them to their devices and to the broker. Returns how many."""
        if not self._batch:
            return 0
        batch, self._batch, self._batched = self._batch, [], {}
        round_number, self._batch_round = self._batch_round, None
        assert round_number is not None
        pins: dict[str, str] = {}
        for item in batch:
            pins.update(item.pins)
        try:
            self.store.commit_accepted(round_number, [item.receipt for item in batch],
                                       encode_aggregate(self.aggregator.to_state()), self.aggregator.count,
                                       self._clock(), pins=pins)  # fmt: skip
        except Exception:
            # Nothing of the batch is durable: the aggregator goes back to what is committed,
            # the devices are told to send again, and the broker acks go out so the window
            # does not stay full (the devices' re-sends bring the updates back).
            log.exception("the hub could not commit %d accepted update(s) of round %d", len(batch), round_number)
            for item in batch:
                if self.keep_updates:
                    self.files.discard_update(round_number, item.receipt.client_id)
            answered = self.rebuild_aggregate(round_number)
            current = self._lifecycle().current
            if current is not None and current.number == round_number:
                current.answered.intersection_update(answered)
            for item in batch:
                message_id = bytes.fromhex(item.receipt.message_id)
                self.reject(item.receipt.client_id, round_number, message_id, ReasonCode.HUB_ERROR,
                            "the hub could not store this update; send it again later")  # fmt: skip
                for ack in item.broker_acks:
                    ack()
            return 0
        if pins:
            self._on_pinned(self.pins)
        for item in batch:
            self._send_ack(item.ack)
            self._remember_verdict(item.receipt.client_id, bytes.fromhex(item.receipt.message_id), item.ack)
            for ack in item.broker_acks:
                ack()
        current = self._lifecycle().current
        if current is not None:
            self._on_accepted(current)
        return len(batch)

    # ------------------------------------------------------------------ verdicts
    def _judge(self, message: CompletedMessage, standing: ClientStanding) -> _Accepted | None:
        """Judge a completed update (``standing``: its sender as read with its last chunk): the
        accepted one, batched for the group commit, or None (refused, or a re-send of a
        committed update; answered already)."""
        client_id, message_id = message.sender, message.message_id
        round_number: int | None = None
        ack: Ack | None
        try:
            def secret_of(signer: str) -> str | None:  # another's only for an envelope signed by another (refused)
                return standing.secret if signer == client_id else self.store.secret_of(signer)

            envelope = open_envelope(message.payload, secret_of, expected_client_id=client_id,
                                     signed_sha256=message.head_sha256)  # fmt: skip
            round_number = envelope.metadata.round
            verdict = self._admit(envelope, message, standing)
            if isinstance(verdict, _Accepted):
                return verdict
            ack = verdict
        except _ResentWhileBatched:
            return None  # its first copy's ack goes out with the group commit
        except (UpdateRejected, ProtocolError) as refusal:
            text = refusal.text if isinstance(refusal, UpdateRejected) else str(refusal)
            ack = self.reject(client_id, round_number, message_id, refusal.reason, text)
        except Exception:
            log.exception("the hub failed on update %s from %s", message_id.hex(), client_id)
            ack = self.reject(client_id, round_number, message_id, ReasonCode.HUB_ERROR,
                              "the hub failed while processing this update; send it again later")
        else:
            self._send_ack(ack)
        if ack is not None:
            self._remember_verdict(client_id, message_id, ack)
        return None

    def _remember_verdict(self, client_id: str, message_id: bytes, ack: Ack) -> None:
        # A message id gets one answer while it holds: a re-send of the same id is answered
        # the same way without being judged again.
        context = self._round_context() if ack.reason_code in _TIMING_REASONS else None
        # An acceptance (nearly every verdict at scale) is kept as its round number and made
        # again when needed: ~0.3 KB less per remembered verdict than the Ack itself.
        accepted = ack.accepted and ack.round is not None and ack.retry_after_s is None
        self._recent_acks[(client_id, message_id)] = ack.round if accepted else (ack, context)
        while len(self._recent_acks) > self._recent_acks_kept:
            self._recent_acks.popitem(last=False)

    def _admit(self, envelope: VerifiedEnvelope, message: CompletedMessage,
               standing: ClientStanding) -> Ack | _Accepted:  # fmt: skip
        """Every check on a verified update, then aggregate and batch it for the group commit.
        Returns the batched update, or the Ack for a re-send of a committed one."""
        metadata = envelope.metadata
        client_id, round_number, message_id = envelope.client_id, metadata.round, message.message_id
        check_addressing(metadata, self.rules)
        batched = self._batched.get((round_number, client_id))
        if batched is not None:
            if batched.receipt.payload_sha256 == message.sha256.hex():
                raise _ResentWhileBatched()
            raise UpdateRejected(ReasonCode.DUPLICATE,
                                 f"the hub already accepted another update from {client_id} for round {round_number} "
                                 f"(message {batched.receipt.message_id}); it takes one update per client per round")
        existing = (standing.receipt if standing.round == round_number
                    else self.store.receipt(round_number, client_id))  # fmt: skip
        if existing is not None:
            if existing.payload_sha256 == message.sha256.hex():
                self.console.event(f"update from {client_id} for round {round_number} re-sent; acknowledged again, "
                                   "counted once")  # fmt: skip
                return Ack.accept(client_id, round_number, message_id)
            raise UpdateRejected(ReasonCode.DUPLICATE,
                                 f"the hub already accepted another update from {client_id} for round {round_number} "
                                 f"(message {existing.message_id}); it takes one update per client per round")
        current = self._open_round_for(client_id, round_number)
        check_compatibility(metadata, self.rules, self.pins)
        decoded = decode_update(envelope, self.rules, self.pins, self._layouts)
        weight = self.rules.weight_of(metadata.sample_count)
        if self._batch_round is not None and self._batch_round != round_number:
            self.flush()  # one round per batch (the running sum belongs to its round)
        path = ""
        if self.keep_updates:  # before the aggregator takes it: a failed write changes nothing
            path = str(self.files.write_update(round_number, client_id, envelope.body))
        if self.rules.strategy.shared_factors:
            try:
                self.aggregator.add(decoded.tensors, weight)  # all or nothing
            except AggregationError as error:
                if path:
                    self.files.discard_update(round_number, client_id)
                raise UpdateRejected(ReasonCode.INVALID_UPDATE, str(error)) from None
        receipt = Receipt(
            round=round_number, client_id=client_id, attempt=current.attempt, message_id=message_id.hex(),
            payload_sha256=message.sha256.hex(),
            # What checks a kept file on resume; with no file there is nothing to check (and a
            # second pass over every update's bytes saved).
            body_sha256=tensor_codec.sha256_hex(envelope.body) if path else "",
            sample_count=metadata.sample_count, file_path=path, accepted_at=self._clock(), metrics=decoded.metrics,
        )  # fmt: skip
        if decoded.new_pins:
            self.pins = self.pins.updated(decoded.new_pins)
            self.console.event(f"federation pinned to base model {self.pins.base_fingerprint} and "
                               f"{len(self.pins.tensor_spec or {})} shared tensor(s) by {client_id}'s update")
        current.record(client_id)
        if len(current.answered) <= self.quiet_accepts_after:
            counted = f", counted as {weight} (the federation's bound)" if weight != metadata.sample_count else ""
            self.console.event(f"update from {client_id} accepted for round {round_number} "
                               f"({metadata.sample_count} samples{counted})")  # fmt: skip
        accepted = _Accepted(receipt, Ack.accept(client_id, round_number, message_id), dict(decoded.new_pins), [])
        if not self._batch:
            self._batch_since = time.monotonic()
        self._batch.append(accepted)
        self._batched[(round_number, client_id)] = accepted
        self._batch_round = round_number
        return accepted

    def _round_context(self) -> tuple:
        """Where the round is: a "not now" verdict stands while this stays the same."""
        lifecycle = self._lifecycle()
        current = lifecycle.current
        return (lifecycle.round_number, lifecycle.phase, current.attempt if current is not None else None)

    def _open_round_for(self, client_id: str, round_number: int) -> OpenRound:
        """The open round this update may join, or the reason it may not."""
        lifecycle = self._lifecycle()
        hub_round = lifecycle.round_number
        if round_number > hub_round:
            raise UpdateRejected(ReasonCode.WRONG_ROUND, f"update is for round {round_number}, which has not "
                                                         f"started; the hub is at round {hub_round}")  # fmt: skip
        if round_number < hub_round or lifecycle.phase is LifecyclePhase.DONE:
            raise UpdateRejected(ReasonCode.WRONG_ROUND, f"update is for round {round_number}, which is closed; the "
                                                         f"hub is at round {hub_round} ({lifecycle.phase.value})")
        current = lifecycle.current
        if current is None and lifecycle.next_attempt > 1:
            raise UpdateRejected(ReasonCode.LATE, f"round {round_number} is not collecting updates right now: its "
                                                  "deadline passed without a quorum and it waits to be retried")
        if current is None:
            raise UpdateRejected(ReasonCode.WRONG_ROUND, f"round {round_number} has not opened yet (the hub waits "
                                                         "for enough clients); wait for the hub state to select you")
        if self._clock() >= current.deadline:
            raise UpdateRejected(ReasonCode.LATE, f"the deadline of round {round_number} has passed")
        if not current.is_selected(client_id):
            raise UpdateRejected(ReasonCode.NOT_SELECTED, f"{client_id} is not among the clients selected for round "
                                                          f"{round_number}; wait for a round that selects it")
        return current

    def reject(self, client_id: str | None, round_number: int | None, message_id: bytes | None,
               reason: ReasonCode, text: str, *, retry_after_s: float | None = None) -> Ack | None:  # fmt: skip
        """Count and log a refusal, and acknowledge it when there is a client to tell."""
        reason = ReasonCode(reason)
        text = text[:_MAX_REASON_TEXT]
        self.store.record_rejection(RejectionRecord(at=self._clock(), client_id=client_id, round=round_number,
                                                    reason=reason.value, detail=text))  # fmt: skip
        where = f" for round {round_number}" if round_number is not None else ""
        self.console.event(f"update from {client_id or 'an unknown sender'}{where} rejected: {reason.value} ({text})")
        if client_id is None:
            return None
        ack = Ack.reject(client_id, round_number, message_id, reason, text, retry_after_s=retry_after_s)
        self._send_ack(ack)
        return ack


class _ResentWhileBatched(Exception):
    """A re-send of an update accepted and not yet committed: it is answered with the batch."""
