"""Who is online: the clients' retained announcements, filtered by the registry.

A client is online when its latest announcement says so (its last will says offline
when it vanishes). Announcements from ids that are not registered are remembered, so a
client registered while the hub runs counts as soon as it is, but never make a round
open. Presence of registered clients is mirrored in the store for the status command.

Cost per announcement is O(1): paho's thread drops the payload in an inbox (the latest
per client wins, so a burst of 10,000 retained announcements takes 10,000 dict slots, not
a queue the hub must work through twice); the hub thread judges each with one indexed
lookup, keeps the online set in memory and writes presence to SQLite in batches
(``flush``). Only opening a round reads the registry as a whole (``online``).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from fedvlm.shared.protocol import Announcement, Presence, ProtocolError, ReasonCode

from .store import HubStore

__all__ = ["PresenceTracker", "PresenceChange"]

# Announcements from unregistered ids are tracked only up to this many (they come from
# the network: an unbounded map would be a memory leak anyone could trigger).
_MAX_TRACKED = 1_000_000


@dataclasses.dataclass(frozen=True)
class PresenceChange:
    presence: Presence
    changed: bool  # differs from this client's previous announcement
    first_seen: bool  # the first announcement from this id since the hub started
    registered: bool  # a registered, not revoked, client


class PresenceTracker:
    def __init__(self, store: HubStore, clock: Callable[[], float]) -> None:
        self.store = store
        self._clock = clock
        # Each id's latest presence is where it is: in ``_online``, or in ``_offline`` (no map of
        # every id to its presence beside them: 0.3 MiB at 10,000).
        self._offline: set[str] = set()
        self._online: set[str] = set()  # every id whose latest announcement says online
        # Of those, the ones not registered when they announced (few: a set of every registered
        # one would be a second set of all online devices, 0.5 MiB at 10,000).
        self._unregistered_online: set[str] = set()
        self._unsaved: dict[str, tuple[str, float]] = {}  # client -> (presence, when): the next flush
        self._inbox: dict[str, bytes] = {}
        self._inbox_lock = threading.Lock()

    # ------------------------------------------------------------------ paho's thread
    def receive(self, client_id: str, payload: bytes) -> None:
        """Keep the latest announcement of ``client_id`` for ``drain`` (any thread, O(1))."""
        with self._inbox_lock:
            if client_id in self._inbox or len(self._inbox) < _MAX_TRACKED:
                self._inbox[client_id] = payload

    # ------------------------------------------------------------------ the hub thread
    def drain(self) -> list[tuple[str, PresenceChange | ProtocolError]]:
        """Apply every announcement received since the last drain; each client's change or error."""
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, {}
        results: list[tuple[str, PresenceChange | ProtocolError]] = []
        for client_id, payload in inbox.items():
            try:
                results.append((client_id, self.update(client_id, payload)))
            except ProtocolError as error:
                results.append((client_id, error))
        return results

    def update(self, client_id: str, payload: bytes) -> PresenceChange:
        """Apply an announcement on ``client_id``'s topic (empty: deleted, i.e. offline).

        Raises ProtocolError for an announcement that is not valid.
        """
        presence = Presence.OFFLINE
        if payload:
            announcement = Announcement.from_json(payload)
            if announcement.client_id != client_id:
                raise ProtocolError(ReasonCode.CLIENT_MISMATCH,
                                    f"announcement for {announcement.client_id!r} on the topic of {client_id!r}")
            presence = announcement.status
        previous = (Presence.ONLINE if client_id in self._online
                    else Presence.OFFLINE if client_id in self._offline else None)  # fmt: skip
        if previous is None and len(self._online) + len(self._offline) >= _MAX_TRACKED:
            return PresenceChange(presence, changed=False, first_seen=False, registered=False)
        registered = self.store.is_active_client(client_id)  # one indexed lookup, no decryption
        if presence is Presence.ONLINE:
            self._offline.discard(client_id)
            self._online.add(client_id)
            if registered:
                self._unregistered_online.discard(client_id)
            else:
                self._unregistered_online.add(client_id)
        else:
            self._online.discard(client_id)
            self._offline.add(client_id)
            self._unregistered_online.discard(client_id)
        changed = presence is not previous
        if changed and registered:
            self._unsaved[client_id] = (presence.value, self._clock())
        return PresenceChange(presence, changed=changed, first_seen=previous is None, registered=registered)

    def flush(self) -> int:
        """Write the presence changes since the last flush in one transaction; returns how many."""
        if not self._unsaved:
            return 0
        unsaved, self._unsaved = self._unsaved, {}
        self.store.set_presences((client_id, presence, when) for client_id, (presence, when) in unsaved.items())
        return len(unsaved)

    def online_count(self) -> int:
        """Clients online that were registered when they announced (O(1); may count one
        revoked since; ``online`` is exact)."""
        return len(self._online) - len(self._unregistered_online)

    def announced_online_count(self) -> int:
        """Every id announcing itself online, registered or not (O(1))."""
        return len(self._online)

    def online(self) -> set[str]:
        """Registered, not revoked, and online (reads the registry: once per round, not per message)."""
        active = self.store.active_client_ids()
        # The announcements' strings, not the registry's (``&`` keeps whichever set's it walks):
        # the round's selection then shares them instead of holding a copy of every id.
        online = {client_id for client_id in self._online if client_id in active}
        now = self._clock()
        for client_id in self._unregistered_online & online:  # registered since they announced
            self._unsaved[client_id] = (Presence.ONLINE.value, now)
        self._unregistered_online = self._online - online
        return online
