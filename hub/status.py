"""``fedvlm-hub status``: the federation's state, read from the hub's SQLite database.

Works whether or not the hub runs (SQLite's WAL lets it read beside the hub). Whether the
hub is alive is judged from the process id it recorded, so a hub killed with SIGKILL
shows as stopped even though its last published state says online.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from fedvlm.shared.protocol import HubState, Presence, ProtocolError

from .store import ClientRecord, GlobalVersionRecord, HubStore, RejectionRecord, RoundRecord

__all__ = ["HubStatus", "read_status"]


@dataclasses.dataclass(frozen=True)
class HubStatus:
    """A snapshot of one hub's state directory."""

    state_dir: str
    federation: str | None
    strategy: str | None
    hub_running: bool
    last_state: HubState | None
    clients: tuple[ClientRecord, ...]
    latest_round: RoundRecord | None
    answered: tuple[str, ...]  # clients with an accepted update in the latest round
    completed_rounds: int
    last_global: GlobalVersionRecord | None
    accepted_updates: int
    rejections: dict[str, int]
    recent_rejections: tuple[RejectionRecord, ...]

    @property
    def online_clients(self) -> tuple[str, ...]:
        if not self.hub_running:
            return ()
        return tuple(c.client_id for c in self.clients if c.active and c.presence == Presence.ONLINE.value)

    @property
    def phase(self) -> str:
        if self.last_state is None:
            return "not started"
        return self.last_state.phase.value

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for ``status --json``; secrets are not part of a status."""
        return {
            "state_dir": self.state_dir,
            "federation": self.federation,
            "strategy": self.strategy,
            "hub_running": self.hub_running,
            "round": self.last_state.round if self.last_state else None,
            "phase": self.phase,
            "global_version": self.last_global.version if self.last_global else 0,
            "completed_rounds": self.completed_rounds,
            "latest_round": dataclasses.asdict(self.latest_round) if self.latest_round else None,
            "answered": list(self.answered),
            "clients": [{"client_id": c.client_id, "active": c.active, "presence": c.presence,
                         "last_seen": c.last_seen} for c in self.clients],  # fmt: skip
            "online_clients": list(self.online_clients),
            "last_aggregation": None if self.last_global is None else {
                "version": self.last_global.version, "round": self.last_global.round,
                "sha256": self.last_global.sha256, "bytes": self.last_global.total_size,
                "created_at": self.last_global.created_at, "published": self.last_global.published,
            },  # fmt: skip
            "accepted_updates": self.accepted_updates,
            "rejections": dict(self.rejections),
            "recent_rejections": [dataclasses.asdict(r) for r in self.recent_rejections],
        }

    def format(self) -> str:
        lines = [f"state dir    {self.state_dir}"]
        if self.federation is None:
            lines.append("federation   (the hub has not been started on this state dir yet)")
        else:
            lines.append(f"federation   {self.federation} (strategy {self.strategy})")
        lines.append(f"hub          {'running' if self.hub_running else 'not running'}")
        lines.append(f"round        {self._round_line()}")
        active = [c for c in self.clients if c.active]
        online = self.online_clients
        revoked = len(self.clients) - len(active)
        clients = f"{len(active)} registered" + (f" ({revoked} revoked)" if revoked else "")
        clients += f", {len(online)} online" + (f": {', '.join(online)}" if online else "")
        lines.append(f"clients      {clients}")
        if self.last_global is None:
            lines.append("last global  none yet")
        else:
            g = self.last_global
            lines.append(f"last global  version {g.version} from round {g.round}, {_clock(g.created_at)}, "
                         f"{g.total_size} bytes, sha256 {g.sha256[:16]}…"
                         + ("" if g.published else " (not yet published)"))  # fmt: skip
        rejected = sum(self.rejections.values())
        by_reason = ", ".join(f"{reason} {count}" for reason, count in sorted(self.rejections.items()))
        lines.append(f"updates      {self.accepted_updates} accepted, {rejected} rejected"
                     + (f" ({by_reason})" if by_reason else ""))  # fmt: skip
        for rejection in self.recent_rejections[:5]:
            who = rejection.client_id or "unknown sender"
            lines.append(f"  {_clock(rejection.at)} {who}: {rejection.reason} — {rejection.detail[:120]}")
        return "\n".join(lines)

    def _round_line(self) -> str:
        state, latest = self.last_state, self.latest_round
        if state is None:
            return "none yet"
        text = f"{state.round}, phase {state.phase.value}"
        if latest is not None and latest.round == state.round and latest.is_open:
            text += (f", attempt {latest.attempt}: {len(self.answered)}/{len(latest.selected)} updates "
                     f"(quorum {latest.quorum}), deadline {_clock(latest.deadline)}")  # fmt: skip
        return text + f"; {self.completed_rounds} round(s) completed"


def read_status(state_dir: str | Path) -> HubStatus:
    """The status of the hub whose state is in ``state_dir`` (which must exist)."""
    with HubStore.in_state_dir(state_dir, create=False) as store:
        last_state = None
        raw_state = store.get_meta("hub_state")
        if raw_state:
            try:
                last_state = HubState.from_json(raw_state)
            except ProtocolError:
                last_state = None
        latest_round = store.latest_round()
        answered = tuple(r.client_id for r in store.receipts(latest_round.round)) if latest_round else ()
        return HubStatus(
            state_dir=str(state_dir),
            federation=store.get_meta("federation"),
            strategy=store.get_meta("strategy"),
            hub_running=_hub_alive(store, last_state),
            last_state=last_state,
            clients=tuple(store.list_clients()),
            latest_round=latest_round,
            answered=answered,
            completed_rounds=store.completed_rounds(),
            last_global=store.latest_global(),
            accepted_updates=store.count_receipts(),
            rejections=store.rejection_counts(),
            recent_rejections=tuple(store.recent_rejections()),
        )


def _hub_alive(store: HubStore, last_state: HubState | None) -> bool:
    if last_state is None or last_state.status is not Presence.ONLINE:
        return False
    pid, host = store.get_meta("hub_pid"), store.get_meta("hub_host")
    if pid is None or host != socket.gethostname():
        return True  # another machine's hub: its own word is all there is
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _clock(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def status_json(status: HubStatus) -> str:
    return json.dumps(status.to_dict(), indent=2, sort_keys=True)
