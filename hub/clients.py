"""The client registry: who may send updates, each with a secret issued once.

The secret is the HMAC key of the client's signed updates. The hub keeps it in its
database (mode 0600) and hands it out exactly once, when the client is registered; a
revoked client's secret is deleted, so its next update fails with ``unknown_client``.
A running hub looks secrets up on every update, so registering or revoking takes effect
at once, without a restart.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedvlm.shared.protocol import ProtocolError, new_client_secret, validate_client_id

from .errors import ClientRegistryError
from .store import ClientRecord, HubStore

__all__ = ["register_client", "revoke_client", "list_clients"]


def register_client(state_dir: str | Path, client_id: str) -> str:
    """Register ``client_id`` and return its new secret (the only time it is shown)."""
    try:
        validate_client_id(client_id)
    except ProtocolError as error:
        raise ClientRegistryError(f"cannot register {client_id!r}: {error}") from None
    secret = new_client_secret()
    with HubStore.in_state_dir(state_dir) as store:
        store.add_client(client_id, secret, time.time())
    return secret


def revoke_client(state_dir: str | Path, client_id: str) -> None:
    with HubStore.in_state_dir(state_dir, create=False) as store:
        store.revoke_client(client_id, time.time())


def list_clients(state_dir: str | Path) -> list[ClientRecord]:
    with HubStore.in_state_dir(state_dir, create=False) as store:
        return store.list_clients()
