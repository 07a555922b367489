"""Which hub workers hold their shared subscription: the coordinator opens no round before all do.

A broker drops a message that no subscription matches. With workers, nothing but their
shared subscription (``$share/<group>/.../updates/+/+``) matches the devices' updates, and
it exists only from the broker's SUBACK on; the coordinator's own connection carries no
ordering with the workers'. A coordinator that opened a round before then had its
selected devices send into the void: they sent once, nobody got it, the round stalled
(the 2-worker benchmark setting accepted 0 of 20 in about half its runs).

So each worker records, once the broker acknowledged its subscriptions, that it holds
them for the coordinator's current run (a token the coordinator writes at start), and
the coordinator opens a round only when all ``--workers`` did. Once made, the subscription
outlives the worker's connection (a persistent session: the broker keeps its share while
it is away), so a record stays good for the run; a restarted coordinator starts a new
run, and workers still running record themselves again within a refresh.
"""

from __future__ import annotations

import secrets

from .store import HubStore

__all__ = ["begin_coordinator_run", "coordinator_run", "record_subscribed", "unsubscribed_workers"]

RUN_META_KEY = "coordinator_run"


def _subscribed_key(index: int) -> str:
    return f"worker_subscribed.{index}"


def begin_coordinator_run(store: HubStore) -> None:
    """The coordinator, at start: workers must record their subscription again for this run."""
    store.set_meta({RUN_META_KEY: secrets.token_hex(8)})


def coordinator_run(store: HubStore) -> str | None:
    return store.get_meta(RUN_META_KEY)


def record_subscribed(store: HubStore, index: int) -> str | None:
    """A worker whose subscriptions the broker acknowledged: record it for the current run
    (returned; None while no coordinator has started)."""
    run = coordinator_run(store)
    if run is not None:
        store.set_meta({_subscribed_key(index): run})
    return run


def unsubscribed_workers(store: HubStore, workers: int) -> list[int]:
    """The indexes of the workers that have not recorded their subscription for this run."""
    run = coordinator_run(store)
    return [index for index in range(workers) if run is None or store.get_meta(_subscribed_key(index)) != run]
