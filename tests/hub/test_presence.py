"""Presence: registered clients' announcements decide who is online."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedvlm.hub.presence import PresenceTracker
from fedvlm.hub.store import HubStore
from fedvlm.shared.protocol import Announcement, Presence, ProtocolError


def announcement(client_id: str, status: Presence) -> bytes:
    return Announcement(client_id, status, "0.1.0").to_json()


def test_only_registered_online_clients_count(tmp_path: Path):
    with HubStore.in_state_dir(tmp_path) as store:
        store.add_client("a", "s" * 43, now=1.0)
        tracker = PresenceTracker(store, clock=lambda: 5.0)
        change = tracker.update("a", announcement("a", Presence.ONLINE))
        assert (change.presence, change.changed, change.first_seen, change.registered) == (
            Presence.ONLINE, True, True, True)  # fmt: skip
        assert not tracker.update("a", announcement("a", Presence.ONLINE)).changed
        stranger = tracker.update("x", announcement("x", Presence.ONLINE))
        assert stranger.first_seen and not stranger.registered
        assert tracker.online() == {"a"}
        store.add_client("x", "t" * 43, now=6.0)  # registered while the hub runs: counts at once
        assert tracker.online() == {"a", "x"}
        assert store.list_clients()[0].presence == "offline"  # written in batches
        assert tracker.flush() == 2 and store.list_clients()[0].presence == "online"
        tracker.update("a", b"")  # a deleted retained announcement means offline
        store.revoke_client("x", now=7.0)
        assert tracker.online() == set()
        with pytest.raises(ProtocolError, match="on the topic of 'a'"):
            tracker.update("a", announcement("x", Presence.ONLINE))
