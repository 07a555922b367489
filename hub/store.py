"""The hub's durable state in one SQLite database: clients, rounds, receipts, rejections, global versions.

SQLite in WAL mode with ``synchronous=FULL``: a committed transaction survives a power
cut, and the status command can read while the hub writes. Every multi-row change that
must happen together (a receipt and the federation's pins; a global version and the end
of its round) is one transaction, so a hub killed at any instant restarts from a
consistent state.

The database holds the clients' secrets, so it is created with mode 0600 (and its
directory 0700), and each secret is stored AES-GCM encrypted under a key kept outside the
database (``secrets_at_rest``: threat model there). Secrets are returned only by
:meth:`HubStore.secret_of`. A database written by an older hub, with plain-text secrets,
is encrypted in place the first time a writer (the hub, ``clients add``) opens it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import ClientRegistryError, HubError, RoundNotCollecting, StateDirMismatch
from .secrets_at_rest import SecretBox, SecretsKeyError, is_encrypted, resolve_key_path

log = logging.getLogger(__name__)

__all__ = [
    "DATABASE_NAME",
    "HubStore",
    "ClientRecord",
    "RoundRecord",
    "Receipt",
    "GlobalVersionRecord",
    "RejectionRecord",
    "RECENT_REJECTIONS_KEPT",
]

DATABASE_NAME = "hub.sqlite3"
_KEY_ID_META = "secrets_key_id"
# 2: round_aggregates (the running weighted sum committed with each batch of receipts);
# receipts' file_path is empty unless the hub keeps update files (--keep-updates).
SCHEMA_VERSION = 2
_MIGRATABLE_FROM = {"1"}
RECENT_REJECTIONS_KEPT = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    client_id  TEXT PRIMARY KEY,
    secret     TEXT,                      -- AES-GCM ciphertext ('aesgcm1:...'); NULL once revoked
    created_at REAL NOT NULL,
    revoked_at REAL,
    last_seen  REAL,
    presence   TEXT NOT NULL DEFAULT 'offline'
);
CREATE TABLE IF NOT EXISTS rounds (
    round          INTEGER NOT NULL,
    attempt        INTEGER NOT NULL,
    selected       TEXT NOT NULL,         -- JSON list of client ids
    quorum         INTEGER NOT NULL,
    deadline       REAL NOT NULL,
    opened_at      REAL NOT NULL,
    closed_at      REAL,                  -- NULL while collecting
    outcome        TEXT,                  -- 'aggregated' or 'retry' once closed
    global_version INTEGER,               -- set when outcome is 'aggregated'
    PRIMARY KEY (round, attempt)
);
CREATE TABLE IF NOT EXISTS receipts (
    round          INTEGER NOT NULL,
    client_id      TEXT NOT NULL,
    attempt        INTEGER NOT NULL,
    message_id     TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,         -- of the signed envelope: identifies a re-send
    body_sha256    TEXT NOT NULL,         -- of the stored safetensors file: checked on resume
    sample_count   INTEGER NOT NULL,
    file_path      TEXT NOT NULL,         -- '' unless update files are kept (schema 1: always a file)
    accepted_at    REAL NOT NULL,
    metrics        TEXT,                  -- the client's reported metrics (JSON), if any
    PRIMARY KEY (round, client_id)
);
CREATE TABLE IF NOT EXISTS rejection_counts (
    reason TEXT PRIMARY KEY,
    count  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS recent_rejections (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        REAL NOT NULL,
    client_id TEXT,
    round     INTEGER,
    reason    TEXT NOT NULL,
    detail    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS round_aggregates (
    round      INTEGER PRIMARY KEY,
    state      BLOB NOT NULL,             -- the aggregator's state (hub/partial_sums.py)
    count      INTEGER NOT NULL,          -- updates summed: equals the round's receipts
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS global_versions (
    version     INTEGER PRIMARY KEY,
    round       INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    file_path   TEXT NOT NULL,
    total_size  INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    chunk_size  INTEGER NOT NULL,
    manifest    TEXT NOT NULL,            -- the GlobalManifest JSON, republished byte for byte
    created_at  REAL NOT NULL,
    published   INTEGER NOT NULL DEFAULT 0
);
-- Hub workers (hub/worker.py): each worker's running partial sum of a round, committed
-- with its receipts; which receipts each partial holds; rounds the coordinator sealed.
CREATE TABLE IF NOT EXISTS worker_partials (
    round      INTEGER NOT NULL,
    worker     TEXT NOT NULL,
    state      BLOB NOT NULL,             -- the aggregator's state (hub/partial_sums.py)
    count      INTEGER NOT NULL,          -- updates summed: equals the worker's receipts of the round
    updated_at REAL NOT NULL,
    PRIMARY KEY (round, worker)
);
CREATE TABLE IF NOT EXISTS worker_receipts (
    round     INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    worker    TEXT NOT NULL,
    PRIMARY KEY (round, client_id)
);
CREATE TABLE IF NOT EXISTS sealed_rounds (
    round     INTEGER PRIMARY KEY,        -- the coordinator took its partial sums: no more commits
    sealed_at REAL NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class ClientRecord:
    client_id: str
    created_at: float
    revoked_at: float | None
    last_seen: float | None
    presence: str

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    round: int
    attempt: int
    selected: tuple[str, ...]
    quorum: int
    deadline: float
    opened_at: float
    closed_at: float | None = None
    outcome: str | None = None
    global_version: int | None = None

    @property
    def is_open(self) -> bool:
        return self.closed_at is None


@dataclasses.dataclass(frozen=True)
class Receipt:
    """An accepted update: written to ``file_path`` before this row was committed."""

    round: int
    client_id: str
    attempt: int
    message_id: str
    payload_sha256: str
    body_sha256: str
    sample_count: int
    file_path: str
    accepted_at: float
    metrics: str | None = None


class ClientStanding:
    """One client as ``HubStore.standing`` read it: active, its secret (decrypted on first
    use), and its receipt for one round (or None)."""

    __slots__ = ("_store", "client_id", "_stored", "_secret", "round", "receipt")

    def __init__(self, store: HubStore, client_id: str, stored: str, round_number: int,
                 receipt: Receipt | None) -> None:  # fmt: skip
        self._store, self.client_id, self._stored, self._secret = store, client_id, stored, None
        self.round, self.receipt = round_number, receipt

    @property
    def secret(self) -> str | None:
        """The plain secret (None where ``HubStore.secret_of`` would refuse the stored one)."""
        if self._secret is None and self._stored is not None:
            self._secret, self._stored = self._store._plain_secret(self.client_id, self._stored), None
        return self._secret


@dataclasses.dataclass(frozen=True)
class GlobalVersionRecord:
    version: int
    round: int
    sha256: str
    file_path: str
    total_size: int
    chunk_count: int
    chunk_size: int
    manifest: str
    created_at: float
    published: bool


@dataclasses.dataclass(frozen=True)
class RejectionRecord:
    at: float
    client_id: str | None
    round: int | None
    reason: str
    detail: str


class HubStore:
    """One hub's SQLite database. Safe to share between threads (one lock serialises use)."""

    def __init__(self, path: str | Path, *, create: bool = True, secrets_key_file: str | Path | None = None) -> None:
        """Open (``create``: or create) the database.

        ``secrets_key_file`` is the key that encrypts client secrets (default: the
        ``FEDVLM_HUB_SECRETS_KEY_FILE`` environment variable, else ``secrets.key`` beside
        the database). It is read only when a secret is, so ``status`` never needs it. A
        writer (``create=True``) encrypts plain-text secrets left by an older hub at once.
        """
        self.path = Path(path)
        self.secrets_key_path = resolve_key_path(self.path.parent, secrets_key_file)
        self._box: SecretBox | None = None
        self._secrets_migrated = False  # set once protect_secrets has run in this process
        if not self.path.exists():
            if not create:
                raise HubError(f"no hub state at {self.path}: start the hub or register a client there first, "
                               "or pass the --state-dir the hub uses")  # fmt: skip
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Create the file ourselves so it is 0600 from the first byte; SQLite gives its
            # WAL and shared-memory files the database file's permissions.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            # A 1 MiB page cache, not SQLite's default 2 MiB, which a 10,000-device database
            # fills (~1 MiB more hub memory than at 1,000). Safe for speed: the hot queries are
            # point lookups (a client's standing, a receipt insert) whose B-tree interior pages
            # are a few dozen; a leaf page missed is read back from the OS's file cache. A group
            # commit dirties the running sum (~128 KiB for 64 KiB updates), the old one's freed
            # pages (zeroed, secure_delete) and a batch of receipts: well inside 1 MiB, so a
            # commit does not spill to the WAL before it ends.
            self._conn.execute("PRAGMA cache_size=-1024")
            # Overwrite deleted and replaced content with zeros, so a revoked client's or a
            # migrated plain-text secret does not linger in free space of the file.
            self._conn.execute("PRAGMA secure_delete=ON")
            with self._conn:
                self._conn.executescript(_SCHEMA)
                self._conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                                   (str(SCHEMA_VERSION),))  # fmt: skip
        except sqlite3.DatabaseError as error:
            raise HubError(f"{self.path} is not a usable hub database ({error}); "
                           "point --state-dir at the hub's own state directory") from None  # fmt: skip
        version = self.get_meta("schema_version")
        if version in _MIGRATABLE_FROM and create:
            # The new tables were created above; rounds of an older hub keep their update
            # files, from which a resumed round is rebuilt.
            self.set_meta({"schema_version": str(SCHEMA_VERSION)})
            version = str(SCHEMA_VERSION)
        if version != str(SCHEMA_VERSION) and not (version in _MIGRATABLE_FROM and not create):
            raise HubError(f"{self.path} has schema version {version}; this hub reads version {SCHEMA_VERSION}")
        if create:
            try:
                self.protect_secrets()
            except BaseException:
                self._conn.close()
                raise

    @classmethod
    def in_state_dir(cls, state_dir: str | Path, *, create: bool = True,
                     secrets_key_file: str | Path | None = None) -> HubStore:  # fmt: skip
        return cls(Path(state_dir) / DATABASE_NAME, create=create, secrets_key_file=secrets_key_file)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> HubStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _query(self, sql: str, parameters: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cursor = self._conn.execute(sql, tuple(parameters))
            return cursor.fetchall()

    # ------------------------------------------------------------------ meta
    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, values: Mapping[str, str]) -> None:
        with self._lock, self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", values.items())

    def bind_federation(self, federation: str, strategy: str, lora_config_hash: str) -> None:
        """Record which federation this state belongs to, or refuse a state dir of another one.

        A state dir holds one federation's rounds, pins and checkpoints; running another
        federation, strategy or LoRA layout on it would mix incompatible updates.
        """
        wanted = {"federation": federation, "strategy": strategy, "lora_config_hash": lora_config_hash}
        with self._lock, self._conn:
            for key, value in wanted.items():
                current = self.get_meta(key)
                if current is None:
                    self._conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
                elif current != value:
                    what = {"federation": "federation", "strategy": "strategy",
                            "lora_config_hash": "LoRA settings (hash)"}[key]  # fmt: skip
                    raise StateDirMismatch(
                        f"state dir {self.path.parent} belongs to a federation with {what} {current!r}, not "
                        f"{value!r}; use another --state-dir for a new federation, or the original settings"
                    )

    # ------------------------------------------------------------------ secrets at rest
    def _secret_box(self) -> SecretBox:
        """The key that encrypts secrets, checked against the one this database was written with."""
        with self._lock:
            if self._box is not None:
                return self._box
            recorded = self.get_meta(_KEY_ID_META)
            # A new key only for a database that has never had one: creating one for a
            # database written under another key would make its secrets unreadable.
            box = SecretBox.load(self.secrets_key_path, create=recorded is None)
            if recorded is None:
                self.set_meta({_KEY_ID_META: box.key_id})
            elif recorded != box.key_id:
                raise SecretsKeyError(
                    f"the client secrets in {self.path} were encrypted with key id {recorded}, but "
                    f"{self.secrets_key_path} is key id {box.key_id}: point --secrets-key-file (or "
                    "FEDVLM_HUB_SECRETS_KEY_FILE) at the key this hub was set up with"
                )
            self._box = box
            return box

    def protect_secrets(self) -> int:
        """Encrypt any plain-text secret (a database from an older hub); returns how many.

        Also checks that the secrets key is the right one whenever secrets are stored, so a
        hub with the wrong key fails at start rather than on every update.
        """
        self._secrets_migrated = True
        with self._lock:
            rows = self._query("SELECT client_id, secret FROM clients WHERE secret IS NOT NULL")
            plain = [(client_id, secret) for client_id, secret in rows if not is_encrypted(secret)]
            already_encrypted = self.get_meta(_KEY_ID_META) is not None
            if not rows and not already_encrypted:
                return 0  # nothing to protect yet: the key is made with the first secret
            box = self._secret_box()
            if plain and already_encrypted:
                # Only a database never encrypted holds plain text legitimately; in one that
                # was, it was planted (by someone who can write the file but not read the
                # key). Encrypting it would launder it; it stays untrusted (secret_of refuses it).
                log.error("refusing plain-text secrets planted in %s for client(s) %s; re-register them "
                          "(fedvlm-hub clients revoke, then clients add)", self.path,
                          ", ".join(sorted(client_id for client_id, _ in plain)))  # fmt: skip
                return 0
            if not plain:
                return 0
            with self._conn:
                self._conn.executemany("UPDATE clients SET secret = ? WHERE client_id = ?",
                                       [(box.encrypt(secret, client_id), client_id) for client_id, secret in plain])
            # The old pages (with the plain text) sit in the write-ahead log until a checkpoint
            # copies the new ones over them; do it now and empty the log.
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return len(plain)

    def set_private_meta(self, key: str, value: str) -> None:
        """Store a value encrypted like a client secret (e.g. the hub's broker password)."""
        sealed = self._secret_box().encrypt(value, f"meta:{key}")  # ':' never occurs in a client id
        self.set_meta({key: sealed})

    def private_meta(self, key: str) -> str | None:
        stored = self.get_meta(key)
        return None if stored is None else self._secret_box().decrypt(stored, f"meta:{key}")

    # ------------------------------------------------------------------ clients
    def add_client(self, client_id: str, secret: str, now: float) -> None:
        with self._lock:
            existing = self._query("SELECT revoked_at FROM clients WHERE client_id = ?", (client_id,))
            if existing:
                state = "revoked" if existing[0][0] is not None else "registered"
                raise ClientRegistryError(f"client {client_id!r} is already {state}; choose another name "
                                          "(a secret is issued only once, at registration)")  # fmt: skip
            sealed = self._secret_box().encrypt(secret, client_id)
            with self._conn:
                self._conn.execute("INSERT INTO clients (client_id, secret, created_at) VALUES (?, ?, ?)",
                                   (client_id, sealed, now))  # fmt: skip

    def add_clients(self, secrets: Mapping[str, str], now: float) -> None:
        """Register many clients in one transaction (``{client_id: secret}``); all or none."""
        box = self._secret_box()
        rows = [(client_id, box.encrypt(secret, client_id), now) for client_id, secret in secrets.items()]
        with self._lock:
            try:
                with self._conn:
                    self._conn.executemany("INSERT INTO clients (client_id, secret, created_at) VALUES (?, ?, ?)", rows)
            except sqlite3.IntegrityError:
                raise ClientRegistryError("some of those clients are already registered (or revoked); a secret is "
                                          "issued only once, at registration") from None

    def revoke_client(self, client_id: str, now: float) -> None:
        with self._lock, self._conn:
            cursor = self._conn.execute(
                "UPDATE clients SET secret = NULL, revoked_at = ? WHERE client_id = ? AND revoked_at IS NULL",
                (now, client_id))  # fmt: skip
            if cursor.rowcount == 0:
                raise ClientRegistryError(f"client {client_id!r} is not registered (or already revoked)")

    def secret_of(self, client_id: str) -> str | None:
        """The client's secret, or None for an unknown or revoked client.

        Read from the database on every call (no cache), so a ``clients revoke`` by another
        process applies to the very next message.
        """
        rows = self._query("SELECT secret FROM clients WHERE client_id = ? AND revoked_at IS NULL", (client_id,))
        if not rows or rows[0][0] is None:
            return None
        return self._plain_secret(client_id, rows[0][0])

    def standing(self, client_id: str, round_number: int) -> ClientStanding | None:
        """What judging one update of ``client_id`` needs from the database, in one read: its
        stored secret (decrypted only when asked: ``ClientStanding.secret``) and its receipt
        for ``round_number``, if any. None for an unknown or revoked client.

        One query instead of three (is it active, its secret, its receipt): each query lets go
        of the GIL, and under load the hub thread waits to get it back (py-spy: ~20 % of the
        hub thread's samples were in these reads at 10,000 devices). Still read for every
        update, so a ``clients revoke`` by another process applies to the very next one.
        """
        rows = self._query(f"SELECT c.secret, {_JOINED_RECEIPT_COLUMNS} FROM clients AS c LEFT JOIN receipts AS r "
                           "ON r.round = ? AND r.client_id = c.client_id "
                           "WHERE c.client_id = ? AND c.revoked_at IS NULL AND c.secret IS NOT NULL",
                           (round_number, client_id))  # fmt: skip
        if not rows:
            return None
        row = rows[0]
        receipt = Receipt(*row[1:]) if row[1] is not None else None
        return ClientStanding(self, client_id, row[0], round_number, receipt)

    def _plain_secret(self, client_id: str, stored: str) -> str | None:
        if not is_encrypted(stored):
            # Written by an older hub and not migrated yet: only a read-only opener of a
            # database never migrated sees that. Anywhere else a plain-text secret was put
            # there behind the hub's back (someone who can write the file but not read the
            # key): never trust it.
            if self._secrets_migrated or self.get_meta(_KEY_ID_META) is not None:
                log.error("client %s has a plain-text secret in %s, where secrets are encrypted: refused; "
                          "re-register the client (fedvlm-hub clients revoke, then clients add)", client_id, self.path)
                return None
            return stored
        return self._secret_box().decrypt(stored, client_id)

    def is_active_client(self, client_id: str) -> bool:
        """Registered and not revoked: a cheap check (no decryption) for every incoming chunk."""
        return bool(self._query("SELECT 1 FROM clients WHERE client_id = ? AND revoked_at IS NULL "
                                "AND secret IS NOT NULL", (client_id,)))  # fmt: skip

    def active_secrets(self) -> dict[str, str]:
        """Every active client's secret (for writing the broker's password file)."""
        return {client_id: secret for client_id in sorted(self.active_client_ids())
                if (secret := self.secret_of(client_id)) is not None}  # fmt: skip

    def active_client_ids(self) -> set[str]:
        return {row[0] for row in self._query("SELECT client_id FROM clients WHERE revoked_at IS NULL")}

    def list_clients(self) -> list[ClientRecord]:
        rows = self._query("SELECT client_id, created_at, revoked_at, last_seen, presence FROM clients "
                           "ORDER BY client_id")  # fmt: skip
        return [ClientRecord(*row) for row in rows]

    def set_presence(self, client_id: str, presence: str, now: float) -> None:
        self.set_presences([(client_id, presence, now)])

    def set_presences(self, changes: Iterable[tuple[str, str, float]]) -> None:
        """Many clients' presence in one transaction: ``(client_id, presence, last_seen)``."""
        with self._lock, self._conn:
            self._conn.executemany("UPDATE clients SET presence = ?, last_seen = ? WHERE client_id = ?",
                                   [(presence, now, client_id) for client_id, presence, now in changes])

    def reset_presence(self) -> None:
        """Everyone offline until their (retained) announcements arrive again."""
        with self._lock, self._conn:
            self._conn.execute("UPDATE clients SET presence = 'offline'")

    # ------------------------------------------------------------------ rounds
    def open_round(self, record: RoundRecord) -> None:
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT INTO rounds (round, attempt, selected, quorum, deadline, opened_at) VALUES (?, ?, ?, ?, ?, ?)",
                (record.round, record.attempt, json.dumps(list(record.selected)), record.quorum, record.deadline,
                 record.opened_at))  # fmt: skip

    def extend_deadline(self, round_number: int, attempt: int, deadline: float) -> None:
        with self._lock, self._conn:
            self._conn.execute("UPDATE rounds SET deadline = ? WHERE round = ? AND attempt = ?",
                               (deadline, round_number, attempt))  # fmt: skip

    def close_round_for_retry(self, round_number: int, attempt: int, now: float) -> None:
        with self._lock, self._conn:
            self._conn.execute("UPDATE rounds SET closed_at = ?, outcome = 'retry' WHERE round = ? AND attempt = ?",
                               (now, round_number, attempt))  # fmt: skip

    def latest_round(self) -> RoundRecord | None:
        rows = self._query(f"SELECT {_ROUND_COLUMNS} FROM rounds ORDER BY round DESC, attempt DESC LIMIT 1")
        return _round_record(rows[0]) if rows else None

    def latest_round_outcome(self) -> tuple[int, str | None] | None:
        """The latest round's number and outcome, without its selected list (cheap at any N)."""
        rows = self._query("SELECT round, outcome FROM rounds ORDER BY round DESC, attempt DESC LIMIT 1")
        return (rows[0][0], rows[0][1]) if rows else None

    def rounds(self) -> list[RoundRecord]:
        return [_round_record(row) for row in self._query(f"SELECT {_ROUND_COLUMNS} FROM rounds ORDER BY round, attempt")]

    def completed_rounds(self) -> int:
        rows = self._query("SELECT MAX(round) FROM rounds WHERE outcome = 'aggregated'")
        return rows[0][0] or 0

    # ------------------------------------------------------------------ receipts
    def add_receipt(self, receipt: Receipt, pins: Mapping[str, str] | None = None) -> None:
        """Commit an accepted update, and with it any federation pins it sets (one transaction)."""
        with self._lock, self._conn:
            self._conn.execute(f"INSERT INTO receipts ({_RECEIPT_COLUMNS}) VALUES ({', '.join('?' * 10)})",
                               dataclasses.astuple(receipt))  # fmt: skip
            if pins:
                self._conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", pins.items())

    def commit_accepted(self, round_number: int, receipts: Iterable[Receipt], aggregate: bytes, count: int,
                        now: float, pins: Mapping[str, str] | None = None) -> None:  # fmt: skip
        """Group commit: a batch of accepted updates' receipts and the round's running sum that
        includes exactly them, with any pins, in one transaction (one fsync for the batch)."""
        with self._lock, self._conn:
            self._conn.executemany(f"INSERT INTO receipts ({_RECEIPT_COLUMNS}) VALUES ({', '.join('?' * 10)})",
                                   [_receipt_row(receipt) for receipt in receipts])  # fmt: skip
            self._conn.execute("INSERT OR REPLACE INTO round_aggregates (round, state, count, updated_at) "
                               "VALUES (?, ?, ?, ?)", (round_number, aggregate, count, now))  # fmt: skip
            if pins:
                self._conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", pins.items())

    def round_aggregate(self, round_number: int) -> tuple[bytes, int] | None:
        """The committed running sum of a round and how many updates it holds, if any."""
        rows = self._query("SELECT state, count FROM round_aggregates WHERE round = ?", (round_number,))
        return (bytes(rows[0][0]), rows[0][1]) if rows else None

    def count_round_receipts(self, round_number: int) -> int:
        return self._query("SELECT COUNT(*) FROM receipts WHERE round = ?", (round_number,))[0][0]

    def round_sample_total(self, round_number: int) -> int:
        """The samples of a round's accepted updates, summed by SQLite: reading the receipts
        to add them up held every one of them at once (~5 MiB at 10,000 devices, the hub's
        peak at the end of a round)."""
        return self._query("SELECT COALESCE(SUM(sample_count), 0) FROM receipts WHERE round = ?",
                           (round_number,))[0][0]  # fmt: skip

    def delete_receipt(self, round_number: int, client_id: str) -> None:
        with self._lock, self._conn:
            self._conn.execute("DELETE FROM receipts WHERE round = ? AND client_id = ?", (round_number, client_id))

    def receipt(self, round_number: int, client_id: str) -> Receipt | None:
        rows = self._query(f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE round = ? AND client_id = ?",
                           (round_number, client_id))  # fmt: skip
        return Receipt(*rows[0]) if rows else None

    def receipts(self, round_number: int) -> list[Receipt]:
        rows = self._query(f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE round = ? ORDER BY accepted_at, client_id",
                           (round_number,))  # fmt: skip
        return [Receipt(*row) for row in rows]

    def count_receipts(self) -> int:
        return self._query("SELECT COUNT(*) FROM receipts")[0][0]

    # ------------------------------------------------------------------ rejections
    def record_rejection(self, rejection: RejectionRecord) -> None:
        with self._lock, self._conn:
            self._conn.execute("INSERT INTO rejection_counts (reason, count) VALUES (?, 1) "
                               "ON CONFLICT (reason) DO UPDATE SET count = count + 1", (rejection.reason,))
            self._conn.execute("INSERT INTO recent_rejections (at, client_id, round, reason, detail) "
                               "VALUES (?, ?, ?, ?, ?)", dataclasses.astuple(rejection))  # fmt: skip
            # Keep the log bounded: a misbehaving client must not grow the database forever.
            self._conn.execute("DELETE FROM recent_rejections WHERE id <= "
                               "(SELECT MAX(id) FROM recent_rejections) - ?", (RECENT_REJECTIONS_KEPT,))

    def rejection_counts(self) -> dict[str, int]:
        return dict(self._query("SELECT reason, count FROM rejection_counts ORDER BY reason"))

    def recent_rejections(self, limit: int = 20) -> list[RejectionRecord]:
        rows = self._query("SELECT at, client_id, round, reason, detail FROM recent_rejections "
                           "ORDER BY id DESC LIMIT ?", (limit,))  # fmt: skip
        return [RejectionRecord(*row) for row in rows]

    # ------------------------------------------------------------------ global versions
    def add_global_version(self, record: GlobalVersionRecord, *, closes_attempt: int, now: float) -> None:
        """Record a new global version and close the round (attempt) that produced it, together."""
        with self._lock, self._conn:
            self._conn.execute(f"INSERT INTO global_versions ({_GLOBAL_COLUMNS}) VALUES ({', '.join('?' * 10)})",
                               dataclasses.astuple(record))  # fmt: skip
            self._conn.execute("UPDATE rounds SET closed_at = ?, outcome = 'aggregated', global_version = ? "
                               "WHERE round = ? AND attempt = ?", (now, record.version, record.round, closes_attempt))
            # The version holds the round's sum now: its running aggregate is not needed again.
            self._conn.execute("DELETE FROM round_aggregates WHERE round = ?", (record.round,))

    def mark_published(self, version: int) -> None:
        with self._lock, self._conn:
            self._conn.execute("UPDATE global_versions SET published = 1 WHERE version = ?", (version,))

    def latest_global(self) -> GlobalVersionRecord | None:
        rows = self._query(f"SELECT {_GLOBAL_COLUMNS} FROM global_versions ORDER BY version DESC LIMIT 1")
        return _global_record(rows[0]) if rows else None

    def global_version(self, version: int) -> GlobalVersionRecord | None:
        rows = self._query(f"SELECT {_GLOBAL_COLUMNS} FROM global_versions WHERE version = ?", (version,))
        return _global_record(rows[0]) if rows else None

    def global_versions(self) -> list[GlobalVersionRecord]:
        return [_global_record(row) for row in self._query(f"SELECT {_GLOBAL_COLUMNS} FROM global_versions "
                                                           "ORDER BY version")]  # fmt: skip


    # ------------------------------------------------------------------ hub workers
    def commit_worker_batch(self, worker: str, round_number: int, receipts: Iterable[Receipt], state: bytes,
                            count: int, now: float, pins: Mapping[str, str] | None = None) -> None:  # fmt: skip
        """A worker's group commit: the batch's receipts (in the hub's table, whose key makes
        "once per client and round" hold across workers) and the worker's partial sum that
        holds exactly its receipts, in one transaction. Refused (``RoundNotCollecting``)
        once the round is closed or the coordinator sealed it."""
        receipts = list(receipts)
        with self._lock, self._conn:
            collecting = self._conn.execute(
                "SELECT 1 FROM rounds WHERE round = ? AND closed_at IS NULL AND round NOT IN "
                "(SELECT round FROM sealed_rounds)", (round_number,)).fetchone()  # fmt: skip
            if collecting is None:
                raise RoundNotCollecting(f"round {round_number} is not collecting any more")
            self._conn.executemany(f"INSERT INTO receipts ({_RECEIPT_COLUMNS}) VALUES ({', '.join('?' * 10)})",
                                   [dataclasses.astuple(receipt) for receipt in receipts])  # fmt: skip
            self._conn.executemany("INSERT INTO worker_receipts (round, client_id, worker) VALUES (?, ?, ?)",
                                   [(round_number, receipt.client_id, worker) for receipt in receipts])  # fmt: skip
            self._conn.execute("INSERT OR REPLACE INTO worker_partials (round, worker, state, count, updated_at) "
                               "VALUES (?, ?, ?, ?, ?)", (round_number, worker, state, count, now))  # fmt: skip
            if pins:
                self._conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", pins.items())

    def worker_partial(self, round_number: int, worker: str) -> tuple[bytes, int] | None:
        """One worker's committed partial sum of a round and how many updates it holds."""
        rows = self._query("SELECT state, count FROM worker_partials WHERE round = ? AND worker = ?",
                           (round_number, worker))  # fmt: skip
        return (bytes(rows[0][0]), rows[0][1]) if rows else None

    def worker_receipts(self, round_number: int, worker: str) -> list[Receipt]:
        """The receipts one worker committed in a round (those its partial sum holds)."""
        columns = ", ".join(f"r.{column.strip()}" for column in _RECEIPT_COLUMNS.split(","))
        rows = self._query(f"SELECT {columns} FROM receipts r JOIN worker_receipts w ON w.round = r.round AND "
                           "w.client_id = r.client_id WHERE r.round = ? AND w.worker = ? ORDER BY r.accepted_at, "
                           "r.client_id", (round_number, worker))  # fmt: skip
        return [Receipt(*row) for row in rows]

    def answered_clients(self, round_number: int) -> set[str]:
        """Clients with a receipt in the round (whoever committed it)."""
        return {row[0] for row in self._query("SELECT client_id FROM receipts WHERE round = ?", (round_number,))}

    def seal_worker_partials(self, round_number: int, now: float) -> tuple[list[tuple[str, bytes, int]], int]:
        """Seal a round (workers commit nothing more to it), then read every worker's partial
        sum and the round's receipt count in the same transaction: the partials hold exactly
        those receipts."""
        with self._lock, self._conn:
            self._conn.execute("INSERT OR REPLACE INTO sealed_rounds (round, sealed_at) VALUES (?, ?)",
                               (round_number, now))  # fmt: skip
            partials = [(row[0], bytes(row[1]), row[2]) for row in self._conn.execute(
                "SELECT worker, state, count FROM worker_partials WHERE round = ? ORDER BY worker", (round_number,))]
            receipts = self._conn.execute("SELECT COUNT(*) FROM receipts WHERE round = ?", (round_number,)).fetchone()
        return partials, receipts[0]

    def unseal_round(self, round_number: int) -> None:
        """Let workers commit to a round again (a coordinator resuming it before it aggregated)."""
        with self._lock, self._conn:
            self._conn.execute("DELETE FROM sealed_rounds WHERE round = ?", (round_number,))

    def drop_worker_partials(self, round_number: int) -> None:
        """The round's global version holds its partial sums now: they are not needed again."""
        with self._lock, self._conn:
            self._conn.execute("DELETE FROM worker_partials WHERE round = ?", (round_number,))
            self._conn.execute("DELETE FROM worker_receipts WHERE round = ?", (round_number,))

_ROUND_COLUMNS = "round, attempt, selected, quorum, deadline, opened_at, closed_at, outcome, global_version"
_RECEIPT_COLUMNS = ("round, client_id, attempt, message_id, payload_sha256, body_sha256, sample_count, file_path, "
                    "accepted_at, metrics")  # fmt: skip
_JOINED_RECEIPT_COLUMNS = ", ".join(f"r.{column.strip()}" for column in _RECEIPT_COLUMNS.split(","))
_GLOBAL_COLUMNS = "version, round, sha256, file_path, total_size, chunk_count, chunk_size, manifest, created_at, published"


def _receipt_row(receipt: Receipt) -> tuple:
    """A receipt's fields in column order (``dataclasses.astuple`` deep-copies: slow at scale)."""
    return tuple(getattr(receipt, field.name) for field in dataclasses.fields(receipt))


def _round_record(row: sqlite3.Row) -> RoundRecord:
    values = list(row)
    values[2] = tuple(json.loads(values[2]))
    return RoundRecord(*values)


def _global_record(row: sqlite3.Row) -> GlobalVersionRecord:
    values = list(row)
    values[-1] = bool(values[-1])
    return GlobalVersionRecord(*values)
