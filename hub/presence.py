"""Who is online: the clients' retained announcements, filtered by the registry.

A client is online when its latest announcement says so (its last will says offline
when it vanishes). Announcements from ids that are not registered are remembered, so a
client registered while the hub runs counts as soon as it is, but never make a round
open. Presence of registered clients is mirrored in the store for the status command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from fedvlm.shared.protocol import Announcement, Presence, ProtocolError, ReasonCode

from .store import HubStore

__all__ = ["PresenceTracker", "PresenceChange"]

# Announcements from unregistered ids are tracked only up to this many (they come from
# the network: an unbounded map would be a memory leak anyone could trigger).
_MAX_TRACKED = 100_000


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
        self._presence: dict[str, Presence] = {}

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
        registered = self.store.secret_of(client_id) is not None
        previous = self._presence.get(client_id)
        if previous is None and not registered and len(self._presence) >= _MAX_TRACKED:
            return PresenceChange(presence, changed=False, first_seen=False, registered=False)
        self._presence[client_id] = presence
        changed = presence is not previous
        if changed and registered:
            self.store.set_presence(client_id, presence.value, self._clock())
        return PresenceChange(presence, changed=changed, first_seen=previous is None, registered=registered)

    def online(self) -> set[str]:
        """Registered, not revoked, and online."""
        online = {client for client, presence in list(self._presence.items()) if presence is Presence.ONLINE}
        return online & self.store.active_client_ids()
