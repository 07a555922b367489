"""Seeded fuzzer: hostile and broken input sent to a running ``fedvlm-hub start`` through a real broker.

What one run does:

1. registers three honest clients (``h0``-``h2``), two clients that turn hostile
   (``f0``, ``f1``: registered, online, selected, their real secrets in the fuzzer's
   hands) and one registered client that is never online (``idle``);
2. starts the hub as a subprocess (``fedvlm-hub start``, embedded broker or a mosquitto
   this script starts) and samples its memory from ``/proc/<pid>/status`` (VmRSS, VmHWM);
3. round 1 is honest: all five answer, which pins the federation's layout and base model;
4. round 2: ``h0`` answers, then ``--messages`` MQTT messages of every kind below go to
   the hub, then the other four answer honestly;
5. checks: the hub never died; every fuzz message that should be refused was (no ack
   ``accepted`` for a fuzz message, no receipt beyond the ten honest updates, global
   version 2 equals the weighted mean of exactly the honest round-2 updates); the hub's
   SQLite rejection counts per reason equal what the fuzzer expected per reason; no
   ``hub_error`` and no internal exception in the hub's log.

Kinds of messages (``KINDS``): random bytes; chunks too short for a header; topics the
hub must ignore; chunk headers declaring huge sizes or counts, bad versions, chunk
sizes, indices and data lengths; a chunk whose header names another message than its
topic; messages split into 1 KiB chunks and delivered duplicated and out of order;
messages left incomplete (a device that died mid-upload); a chunk altered in flight;
forged signatures (wrong secret, altered bytes, unknown signer, someone else's topic);
envelopes with bad magic, version, enormous or broken metadata; wrong federation,
strategy, LoRA hash, base model; replays of round 1 (refused envelopes and accepted
ones, which are acknowledged again and counted once); a second different update;
clients not selected; valid signatures over malformed safetensors; NaN/Inf; huge
values; wrong dtypes, shapes and names; missing and extra tensors; a leaked lora_A;
body metadata that contradicts the envelope; enormous body metadata; oversize messages.

Everything is drawn from one ``random.Random(seed)``: the same seed sends the same
messages in the same order (only the secrets, issued by the hub, differ between runs).

    python benchmarks/fuzz_hub.py --messages 10000 --seed 7 --broker embedded --out work/fuzz
    make fuzz            # the same, 10,000 messages, both brokers' figures in work/fuzz

Prints a summary and writes ``fuzz-<broker>-<seed>.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import hmac
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository root holds tests/
    sys.path.insert(0, str(ROOT))

from fedvlm.hub.clients import register_client  # noqa: E402
from fedvlm.hub.store import HubStore  # noqa: E402
from fedvlm.shared import tensor_codec  # noqa: E402
from fedvlm.shared.lora_config import LoraSettings  # noqa: E402
from fedvlm.shared.mqtt_link import MqttLink  # noqa: E402
from fedvlm.shared.protocol import (  # noqa: E402
    CHUNK_HEADER_SIZE,
    MAC_CONTEXT,
    MIN_CHUNK_SIZE,
    PROTOCOL_VERSION,
    SHA256_NOT_STATED,
    Ack,
    ChunkStream,
    EnvelopeMetadata,
    Topics,
    sign,
    split_payload,
)
from tests.brokers import MosquittoProcess, RunningBroker, free_port, wait_for_port  # noqa: E402
from tests.hub.fake_clients import BASE_FINGERPRINT, FakeClient, b_factors, lora_key, weighted_mean  # noqa: E402

FEDERATION = "fuzz"
HONEST = ("h0", "h1", "h2")
HOSTILE = ("f0", "f1")
IDLE = "idle"  # registered, never online: never selected
# The hub's limit on a signed update in this run. LoRA B updates are kilobytes to a few
# MB; a small limit keeps the bound on what partial messages may pin in memory small.
MAX_UPDATE_BYTES = 4 * 1024 * 1024
# Messages left incomplete stay in the hub's reassembler until its timeout (longer than
# the run): keep them under the hub's pending limits (8 messages per sender, 64 in all),
# with room for the sender's later messages, or those would be refused as "overloaded" and
# the expected counts would depend on timing. Alternating senders: 3 each.
MAX_PARTIAL_MESSAGES = 3 * len(HOSTILE)
_HEADER = struct.Struct(">4sH16sIIIQ32s")
_ENVELOPE_PREFIX = struct.Struct(">4sHB")


# ====================================================================== the cases
@dataclasses.dataclass
class Case:
    """One fuzz case: the MQTT messages it sends and what the hub must answer.

    ``expected``: rejection counts per reason code the hub must record for it.
    ``accepted_ok``: message ids whose ``accepted`` ack is right (replays of accepted updates).
    """

    kind: str
    messages: list[tuple[str, bytes]]
    expected: collections.Counter
    accepted_ok: set[str] = dataclasses.field(default_factory=set)
    partial: bool = False


@dataclasses.dataclass
class FuzzContext:
    """What the cases draw from: the federation's facts, secrets, round-1 envelopes."""

    rng: random.Random
    topics: Topics
    secrets: dict[str, str]
    lora: LoraSettings
    round_number: int
    round1_envelopes: dict[str, bytes]  # accepted in round 1
    partials_sent: int = 0

    def message_id(self) -> bytes:
        return self.rng.randbytes(16)

    def hostile(self) -> str:
        return self.rng.choice(HOSTILE)

    def tensors(self) -> dict[str, np.ndarray]:
        """A fresh well-formed update (seeded), to be broken by a case."""
        return b_factors(self.rng.randrange(1 << 30))

    def metadata(self, client_id: str, **changes: Any) -> EnvelopeMetadata:
        values = dict(federation=FEDERATION, round=self.round_number, client_id=client_id,
                      sample_count=self.rng.randint(1, 50), strategy="plora", base_fingerprint=BASE_FINGERPRINT,
                      lora_config_hash=self.lora.config_hash())  # fmt: skip
        values.update(changes)
        return EnvelopeMetadata(**values)

    def body(self, tensors: dict[str, np.ndarray], metadata: EnvelopeMetadata,
             extra: dict[str, str] | None = None) -> bytes:  # fmt: skip
        body_meta = {key: str(value) for key, value in metadata.to_dict().items()}
        body_meta.update(extra or {})
        return tensor_codec.encode(tensors, body_meta)

    def envelope(self, client_id: str, tensors: dict[str, np.ndarray] | None = None, *, body: bytes | None = None,
                 secret: str | None = None, extra: dict[str, str] | None = None, **changes: Any) -> bytes:
        metadata = self.metadata(client_id, **changes)
        if body is None:
            body = self.body(self.tensors() if tensors is None else tensors, metadata, extra)
        return sign(body, metadata, client_id, secret or self.secrets[client_id])

    def chunks(self, sender: str, payload: bytes, message_id: bytes | None = None, *,
               chunk_size: int = MIN_CHUNK_SIZE) -> list[tuple[str, bytes]]:  # fmt: skip
        """1 KiB chunks by default, so even small updates travel in several; half the time
        streamed as a device sends them (the digest only in the last chunk), else with the
        digest in every chunk (as a device re-sends a saved update)."""
        message_id = message_id or self.message_id()
        topic = self.topics.update(sender, message_id)
        if self.rng.random() < 0.5:
            chunks = split_payload(payload, chunk_size=chunk_size, message_id=message_id)
        else:
            stream = ChunkStream(len(payload), chunk_size=chunk_size, message_id=message_id)
            chunks = [*stream.add(payload), stream.finish()]
        return [(topic, chunk) for chunk in chunks]


def _expect(**counts: int) -> collections.Counter:
    return collections.Counter({reason: n for reason, n in counts.items() if n})


def _header(message_id: bytes, index: int, count: int, chunk_size: int, total: int, digest: bytes | None = None,
            *, magic: bytes = b"FVCK", version: int = PROTOCOL_VERSION) -> bytes:  # fmt: skip
    # By default a stated (wrong) digest, so a lie elsewhere in the header is what gets it refused.
    return _HEADER.pack(magic, version, message_id, index, count, chunk_size, total, digest or b"\xee" * 32)


def _raw_envelope(signer: str, metadata_json: bytes, body: bytes, secret: str | None, *, magic: bytes = b"FVSE",
                  version: int = PROTOCOL_VERSION, mac: bytes | None = None) -> bytes:  # fmt: skip
    """An envelope assembled byte by byte, signed with ``secret``: lets a case put anything inside."""
    signer_bytes = signer.encode("ascii")
    signed = b"".join((_ENVELOPE_PREFIX.pack(magic, version, len(signer_bytes)), signer_bytes,
                       struct.pack(">I", len(metadata_json)), metadata_json, struct.pack(">Q", len(body)), body))
    if mac is None:
        mac = hmac.new((secret or "x" * 32).encode(), MAC_CONTEXT + hashlib.sha256(signed).digest(),
                       hashlib.sha256).digest()  # fmt: skip
    return signed + mac


# ---------------------------------------------------------------------- transport-level cases
def case_random_bytes(ctx: FuzzContext) -> Case:
    size = ctx.rng.choice((ctx.rng.randint(1, CHUNK_HEADER_SIZE - 1), ctx.rng.randint(CHUNK_HEADER_SIZE, 4000)))
    sender = ctx.rng.choice(HOSTILE + ("ghost", "h1"))
    message_id = ctx.message_id()
    payload = ctx.rng.randbytes(size)
    # A header's worth of bytes: shorter is truncated_header, longer fails the magic.
    reason = "truncated_header" if size < CHUNK_HEADER_SIZE else "malformed"
    return Case("random_bytes", [(ctx.topics.update(sender, message_id), payload)], _expect(**{reason: 1}))


def case_ignored_topics(ctx: FuzzContext) -> Case:
    """Messages the hub receives but must ignore without an answer or a count: an empty
    payload (what clearing a retained message looks like), update topics whose message id
    is not 32 lowercase hex digits or whose client id is invalid, garbage announcements,
    and another federation's topics (the hub is not subscribed to them)."""
    sender = ctx.hostile()
    junk = ctx.rng.randbytes(ctx.rng.randint(1, 600))
    message_hex = ctx.message_id().hex()
    topic, payload = ctx.rng.choice((
        (ctx.topics.update(sender, ctx.message_id()), b""),
        (f"fedvlm/v1/{FEDERATION}/updates/{sender}/not-a-message-id", junk),
        (f"fedvlm/v1/{FEDERATION}/updates/{sender}/{message_hex.upper()}", junk),
        (f"fedvlm/v1/{FEDERATION}/updates/{sender}/{message_hex[:30]}", junk),
        (f"fedvlm/v1/{FEDERATION}/updates/-bad-id/{message_hex}", junk),
        (ctx.topics.client_announce(sender), junk),
        (f"fedvlm/v1/other-fed/updates/{sender}/{message_hex}", junk),
    ))  # fmt: skip
    return Case("ignored_topic", [(topic, payload)], _expect())


def case_header_games(ctx: FuzzContext) -> Case:
    """Chunk headers that lie: huge sizes and counts, bad version, chunk size, index, data length,
    a last chunk that does not state the digest."""
    sender = ctx.hostile()
    message_id = ctx.message_id()
    variant = ctx.rng.randrange(10)
    data = ctx.rng.randbytes(ctx.rng.randint(0, 200))
    if variant == 0:  # a size far over the hub's limit: refused before any allocation
        total = ctx.rng.choice((MAX_UPDATE_BYTES + 1, 1 << 40, (1 << 64) - 1))
        chunk = _header(message_id, 0, (total + MIN_CHUNK_SIZE - 1) // MIN_CHUNK_SIZE & 0xFFFFFFFF, MIN_CHUNK_SIZE,
                        total) + data
        reason = "too_large"
    elif variant == 1:  # a count the size cannot need
        chunk, reason = _header(message_id, 0, 0xFFFFFFFF, MIN_CHUNK_SIZE, 5000) + data, "inconsistent"
    elif variant == 2:  # index past the count
        chunk, reason = _header(message_id, 9, 2, MIN_CHUNK_SIZE, 1500) + bytes(476), "inconsistent"
    elif variant == 3:  # another protocol version
        version = ctx.rng.choice((0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, 65535))
        chunk, reason = _header(message_id, 0, 1, MIN_CHUNK_SIZE, 10, version=version), "unsupported_version"
    elif variant == 4:  # a chunk size below the 1 KiB floor or above 64 MiB
        size = ctx.rng.choice((0, 1, 1023, (64 << 20) + 1))
        chunk, reason = _header(message_id, 0, 1, size, 10) + bytes(10), "malformed"
    elif variant == 5:  # data longer or shorter than the header implies
        chunk, reason = _header(message_id, 0, 1, MIN_CHUNK_SIZE, 100) + bytes(ctx.rng.choice((0, 99, 101, 900))), \
            "inconsistent"
    elif variant == 6:  # wrong magic
        chunk, reason = _header(message_id, 0, 1, MIN_CHUNK_SIZE, 10, magic=b"FVCX") + bytes(10), "malformed"
    elif variant == 7:  # the header names another message than the topic
        payload = ctx.envelope(sender)
        (topic, first), *_ = ctx.chunks(sender, payload)
        other = ctx.message_id()
        return Case("header_vs_topic", [(ctx.topics.update(sender, other), first)], _expect(malformed=1))
    elif variant == 8:  # the last (here the only) chunk leaves the digest to a chunk after it
        chunk, reason = _header(message_id, 0, 1, MIN_CHUNK_SIZE, 10, SHA256_NOT_STATED) + bytes(10), "malformed"
    else:  # an empty payload declared as one chunk whose hash is wrong: completes, corrupt
        chunk, reason = _header(message_id, 0, 1, MIN_CHUNK_SIZE, 0, digest=ctx.rng.randbytes(32)), "corrupt"
    return Case("header_games", [(ctx.topics.update(sender, message_id), chunk)], _expect(**{reason: 1}))


def case_reordered_duplicated(ctx: FuzzContext) -> Case:
    """A refused-for-a-reason envelope in many 1 KiB chunks, duplicated and shuffled: one verdict.

    For a permanent reason (wrong federation, strategy) duplicates may also come after the
    message completed: the hub answers a message id once and ignores its stray chunks. For
    a timing reason (a round that is closed or not open) the hub forgets the message so
    that a re-send can be judged afresh, so here duplicates arrive only while the message
    is still incomplete; stray chunks after such a verdict are the subject of
    tests/reliability/test_hostile_input.py.
    """
    sender = ctx.hostile()
    pad = {"pad": "x" * ctx.rng.randint(1000, 6000)}
    timing = ctx.rng.random() < 0.5
    if timing:
        round_number = ctx.round_number + ctx.rng.choice((-1, 1, 7))
        envelope, reason = ctx.envelope(sender, extra=pad, round=round_number), _stale_round_reason(round_number)
    else:
        changes = ctx.rng.choice(({"federation": "elsewhere"}, {"strategy": "fedit"}))
        reason = "wrong_federation" if "federation" in changes else "incompatible"
        envelope = ctx.envelope(sender, extra=pad, **changes)
    chunks = ctx.chunks(sender, envelope)
    sent = list(chunks)
    ctx.rng.shuffle(sent)
    last = sent[-1]  # the message completes when this one arrives
    for _ in range(ctx.rng.randint(1, 4)):
        if timing:  # a copy of any chunk but the last, before the last: all while incomplete
            sent.insert(ctx.rng.randrange(len(sent)), ctx.rng.choice([c for c in chunks if c != last]))
        else:  # anywhere, also after completion, where the hub ignores it
            sent.insert(ctx.rng.randrange(len(sent) + 1), ctx.rng.choice(chunks))
    return Case("reordered_duplicated", sent, _expect(**{reason: 1}))


def _stale_round_reason(round_number: int) -> str:
    """A hostile client's update for another round than the open one: for round 1, where
    it has an accepted update, the hub's one-update-per-round check answers first."""
    return "duplicate" if round_number == 1 else "wrong_round"


def case_inconsistent_chunk(ctx: FuzzContext) -> Case:
    """A chunk contradicting its message's first chunk is refused; the message still completes."""
    sender = ctx.hostile()
    envelope = ctx.envelope(sender, extra={"pad": "y" * 3000}, federation="elsewhere")
    message_id = ctx.message_id()
    chunks = ctx.chunks(sender, envelope, message_id)
    topic = chunks[0][0]
    liar = _header(message_id, 1, len(chunks) + 1, MIN_CHUNK_SIZE, (len(chunks) + 1) * MIN_CHUNK_SIZE) + bytes(
        MIN_CHUNK_SIZE)
    return Case("inconsistent_chunk", [chunks[0], (topic, liar), *chunks[1:]],
                _expect(inconsistent=1, wrong_federation=1))


def case_partial(ctx: FuzzContext) -> Case:
    """A device that died mid-upload: some chunks, never the rest. Held until the hub's timeout."""
    if ctx.partials_sent >= MAX_PARTIAL_MESSAGES:
        return case_corrupt(ctx)
    sender = HOSTILE[ctx.partials_sent % len(HOSTILE)]
    ctx.partials_sent += 1
    chunks = ctx.chunks(sender, ctx.envelope(sender, extra={"pad": "z" * 5000}))
    kept = ctx.rng.sample(chunks, ctx.rng.randint(1, len(chunks) - 1))
    return Case("partial_upload", kept, _expect(), partial=True)


def case_corrupt(ctx: FuzzContext) -> Case:
    """Every chunk arrives but one byte changed in flight: the SHA-256 fails."""
    sender = ctx.hostile()
    chunks = ctx.chunks(sender, ctx.envelope(sender, extra={"pad": "c" * 2000}))
    index = ctx.rng.randrange(len(chunks))
    topic, chunk = chunks[index]
    position = ctx.rng.randrange(_HEADER.size, len(chunk))
    chunks[index] = (topic, chunk[:position] + bytes([chunk[position] ^ 0x5A]) + chunk[position + 1:])
    return Case("corrupt_in_flight", chunks, _expect(corrupt=1))


def case_oversize(ctx: FuzzContext) -> Case:
    """A real message over the limit, 1 MiB chunks: refused at its first chunk, once (the hub
    then ignores that message's further chunks)."""
    sender = ctx.hostile()
    payload = ctx.rng.randbytes(MAX_UPDATE_BYTES + ctx.rng.randint(1, 1 << 20))
    message_id = ctx.message_id()
    topic = ctx.topics.update(sender, message_id)
    chunks = split_payload(payload, chunk_size=1 << 20, message_id=message_id)
    sent = chunks[: ctx.rng.randint(1, 2)]
    return Case("oversize", [(topic, chunk) for chunk in sent], _expect(too_large=1))


def case_big_garbage(ctx: FuzzContext) -> Case:
    """One large MQTT message of random bytes (hundreds of KB): refused at its header."""
    sender = ctx.hostile()
    payload = ctx.rng.randbytes(ctx.rng.randint(100_000, 900_000))
    return Case("big_garbage", [(ctx.topics.update(sender, ctx.message_id()), payload)], _expect(malformed=1))


# ---------------------------------------------------------------------- envelope-level cases
def case_forged(ctx: FuzzContext) -> Case:
    sender = ctx.hostile()
    variant = ctx.rng.randrange(5)
    if variant == 0:  # signed with a secret the hub never issued
        envelope, reason = ctx.envelope(sender, secret=ctx.rng.randbytes(32).hex()), "bad_signature"
    elif variant == 1:  # one bit flipped after signing, anywhere past the signer's id
        # (a flip in the magic, version or signer is a layout or identity error instead)
        envelope = bytearray(ctx.envelope(sender))
        envelope[ctx.rng.randrange(7 + len(sender), len(envelope))] ^= 1 << ctx.rng.randrange(8)
        envelope, reason = bytes(envelope), "bad_signature"
    elif variant == 2:  # a signer the hub does not know, on its own topic
        ghost = f"ghost{ctx.rng.randrange(1000)}"
        metadata = ctx.metadata(ghost)
        envelope = sign(ctx.body(ctx.tensors(), metadata), metadata, ghost, ctx.rng.randbytes(32).hex())
        return Case("forged", ctx.chunks(ghost, envelope), _expect(unknown_client=1))
    elif variant == 3:  # a valid envelope of f0 published on h1's topic (impersonation)
        return Case("forged", ctx.chunks("h1", ctx.envelope(sender)), _expect(client_mismatch=1))
    else:  # HMAC computed, then the MAC replaced by zeros
        envelope = ctx.envelope(sender)
        envelope, reason = envelope[:-32] + bytes(32), "bad_signature"
    return Case("forged", ctx.chunks(sender, envelope), _expect(**{reason: 1}))


def case_envelope_layout(ctx: FuzzContext) -> Case:
    """Signed envelopes that break the layout: magic, version, enormous or broken metadata."""
    sender = ctx.hostile()
    secret = ctx.secrets[sender]
    good_meta = json.dumps(ctx.metadata(sender).to_dict()).encode()
    body = ctx.body(ctx.tensors(), ctx.metadata(sender))
    variant = ctx.rng.randrange(8)
    if variant == 0:
        envelope, reason = _raw_envelope(sender, good_meta, body, secret, magic=b"FVSX"), "malformed"
    elif variant == 1:
        envelope, reason = _raw_envelope(sender, good_meta, body, secret, version=PROTOCOL_VERSION + 1), \
            "unsupported_version"
    elif variant == 2:  # metadata over the 64 KiB limit (validly signed)
        huge = dict(ctx.metadata(sender).to_dict(), padding="m" * ctx.rng.randint(70_000, 400_000))
        envelope, reason = _raw_envelope(sender, json.dumps(huge).encode(), body, secret), "malformed"
    elif variant == 3:  # metadata that is not JSON
        envelope, reason = _raw_envelope(sender, ctx.rng.randbytes(ctx.rng.randint(0, 300)), body, secret), "malformed"
    elif variant == 4:  # metadata fields out of range
        bad = dict(ctx.metadata(sender).to_dict())
        key, value = ctx.rng.choice((("sample_count", 0), ("sample_count", -5), ("round", -1), ("round", "one"),
                                     ("strategy", "pl ora/#"), ("federation", "a/b"), ("kind", "global"),
                                     ("sample_count", 1.5), ("lora_config_hash", "")))  # fmt: skip
        bad[key] = value
        envelope, reason = _raw_envelope(sender, json.dumps(bad).encode(), body, secret), "malformed"
    elif variant == 5:  # metadata naming another client than the signer
        other = dict(ctx.metadata(sender).to_dict(), client_id="h2")
        envelope, reason = _raw_envelope(sender, json.dumps(other).encode(), body, secret), "client_mismatch"
    elif variant == 6:  # body length field larger than what follows
        envelope = bytearray(_raw_envelope(sender, good_meta, body, secret))
        offset = 7 + len(sender) + 4 + len(good_meta)
        envelope[offset:offset + 8] = struct.pack(">Q", len(body) + ctx.rng.randint(1, 1 << 40))
        # The MAC no longer matches the altered length: the HMAC check comes first.
        envelope, reason = bytes(envelope), "bad_signature"
    else:  # too short to be an envelope at all
        envelope, reason = b"FVSE\x00\x01" + ctx.rng.randbytes(ctx.rng.randint(0, 30)), "malformed"
    return Case("envelope_layout", ctx.chunks(sender, envelope), _expect(**{reason: 1}))


def case_addressing(ctx: FuzzContext) -> Case:
    """Validly signed, wrongly addressed or incompatible updates."""
    sender = ctx.hostile()
    variant = ctx.rng.randrange(8)
    if variant == 0:
        envelope, reason = ctx.envelope(sender, federation=ctx.rng.choice(("other", "fuzz2", "FUZZ"))), \
            "wrong_federation"
    elif variant == 1:  # an old round (round 0, or 1 where it answered already) or a future one
        round_number = ctx.rng.choice((0, 1, ctx.round_number + 1, 10**9))
        envelope, reason = ctx.envelope(sender, round=round_number), _stale_round_reason(round_number)
    elif variant == 2:
        envelope, reason = ctx.envelope(sender, strategy=ctx.rng.choice(("fedit", "ffa", "fedsa"))), "incompatible"
    elif variant == 3:
        envelope, reason = ctx.envelope(sender, lora_config_hash=ctx.rng.randbytes(32).hex()), "incompatible"
    elif variant == 4:
        envelope, reason = ctx.envelope(sender, base_fingerprint="other-base-" + str(ctx.rng.randrange(99))), \
            "incompatible"
    elif variant == 5:  # a registered client that is not selected this round
        return Case("addressing", ctx.chunks(IDLE, ctx.envelope(IDLE)), _expect(not_selected=1))
    elif variant == 6:  # h0 already has an accepted update this round: a different one is a duplicate
        return Case("addressing", ctx.chunks("h0", ctx.envelope("h0")), _expect(duplicate=1))
    else:  # an unregistered-looking replay: round 0 never opens
        envelope, reason = ctx.envelope(sender, round=0, extra={"note": "replayed"}), "wrong_round"
    return Case("addressing", ctx.chunks(sender, envelope), _expect(**{reason: 1}))


def case_replay_accepted(ctx: FuzzContext) -> Case:
    """Round 1's accepted envelope re-sent under a new message id: acknowledged again, counted once."""
    client_id = ctx.rng.choice(sorted(ctx.round1_envelopes))
    chunks = ctx.chunks(client_id, ctx.round1_envelopes[client_id])
    message_id = chunks[0][0].rsplit("/", 1)[-1]
    return Case("replay_accepted", chunks, _expect(), accepted_ok={message_id})


def _broken_tensors(ctx: FuzzContext) -> tuple[str, dict[str, np.ndarray]]:
    good = ctx.tensors()
    names = list(good)
    victim = ctx.rng.choice(names)
    variant = ctx.rng.randrange(12)
    shape = good[victim].shape
    if variant == 0:
        bad = {**good, victim: np.full(shape, ctx.rng.choice((np.nan, np.inf, -np.inf)), np.float32)}
        return "nan_inf", bad
    if variant == 1:  # one NaN hidden among finite values
        array = good[victim].copy()
        array.flat[ctx.rng.randrange(array.size)] = np.nan
        return "nan_inf", {**good, victim: array}
    if variant == 2:
        dtype = ctx.rng.choice((np.float64, np.float16, np.int32, np.int8, np.uint8, np.int64))
        return "wrong_dtype", {**good, victim: good[victim].astype(dtype)}
    if variant == 3:
        new_shape = ctx.rng.choice(((shape[1], shape[0]), (shape[0] + 1, shape[1]), (shape[0] * shape[1],),
                                    (1, *shape), (0, shape[1])))  # fmt: skip
        return "wrong_shape", {**good, victim: np.zeros(new_shape, np.float32)}
    if variant == 4:  # renamed: one expected name missing, one unknown present
        renamed = dict(good)
        renamed[lora_key(ctx.rng.randint(1, 40), "q_proj", "B")] = renamed.pop(victim)
        return "wrong_names", renamed
    if variant == 5:
        return "missing_tensor", {name: good[name] for name in names if name != victim}
    if variant == 6:
        return "extra_tensor", {**good, lora_key(0, "k_proj", "B"): np.zeros((6, 4), np.float32)}
    if variant == 7:  # pLoRA's personal factor must never be accepted
        return "leaked_lora_a", {**good, lora_key(0, "q_proj", "A"): np.zeros((4, 5), np.float32)}
    if variant == 8:
        return "no_tensors", {}
    if variant == 9:  # finite but absurd: would overflow the float32 sum
        return "huge_values", {**good, victim: np.full(shape, ctx.rng.choice((1e31, -3e33, 3e38)), np.float32)}
    if variant == 10:
        return "not_lora", {**good, "model.embed_tokens.weight": np.zeros((6, 4), np.float32)}
    return "wrong_dtype", {**good, victim: good[victim].astype(np.float64)}


def case_bad_tensors(ctx: FuzzContext) -> Case:
    """Validly signed updates whose tensors break the pinned layout or hold garbage values."""
    sender = ctx.hostile()
    kind, tensors = _broken_tensors(ctx)
    return Case(kind, ctx.chunks(sender, ctx.envelope(sender, tensors)), _expect(invalid_update=1))


def case_bad_body(ctx: FuzzContext) -> Case:
    """Valid signatures over bodies that are not the safetensors they claim to be, or that
    contradict the envelope, or carry enormous metadata."""
    sender = ctx.hostile()
    metadata = ctx.metadata(sender)
    good_body = ctx.body(ctx.tensors(), metadata)
    variant = ctx.rng.randrange(10)
    reason = "invalid_update"
    if variant == 0:
        body = ctx.rng.randbytes(ctx.rng.randint(0, 3000))
    elif variant == 1:  # truncated safetensors
        body = good_body[: ctx.rng.randrange(len(good_body))]
    elif variant == 2:  # header length prefix far beyond the body
        body = struct.pack("<Q", ctx.rng.choice((len(good_body) * 2, 1 << 62, (1 << 64) - 1))) + good_body[8:]
    elif variant == 3:  # header JSON that is not an object / not JSON
        header = ctx.rng.choice((b"[1,2,3]", b"{", b"null", b'{"a": NaN}', b'{"__metadata__": 5}'))
        body = struct.pack("<Q", len(header)) + header
    elif variant == 4:  # offsets overlapping / out of range
        header = json.dumps({"x.lora_B.weight": {"dtype": "F32", "shape": [6, 4], "data_offsets": [0, 200]},
                             "y.lora_B.weight": {"dtype": "F32", "shape": [6, 4], "data_offsets": [0, 96]}}).encode()
        body = struct.pack("<Q", len(header)) + header + bytes(96)
    elif variant == 5:  # duplicate keys in the header JSON
        entry = '{"dtype": "F32", "shape": [6, 4], "data_offsets": [0, 96]}'
        header = ('{"x.lora_B.weight": ' + entry + ', "x.lora_B.weight": ' + entry + "}").encode()
        body = struct.pack("<Q", len(header)) + header + bytes(96)
    elif variant == 6:  # body metadata contradicting the signed envelope
        key = ctx.rng.choice(("round", "federation", "sample_count", "client_id", "strategy"))
        body = ctx.body(ctx.tensors(), metadata, {key: "999" if key != "federation" else "elsewhere"})
    elif variant == 7:  # metrics that are not JSON
        body = ctx.body(ctx.tensors(), metadata, {"metrics": "{not json"})
    elif variant == 8:  # enormous body metadata and a NaN: huge, and still refused for the NaN
        tensors = ctx.tensors()
        tensors[next(iter(tensors))] = np.full((6, 4), np.nan, np.float32)
        body = ctx.body(tensors, metadata, {"blob": "b" * ctx.rng.randint(200_000, 1_500_000)})
    else:  # enormous body metadata over the hub's update limit
        body = ctx.body(ctx.tensors(), metadata, {"blob": "B" * (MAX_UPDATE_BYTES + 10)})
        reason = "too_large"
    envelope = sign(body, metadata, sender, ctx.secrets[sender])
    if reason == "too_large":  # refused at its first chunk; the rest would be ignored, so skip them
        chunks = ctx.chunks(sender, envelope)[:3]
    else:  # 64 KiB chunks: the enormous ones would be a thousand 1 KiB messages
        chunks = ctx.chunks(sender, envelope, chunk_size=64 * 1024)
    return Case("bad_body", chunks, _expect(**{reason: 1}))


# Relative weights: the cheap, varied cases dominate; big ones are rare (they cost bandwidth).
KINDS: tuple[tuple[Callable[[FuzzContext], Case], int], ...] = (
    (case_random_bytes, 14),
    (case_ignored_topics, 4),
    (case_header_games, 16),
    (case_reordered_duplicated, 4),
    (case_inconsistent_chunk, 2),
    (case_partial, 1),
    (case_corrupt, 3),
    (case_oversize, 1),
    (case_big_garbage, 1),
    (case_forged, 10),
    (case_envelope_layout, 8),
    (case_addressing, 10),
    (case_replay_accepted, 2),
    (case_bad_tensors, 16),
    (case_bad_body, 8),
)


def generate_cases(ctx: FuzzContext, messages: int) -> Iterator[Case]:
    """Cases until at least ``messages`` MQTT messages are produced."""
    functions, weights = zip(*KINDS)
    sent = 0
    while sent < messages:
        case = ctx.rng.choices(functions, weights)[0](ctx)
        sent += len(case.messages)
        yield case


# ====================================================================== the hub process
class HubProcess:
    """``fedvlm-hub start`` as a subprocess, its memory sampled from /proc."""

    def __init__(self, state_dir: Path, log_path: Path, arguments: list[str]) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fedvlm.hub.cli", "start", "--federation", FEDERATION, "--state-dir",
                 str(state_dir), "--quiet", *arguments], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.peak_rss_kib = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(0.05):
            status = self.status()
            if status is None:
                return
            self.peak_rss_kib = max(self.peak_rss_kib, status.get("VmHWM", 0))
            self.samples.append((time.monotonic() - start, status.get("VmRSS", 0)))

    def status(self) -> dict[str, int] | None:
        """VmRSS, VmHWM, … in KiB, or None once the process is gone."""
        try:
            text = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        values = {}
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key.startswith("Vm") and rest.strip().endswith("kB"):
                values[key] = int(rest.split()[0])
        return values

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        """SIGTERM (a clean stop), SIGKILL if it hangs; returns the exit status."""
        status = self.status()
        if status is not None:
            self.peak_rss_kib = max(self.peak_rss_kib, status.get("VmHWM", 0))
        self._stop.set()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


# ====================================================================== a run
@dataclasses.dataclass
class FuzzReport:
    seed: int
    broker: str
    messages_sent: int = 0
    cases: int = 0
    cases_by_kind: dict[str, int] = dataclasses.field(default_factory=dict)
    partial_messages_left: int = 0
    seconds_fuzzing: float = 0.0
    hub_crashes: int = 0
    hub_internal_errors: int = 0
    bad_updates_accepted: int = 0
    accepted_acks_for_fuzz: list[str] = dataclasses.field(default_factory=list)
    replays_acknowledged: int = 0
    expected_rejections: dict[str, int] = dataclasses.field(default_factory=dict)
    hub_rejections: dict[str, int] = dataclasses.field(default_factory=dict)
    rejection_mismatch: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    acks_received: dict[str, int] = dataclasses.field(default_factory=dict)
    rounds_completed: int = 0
    rounds_lost: int = 0
    global_matches_honest_mean: bool = False
    peak_rss_mib: float = 0.0
    rss_before_fuzz_mib: float = 0.0
    rss_after_fuzz_mib: float = 0.0
    hub_exit_status: int | None = None

    @property
    def ok(self) -> bool:
        return (self.hub_crashes == 0 and self.hub_internal_errors == 0 and self.bad_updates_accepted == 0
                and not self.rejection_mismatch and self.rounds_lost == 0 and self.global_matches_honest_mean
                and self.hub_exit_status == 0)  # fmt: skip

    def summary(self) -> str:
        lines = [
            f"fuzz run: seed {self.seed}, broker {self.broker}",
            f"  messages fuzzed          {self.messages_sent} ({self.cases} cases, {self.seconds_fuzzing:.1f} s to "
            "send and be answered)",
            f"  hub crashes              {self.hub_crashes}",
            f"  hub internal errors      {self.hub_internal_errors}",
            f"  bad updates accepted     {self.bad_updates_accepted}",
            f"  replays acked, counted once {self.replays_acknowledged}",
            f"  rounds completed / lost  {self.rounds_completed} / {self.rounds_lost}",
            f"  global v2 == honest mean {self.global_matches_honest_mean}",
            f"  hub RSS before/after fuzz {self.rss_before_fuzz_mib:.0f} / {self.rss_after_fuzz_mib:.0f} MiB; "
            f"peak (VmHWM) {self.peak_rss_mib:.0f} MiB",
            f"  partial messages left    {self.partial_messages_left} (expire after the reassembly timeout)",
            "  rejections by reason (hub's SQLite / expected):",
        ]
        for reason in sorted(set(self.hub_rejections) | set(self.expected_rejections)):
            lines.append(f"    {reason:<18} {self.hub_rejections.get(reason, 0):>6} / "
                         f"{self.expected_rejections.get(reason, 0)}")  # fmt: skip
        if self.rejection_mismatch:
            lines.append(f"  MISMATCH: {self.rejection_mismatch}")
        lines.append(f"  cases by kind: {dict(sorted(self.cases_by_kind.items()))}")
        lines.append(f"  result: {'OK' if self.ok else 'FAILED'}")
        return "\n".join(lines)


class _AckTap:
    """Every ack the hub publishes (``clients/+/ack``), by message id."""

    def __init__(self, broker: RunningBroker, topics: Topics) -> None:
        self.by_message: dict[str, list[Ack]] = collections.defaultdict(list)
        self.count = 0
        self._lock = threading.Lock()
        self.link = MqttLink(broker.address, f"fuzz-acks-{os.getpid()}", protocol=broker.protocol,
                             persistent_session=False).connect(15)  # fmt: skip
        self.link.subscribe(f"{topics.prefix}/clients/+/ack", self._on_ack)

    def _on_ack(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            ack = Ack.from_json(payload)
        except Exception:  # an ack the hub could not have sent: recorded as an anomaly
            ack = None
        with self._lock:
            self.count += 1
            if ack is not None:
                self.by_message[ack.message_id or "none"].append(ack)

    def close(self) -> None:
        self.link.close()


def _require_accepted(ack: Ack) -> None:
    if not ack.accepted:
        raise RuntimeError(f"an honest update was refused: {ack}")


def _rejections(state_dir: Path) -> dict[str, int]:
    with HubStore.in_state_dir(state_dir, create=False) as store:
        return store.rejection_counts()


def run_fuzz(messages: int, seed: int, broker_kind: str, work_dir: Path, *,
             progress: Callable[[str], None] = lambda line: None) -> FuzzReport:  # fmt: skip
    """One whole fuzz run (see the module docstring); returns its report."""
    work_dir.mkdir(parents=True, exist_ok=True)
    state_dir, log_path = work_dir / "hub-state", work_dir / "hub.log"
    report = FuzzReport(seed=seed, broker=broker_kind)
    secrets = {name: register_client(state_dir, name) for name in (*HONEST, *HOSTILE, IDLE)}
    mosquitto = None
    arguments = ["--min-clients", str(len(HONEST) + len(HOSTILE)), "--round-timeout", "3600",
                 "--max-update-bytes", str(MAX_UPDATE_BYTES),
                 "--keep-updates"]  # fmt: skip  (the judge reads every accepted body back)
    if broker_kind == "mosquitto":
        mosquitto = MosquittoProcess(work_dir / "mosquitto").start()
        broker = mosquitto.broker
        arguments += ["--broker", broker.url]
    elif broker_kind == "embedded":
        broker = RunningBroker("embedded", "127.0.0.1", free_port())
        arguments += ["--port", str(broker.port)]
    else:
        raise ValueError(f"broker must be embedded or mosquitto, not {broker_kind!r}")
    hub = HubProcess(state_dir, log_path, arguments)
    topics = Topics(FEDERATION)
    clients: dict[str, FakeClient] = {}
    tap: _AckTap | None = None
    attacker: MqttLink | None = None
    try:
        wait_for_port(broker.host, broker.port, timeout=60)
        tap = _AckTap(broker, topics)
        for name in (*HONEST, *HOSTILE):
            clients[name] = FakeClient(broker, FEDERATION, name, secrets[name]).connect()
        rng = random.Random(seed)
        honest_updates: dict[int, dict[str, tuple[dict[str, np.ndarray], int]]] = {1: {}, 2: {}}
        round1_envelopes: dict[str, bytes] = {}

        # Round 1, honest: pins the layout and base model from real updates.
        clients["h0"].wait_collecting(1, timeout=60)
        for name, client in clients.items():
            update = (b_factors(rng.randrange(1 << 30)), rng.randint(5, 40))
            honest_updates[1][name] = update
            round1_envelopes[name] = client.envelope(update[0], 1, update[1])
            _require_accepted(client.wait_ack(client.publish(round1_envelopes[name]), timeout=60))
        clients["h0"].wait_collecting(2, timeout=60)
        update = (b_factors(rng.randrange(1 << 30)), rng.randint(5, 40))
        honest_updates[2]["h0"] = update
        _require_accepted(clients["h0"].wait_ack(clients["h0"].send(update[0], 2, update[1]), timeout=60))
        progress(f"round 1 done, round 2 collecting; hub RSS {hub.status()['VmRSS'] / 1024:.0f} MiB")
        report.rss_before_fuzz_mib = hub.status()["VmRSS"] / 1024
        before = _rejections(state_dir)

        # The fuzz, from one MQTT connection playing every hostile sender.
        ctx = FuzzContext(rng=rng, topics=topics, secrets=secrets, lora=LoraSettings(), round_number=2,
                          round1_envelopes=round1_envelopes)  # fmt: skip
        attacker = MqttLink(broker.address, f"fuzz-attacker-{os.getpid()}", protocol=broker.protocol,
                            persistent_session=False).connect(15)  # fmt: skip
        expected: collections.Counter = collections.Counter()
        accepted_ok: set[str] = set()
        kinds: collections.Counter = collections.Counter()
        message_kinds: dict[str, str] = {}
        batch: list[tuple[str, bytes]] = []
        started = time.monotonic()
        next_report = started + 10
        for case in generate_cases(ctx, messages):
            report.cases += 1
            kinds[case.kind] += 1
            expected.update(case.expected)
            accepted_ok |= case.accepted_ok
            report.messages_sent += len(case.messages)
            report.partial_messages_left += int(case.partial)
            batch.extend(case.messages)
            for topic, _ in case.messages:
                message_kinds.setdefault(topic.rsplit("/", 1)[-1], case.kind)
            if len(batch) >= 64:
                attacker.publish_many(batch, qos=1, timeout=120)
                batch = []
                if not hub.alive:
                    break
            if time.monotonic() > next_report:
                next_report += 10
                progress(f"  {report.messages_sent} messages sent; hub RSS {hub.status()['VmRSS'] / 1024:.0f} MiB")
        if batch:
            attacker.publish_many(batch, qos=1, timeout=120)
        expected_total = sum(expected.values())

        # Until the hub has answered as many refusals as expected, or has stopped answering
        # (then the comparison below says what is missing).
        last_change, last_total = time.monotonic(), -1
        while hub.alive:
            total = sum(_rejections(state_dir).values()) - sum(before.values())
            if total >= expected_total:
                break
            if total != last_total:
                last_change, last_total = time.monotonic(), total
            elif time.monotonic() - last_change > 15:
                progress(f"  the hub stopped at {total} of {expected_total} expected refusals")
                break
            time.sleep(0.2)
        time.sleep(1.0)  # anything beyond the expected would show up now
        report.seconds_fuzzing = time.monotonic() - started
        after = _rejections(state_dir)
        report.hub_rejections = {reason: after.get(reason, 0) - before.get(reason, 0)
                                 for reason in after if after.get(reason, 0) - before.get(reason, 0)}  # fmt: skip
        report.expected_rejections = dict(expected)
        report.rejection_mismatch = {reason: (report.hub_rejections.get(reason, 0), expected.get(reason, 0))
                                     for reason in set(expected) | set(report.hub_rejections)
                                     if report.hub_rejections.get(reason, 0) != expected.get(reason, 0)}
        report.cases_by_kind = dict(kinds)
        (work_dir / "message_kinds.json").write_text(json.dumps(message_kinds))
        report.rss_after_fuzz_mib = (hub.status() or {}).get("VmRSS", 0) / 1024

        # Round 2 completes from the honest rest.
        for name, client in clients.items():
            if name == "h0":
                continue
            update = (b_factors(rng.randrange(1 << 30)), rng.randint(5, 40))
            honest_updates[2][name] = update
            _require_accepted(client.wait_ack(client.send(update[0], 2, update[1]), timeout=60))
        clients["h0"].wait_state(lambda s: s.global_version >= 2, timeout=60)

        # Judge: acks, receipts, the global version, the log.
        with tap._lock:
            acks = {mid: list(found) for mid, found in tap.by_message.items()}
        for message_id, found in acks.items():
            for ack in found:
                report.acks_received[ack.reason_code.value] = report.acks_received.get(ack.reason_code.value, 0) + 1
                if ack.accepted and message_id in accepted_ok:
                    report.replays_acknowledged += 1
        honest_ids = set()
        with HubStore.in_state_dir(state_dir, create=False) as store:
            for round_number in (1, 2):
                for receipt in store.receipts(round_number):
                    if receipt.client_id not in honest_updates[round_number]:
                        report.bad_updates_accepted += 1
                        continue
                    honest_ids.add(receipt.message_id)
                    body = Path(receipt.file_path).read_bytes()
                    tensors, _ = tensor_codec.decode(body)
                    expected_tensors, weight = honest_updates[round_number][receipt.client_id]
                    if receipt.sample_count != weight or any(
                            not np.array_equal(tensors[k], expected_tensors[k]) for k in expected_tensors):
                        report.bad_updates_accepted += 1
            rounds = store.rounds()
            report.rounds_completed = sum(1 for r in rounds if r.outcome == "aggregated")
            report.rounds_lost = sum(1 for r in rounds if r.round <= 2 and r.outcome != "aggregated")
            latest = store.global_version(2)
            global_tensors = tensor_codec.decode(Path(latest.file_path).read_bytes())[0] if latest else {}
        for message_id, found in acks.items():
            if message_id in honest_ids or message_id in accepted_ok:
                continue
            if any(ack.accepted for ack in found):
                report.accepted_acks_for_fuzz.append(message_id)
        report.bad_updates_accepted += len(report.accepted_acks_for_fuzz)
        expected_mean = weighted_mean(list(honest_updates[2].values()))
        report.global_matches_honest_mean = bool(global_tensors) and all(
            np.allclose(global_tensors[name], expected_mean[name], rtol=1e-5, atol=1e-6) for name in expected_mean)
    finally:
        if attacker is not None:
            attacker.close()
        if tap is not None:
            tap.close()
        for client in clients.values():
            client.close(announce_offline=False)
        report.hub_crashes = 0 if hub.alive else 1
        report.hub_exit_status = hub.stop()
        report.peak_rss_mib = hub.peak_rss_kib / 1024
        if mosquitto is not None:
            mosquitto.stop()
    log_text = log_path.read_text(errors="replace")
    report.hub_internal_errors = log_text.count("Traceback") + log_text.count("the hub failed")
    report.hub_internal_errors += report.hub_rejections.get("hub_error", 0)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="MQTT messages to fuzz with (default 10000)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--broker", choices=("embedded", "mosquitto"), default="embedded")
    parser.add_argument("--out", type=Path, default=Path("work/fuzz"), help="report and hub state go here")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f"fuzz-{args.broker}-", dir=args.out))
    report = run_fuzz(args.messages, args.seed, args.broker, work_dir, progress=print)
    print(report.summary())
    out = args.out / f"fuzz-{args.broker}-{args.seed}.json"
    out.write_text(json.dumps({**dataclasses.asdict(report), "ok": report.ok, "work_dir": str(work_dir),
                               "python": sys.version.split()[0]}, indent=2))  # fmt: skip
    print(f"report: {out}; hub state and log: {work_dir}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
