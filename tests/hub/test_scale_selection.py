"""Selection and presence with more than 10,000 devices: no cap, O(1) work per message.

Unit level (real SQLite, no broker): 10,001 registered clients announce themselves, a
round selects all of them (or --clients-per-round of them), each learns it is selected
from its own small Selection, and the hub state stays the same size whatever the count.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedvlm.hub.clients import register_clients
from fedvlm.hub.presence import PresenceTracker
from fedvlm.hub.rounds import RoundLifecycle, RoundPolicy
from fedvlm.hub.store import HubStore, RoundRecord
from fedvlm.shared.protocol import Announcement, HubState, Presence, RoundPhase, Selection

DEVICES = 10_001


# A fixed deadline: a time.time() one varies in its printed digits and so in the JSON's length.
DEADLINE = 1_800_000_000.5


def _state(selected: int, attempt: int = 1) -> HubState:
    return HubState(federation="fed", status=Presence.ONLINE, round=1, phase=RoundPhase.COLLECTING, global_version=0,
                    selected_count=selected, deadline=DEADLINE, round_config={"attempt": attempt})


def test_ten_thousand_and_one_devices_are_all_selected_and_each_told_alone(tmp_path: Path):
    ids = [f"dev-{i:05d}" for i in range(DEVICES)]
    register_clients(tmp_path, ids)
    with HubStore.in_state_dir(tmp_path) as store:
        presence = PresenceTracker(store, clock=time.time)
        for client_id in ids:  # what paho's thread does with each retained announcement
            presence.receive(client_id, Announcement(client_id, Presence.ONLINE, "0.1.0").to_json())
        presence.receive("stranger", Announcement("stranger", Presence.ONLINE, "0.1.0").to_json())
        results = presence.drain()
        assert len(results) == DEVICES + 1 and presence.online_count() == DEVICES
        assert presence.flush() == DEVICES  # one transaction, not one per announcement
        assert {c.presence for c in store.list_clients()} == {"online"}

        lifecycle = RoundLifecycle(RoundPolicy(min_clients=2, round_timeout_s=60))
        opened = lifecycle.try_open(presence.online(), now=time.time())
        assert opened is not None and len(opened.selected) == DEVICES  # no cap
        store.open_round(RoundRecord(round=1, attempt=1, selected=opened.selected, quorum=opened.quorum,
                                     deadline=opened.deadline, opened_at=opened.opened_at))  # fmt: skip
        assert len(store.latest_round().selected) == DEVICES

    # The state every device reads is the same size for 2 or 10,001 selected devices...
    assert abs(len(_state(DEVICES).to_json()) - len(_state(2).to_json())) <= 5
    # ...and each device's own word is small and names it alone.
    last = Selection(federation="fed", client_id=ids[-1], round=1, attempt=1, deadline=opened.deadline)
    assert len(last.to_json()) < 200 and last.matches(_state(DEVICES))
    assert not last.matches(_state(DEVICES, attempt=2))  # a stale selection does not count
    # Every one of them counts, and the round completes once each has answered (how fast is
    # benchmarks/hub_scale.py's to measure, not a test's).
    for client_id in ids:
        assert opened.is_selected(client_id)
        assert not opened.all_answered()
        opened.record(client_id)
    assert opened.all_answered()


def test_clients_per_round_samples_from_those_online():
    online = {f"dev-{i:05d}" for i in range(DEVICES)}
    policy = RoundPolicy(min_clients=2, clients_per_round=100, seed=3)
    first = policy.select(online, round_number=1, attempt=1)
    assert len(first) == 100 and set(first) <= online
    assert policy.select(online, round_number=1, attempt=1) == first  # seeded
    assert set(policy.select(online, round_number=2, attempt=1)) != set(first)  # a fresh sample per round
    # A fraction applies first (Flower's fraction_train), the cap after it.
    assert len(RoundPolicy(min_clients=2, fraction=0.005, clients_per_round=100).select(online, 1, 1)) == 51
    assert len(RoundPolicy(min_clients=2, fraction=0.5, clients_per_round=100).select(online, 1, 1)) == 100
