"""Update intake: chunks in, one verdict per update out, accepted updates made durable.

An update travels: chunks → ``Reassembler`` (bounded, keyed by sender and message id)
→ ``open_envelope`` (the HMAC is checked before anything inside is read) → addressing,
receipt, round and compatibility checks → tensors decoded and checked against the pinned
layout → added to the round's streaming aggregator → body written and fsynced → receipt
committed → ``Ack`` accepted. Every refusal is counted, logged and acked with its reason;
an unexpected exception becomes a ``hub_error`` ack and the intake keeps going.

The intake owns the round's aggregator and the federation's pins; the round lifecycle
(which round is open, who is selected) belongs to the service and is only read here,
except for recording which selected client answered.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

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
from fedvlm.shared.protocol.reassembly import DEFAULT_MAX_PENDING_BYTES, DEFAULT_TIMEOUT_S
from fedvlm.shared.strategies import Aggregator

from .checkpoints import CheckpointStore
from .console import Console
from .rounds import LifecyclePhase, OpenRound, RoundLifecycle
from .store import HubStore, Receipt, RejectionRecord
from .updates import (
    FederationPins,
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
_RECENT_ACKS_KEPT = 4096
# Verdicts that say "not now" rather than "not this update": they hold only while the round
# stays where it was, so the same message sent again after the round moved on (it opened,
# reopened, or the next one started) is judged afresh instead of answered from memory.
_TIMING_REASONS = frozenset({ReasonCode.LATE, ReasonCode.WRONG_ROUND, ReasonCode.NOT_SELECTED,
                             ReasonCode.HUB_ERROR})
_MAX_REASON_TEXT = 2000


class UpdateIntake:
    """Judges every update of one federation and acknowledges it through ``send_ack``."""

    def __init__(self, *, rules: UpdateRules, scaling: float, round_timeout_s: float, store: HubStore,
                 files: CheckpointStore, lifecycle: Callable[[], RoundLifecycle], send_ack: Callable[[Ack], None],
                 console: Console, clock: Callable[[], float], on_accepted: Callable[[OpenRound], None],
                 on_pinned: Callable[[FederationPins], None]) -> None:  # fmt: skip
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
        self.aggregator: Aggregator = rules.strategy.new_aggregator(scaling)
        self._reassembler = Reassembler(
            max_message_bytes=rules.max_update_bytes,
            # Room for several senders at their per-sender limit (max_message_bytes each).
            max_pending_bytes=max(DEFAULT_MAX_PENDING_BYTES, 4 * rules.max_update_bytes),
            timeout_s=min(DEFAULT_TIMEOUT_S, round_timeout_s),  # an update must arrive within its round anyway
            # The signed part's SHA-256 comes from the hashing pass made as chunks arrive,
            # so verifying an update costs an HMAC of the digest, not a second pass.
            trailer_size=MAC_SIZE,
        )  # fmt: skip
        # (client, message id) -> (verdict, the round context it holds in; None: for good).
        self._recent_acks: collections.OrderedDict[tuple[str, bytes], tuple[Ack, tuple | None]] = (
            collections.OrderedDict())
        # (client, message id, reason) of messages refused chunk by chunk, each answered once.
        self._told_once: collections.OrderedDict[tuple[str, bytes, ReasonCode], None] = collections.OrderedDict()

    # ------------------------------------------------------------------ the round's aggregate
    def start_new_aggregate(self) -> None:
        """A fresh aggregator for the next round."""
        self.aggregator = self.rules.strategy.new_aggregator(self.scaling)

    def rebuild_aggregate(self, round_number: int) -> set[str]:
        """An aggregator holding exactly the round's committed updates (read back from their
        files); returns their clients. Receipts whose file is unusable are dropped, so those
        clients' re-sends count as new."""
        aggregator = self.rules.strategy.new_aggregator(self.scaling)
        answered: set[str] = set()
        for receipt in self.store.receipts(round_number):
            try:
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
    def on_chunk(self, client_id: str, topic_message_id: bytes, payload: bytes) -> None:
        """One chunk from ``updates/<client_id>/<topic_message_id>``."""
        if not payload:
            return
        try:
            header = parse_chunk_header(payload, sender=client_id)
        except ProtocolError as error:
            if error.reason is ReasonCode.UNSUPPORTED_VERSION:
                # An older or newer device: every chunk of its message would be refused alike.
                self._reject_once(client_id, topic_message_id, error.reason, str(error))
            else:
                self.reject(client_id, None, topic_message_id, error.reason, str(error))
            return
        if header.message_id != topic_message_id:
            self.reject(client_id, None, topic_message_id, ReasonCode.MALFORMED,
                        f"chunk header carries message id {header.message_id.hex()}, but it was published on the "
                        f"topic of message {topic_message_id.hex()}; publish each chunk on its own message's topic")
            return
        key = (client_id, header.message_id)
        earlier = self._recent_acks.get(key)
        if earlier is not None:
            ack, context = earlier
            if context is None or context == self._round_context():
                # A re-send of a message already answered (QoS 1 redelivery, or the client
                # lost the ack): answer again once its last chunk is in; never judge it twice.
                if header.index == header.count - 1:
                    self._send_ack(ack)
                return
            if header.index != 0:
                return  # a stray redelivery; a re-send starts from chunk 0
            # Refused as "not now" and the round has moved on since: judge the re-send again.
            del self._recent_acks[key]
            self._reassembler.forget(client_id, header.message_id)
        if not self.store.is_active_client(client_id):
            # Nobody the hub knows: refused before reassembly, so strangers take no reassembly
            # room, and told once per message. Not remembered as a verdict: once the client is
            # registered, the same message sent again is reassembled and judged.
            self._reject_once(client_id, header.message_id, ReasonCode.UNKNOWN_CLIENT,
                              f"updates on the topic of {client_id!r}, a client this hub has no secret for; "
                              "register the client with the hub first (or it was revoked)")  # fmt: skip
            return
        self._told_once.pop((client_id, header.message_id, ReasonCode.UNKNOWN_CLIENT), None)
        try:
            completed = self._reassembler.feed(payload, sender=client_id)
        except ProtocolError as error:
            self.reject(client_id, None, error.message_id or topic_message_id, error.reason, str(error))
            return
        if completed is not None:
            self._judge(completed)

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

    # ------------------------------------------------------------------ verdicts
    def _judge(self, message: CompletedMessage) -> None:
        client_id, message_id = message.sender, message.message_id
        round_number: int | None = None
        ack: Ack | None
        try:
            envelope = open_envelope(message.payload, self.store.secret_of, expected_client_id=client_id,
                                     signed_sha256=message.head_sha256)  # fmt: skip
            round_number = envelope.metadata.round
            ack = self._admit(envelope, message)
        except (UpdateRejected, ProtocolError) as refusal:
            text = refusal.text if isinstance(refusal, UpdateRejected) else str(refusal)
            ack = self.reject(client_id, round_number, message_id, refusal.reason, text)
        except Exception:
            log.exception("the hub failed on update %s from %s", message_id.hex(), client_id)
            ack = self.reject(client_id, round_number, message_id, ReasonCode.HUB_ERROR,
                              "the hub failed while processing this update; send it again later")
        else:
            self._send_ack(ack)
        if ack is None:
            return
        # A message id gets one answer while it holds: a re-send of the same id is answered
        # the same way without being judged again.
        context = self._round_context() if ack.reason_code in _TIMING_REASONS else None
        self._recent_acks[(client_id, message_id)] = (ack, context)
        while len(self._recent_acks) > _RECENT_ACKS_KEPT:
            self._recent_acks.popitem(last=False)

    def _admit(self, envelope: VerifiedEnvelope, message: CompletedMessage) -> Ack:
        """Every check on a verified update, then aggregate, persist, commit. Returns the accept Ack."""
        metadata = envelope.metadata
        client_id, round_number, message_id = envelope.client_id, metadata.round, message.message_id
        check_addressing(metadata, self.rules)
        existing = self.store.receipt(round_number, client_id)
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
        decoded = decode_update(envelope, self.rules, self.pins)
        weight = self.rules.weight_of(metadata.sample_count)
        if self.rules.strategy.shared_factors:
            try:
                self.aggregator.add(decoded.tensors, weight)  # all or nothing
            except AggregationError as error:
                raise UpdateRejected(ReasonCode.INVALID_UPDATE, str(error)) from None
        try:
            path = self.files.write_update(round_number, client_id, envelope.body)
            self.store.add_receipt(Receipt(
                round=round_number, client_id=client_id, attempt=current.attempt, message_id=message_id.hex(),
                payload_sha256=message.sha256.hex(), body_sha256=tensor_codec.sha256_hex(envelope.body),
                sample_count=metadata.sample_count, file_path=str(path), accepted_at=self._clock(),
                metrics=decoded.metrics,
            ), pins=decoded.new_pins)  # fmt: skip
        except BaseException:
            # The aggregator holds this update but nothing durable does: start it over from
            # what is committed, so it counts exactly what was acknowledged.
            self.files.discard_update(round_number, client_id)
            self.rebuild_aggregate(round_number)
            raise
        if decoded.new_pins:
            self.pins = self.pins.updated(decoded.new_pins)
            self.console.event(f"federation pinned to base model {self.pins.base_fingerprint} and "
                               f"{len(self.pins.tensor_spec or {})} shared tensor(s) by {client_id}'s update")
            self._on_pinned(self.pins)
        current.record(client_id)
        counted = f", counted as {weight} (the federation's bound)" if weight != metadata.sample_count else ""
        self.console.event(f"update from {client_id} accepted for round {round_number} "
                           f"({metadata.sample_count} samples{counted})")  # fmt: skip
        self._on_accepted(current)
        return Ack.accept(client_id, round_number, message_id)

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
               reason: ReasonCode, text: str) -> Ack | None:  # fmt: skip
        """Count and log a refusal, and acknowledge it when there is a client to tell."""
        reason = ReasonCode(reason)
        text = text[:_MAX_REASON_TEXT]
        self.store.record_rejection(RejectionRecord(at=self._clock(), client_id=client_id, round=round_number,
                                                    reason=reason.value, detail=text))  # fmt: skip
        where = f" for round {round_number}" if round_number is not None else ""
        self.console.event(f"update from {client_id or 'an unknown sender'}{where} rejected: {reason.value} ({text})")
        if client_id is None:
            return None
        ack = Ack.reject(client_id, round_number, message_id, reason, text)
        self._send_ack(ack)
        return ack
